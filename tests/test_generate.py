"""Text in, text out: the tokenizer an export carries, read back torch-free by the runtime and compared with
transformers over the same files; generation that stops at EOS and samples repeatably; `shira-edge generate`.

The model is the tiny OPT with a real byte-level BPE tokenizer (512 tokens, the model's vocabulary) and a chat
template, saved as one model directory and exported through the real export path (`run_export`)."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from shira_edge.cli import main
from shira_edge.runtime import Runtime
from shira_edge.runtime.sampling import TokenPicker
from shira_edge.runtime.shira_format import make_adapter, make_target, write_shira
from shira_edge.runtime.tokenizer import TokenizerError
from tests.conftest import TINY_OPT, make_tiny_opt

PROMPT = [2, 45, 9, 301, 77]
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]   # ids 0..6, as OPT's
TEXTS = ["the capital of France is Paris.", "  leading spaces, a\ttab\nand new lines  ", "héllo 日本語 🙂 12345",
         "</s>special<|user|> tokens inside</s>", ""]
# Exercises what transformers' environment adds to jinja2: namespace, loop controls, tojson, raise_exception,
# {% generation %}, trim_blocks/lstrip_blocks, the special-token variables and add_generation_prompt.
CHAT_TEMPLATE = """{%- set ns = namespace(system='') -%}
{{ bos_token }}
{% for m in messages %}
    {% if m['role'] == 'system' %}{% set ns.system = m['content'] | trim %}{% continue %}{% endif %}
    {% if m['role'] not in ['user', 'assistant'] %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}
<|{{ m['role'] }}|>{% if ns.system and m['role'] == 'user' %}[{{ ns.system }}] {% endif %}
    {% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}
    {% else %}{{ m['content'] }}{% endif %}
    {% if m.get('meta') %} {{ m['meta'] | tojson }}{% endif %}{{ eos_token }}
{% endfor %}
{% if add_generation_prompt %}
<|assistant|>
{% endif %}"""


def make_tokenizer():
    """A byte-level BPE trained on seeded nonsense words up to exactly 512 tokens, wrapped as transformers does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    syllables = ["ka", "to", "ri", "sa", "mo", "ne", "lu", "pi", "da", "ve", "zo", "qu", "ex", "an", "or", "th", "er"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(4000)]
    corpus = [" ".join(words[i:i + 12]) + rng.choice(".,?!") for i in range(0, len(words), 12)]
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(corpus + ["the capital of France is Paris."] * 20, trainers.BpeTrainer(
        vocab_size=TINY_OPT["vocab_size"], special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    core.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    assert core.get_vocab_size() == TINY_OPT["vocab_size"]
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def hf_greedy(model, ids, max_new_tokens, eos_token_id):
    import torch

    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_token_id, pad_token_id=1)
    return out[0].tolist()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """The tiny OPT plus tokenizer as one directory. Its EOS is set to a token greedy decoding of PROMPT reaches
    after a few steps (the weights are unchanged), so stopping at EOS shows in a short generation."""
    model = make_tiny_opt(seed=0)
    new = hf_greedy(model, PROMPT, 12, eos_token_id=None)[len(PROMPT):]
    eos = next(t for t in new if t != new[0])
    model.config.eos_token_id = model.generation_config.eos_token_id = eos
    path = tmp_path_factory.mktemp("tiny-opt-text") / "model"
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def _export(model_dir, out, **kwargs):
    from shira_edge.export import run_export
    from shira_edge.exporters.common import Stages

    run_export(str(model_dir), out_dir=out, stages=Stages(quiet=True), **kwargs)
    return out


@pytest.fixture(scope="session")
def onnx_dir(model_dir, tmp_path_factory):
    return _export(model_dir, tmp_path_factory.mktemp("text-onnx") / "out")


@pytest.fixture(scope="session")
def et_dir(model_dir, tmp_path_factory):
    return _export(model_dir, tmp_path_factory.mktemp("text-et") / "out", fmt="executorch", max_seq_len=40)


@pytest.fixture(scope="session")
def rt(onnx_dir):
    with Runtime(onnx_dir, policy="instant") as runtime:
        yield runtime


@pytest.fixture
def hf_tok(onnx_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(onnx_dir)   # transformers over the export's own files


def test_export_carries_the_tokenizer_files(onnx_dir, model_dir):
    from tokenizers import Tokenizer

    files = json.loads((onnx_dir / "manifest.json").read_text())["files"]
    assert (files["tokenizer"], files["tokenizer_config"], files["chat_template"]) == (
        "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
    assert Tokenizer.from_file(str(onnx_dir / "tokenizer.json")).to_str() == \
        Tokenizer.from_file(str(model_dir / "tokenizer.json")).to_str()
    config = json.loads((onnx_dir / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == ("</s>", "</s>", "<pad>")
    assert (onnx_dir / "chat_template.jinja").read_text() == CHAT_TEMPLATE


def test_encode_decode_equal_transformers_over_the_same_file(rt, onnx_dir):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(onnx_dir / "tokenizer.json"))
    tok = rt.tokenizer
    for text in TEXTS:
        ids = hf(text)["input_ids"]
        assert tok.encode(text) == ids and ids[0] == 2, text      # the BOS comes from tokenizer.json
        assert tok.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids, skip_special_tokens=True) == text.replace("</s>", "").replace("<|user|>", "")
    rng = np.random.default_rng(0)
    for ids in [list(range(512)), *rng.integers(0, 512, (20, 16)).tolist()]:   # every id, and random sequences
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "  Be brief. "}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "<b>2+2</b>?", "meta": {"id": "<7>"}}],
    [{"role": "user", "content": "a None key is dropped", "meta": None}],
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_renders_exactly_like_transformers(rt, hf_tok, add_generation_prompt):
    for chat in CHATS:
        expected = hf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert rt.tokenizer.apply_chat_template(chat, add_generation_prompt=add_generation_prompt) == expected
    bad = [{"role": "tool", "content": "x"}]
    with pytest.raises(Exception, match="unknown role tool"):
        hf_tok.apply_chat_template(bad, tokenize=False)
    with pytest.raises(ValueError, match="chat_template.jinja.*unknown role tool"):
        rt.tokenizer.apply_chat_template(bad)


def test_generate_stops_at_the_exports_eos_like_transformers(rt, model_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    eos = hf.config.eos_token_id
    assert rt.manifest["io"]["eos_token_id"] == eos
    stopped = rt.generate([PROMPT], max_new_tokens=12)[0].tolist()
    assert stopped == hf_greedy(hf, PROMPT, 12, eos) and stopped[-1] == eos and len(stopped) < len(PROMPT) + 12
    full = rt.generate([PROMPT], max_new_tokens=12, eos_token_id=None)[0].tolist()
    # the reference without EOS: the same weights with the config's EOS (2), which greedy decoding never reaches
    assert full == hf_greedy(make_tiny_opt(seed=0), PROMPT, 12, None) and full[:len(stopped)] == stopped
    first = full[len(PROMPT)]
    assert rt.generate([PROMPT], 12, eos_token_id=[511, first])[0].tolist() == full[:len(PROMPT) + 1]   # a list


def test_a_finished_row_is_padded_while_the_others_go_on(rt):
    other = [2, 7, 300, 12, 5]
    both = rt.generate([PROMPT, other], max_new_tokens=12)
    alone = [rt.generate([p], max_new_tokens=12)[0] for p in (PROMPT, other)]
    pad = rt.manifest["io"]["pad_token_id"]
    for row, single in zip(both, alone):
        assert np.array_equal(row[:len(single)], single) and (row[len(single):] == pad).all()


def test_sampling_is_repeatable_with_a_seed_and_top_p_tiny_is_greedy(rt):
    greedy = rt.generate([PROMPT], 16, eos_token_id=None)
    hot = rt.generate([PROMPT], 16, eos_token_id=None, temperature=5.0, seed=3)
    assert np.array_equal(hot, rt.generate([PROMPT], 16, eos_token_id=None, temperature=5.0, seed=3))
    assert not np.array_equal(hot, rt.generate([PROMPT], 16, eos_token_id=None, temperature=5.0, seed=4))
    assert not np.array_equal(hot, greedy)
    assert np.array_equal(rt.generate([PROMPT], 16, eos_token_id=None, temperature=1.0, top_p=1e-9, seed=3), greedy)


def test_token_picker_samples_softmax_with_temperature_and_top_p():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    draws = TokenPicker(temperature=1.0, seed=0)(np.repeat(logits, 20000, 0))
    assert np.allclose(np.bincount(draws, minlength=4) / 20000, [0.5, 0.3, 0.15, 0.05], atol=0.015)
    hot = np.exp(logits / 2.0) / np.exp(logits / 2.0).sum()
    draws = TokenPicker(temperature=2.0, seed=1)(np.repeat(logits, 20000, 0))
    assert np.allclose(np.bincount(draws, minlength=4) / 20000, hot[0], atol=0.015)
    draws = TokenPicker(temperature=1.0, top_p=0.7, seed=2)(np.repeat(logits, 20000, 0))   # keeps 0.5 + 0.3
    assert np.allclose(np.bincount(draws, minlength=4) / 20000, [0.625, 0.375, 0, 0], atol=0.015)
    for bad in (dict(temperature=-1.0), dict(temperature=float("nan")), dict(top_p=0.0), dict(top_p=1.5),
                dict(seed=-1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TokenPicker(**bad)


def test_generate_text_equals_transformers_chat_pipeline(rt, hf_tok, model_dir):
    """Text in, text out on the device equals transformers end to end: its chat template and tokenizer, its greedy
    decoding of the model (stopping at the model's and the tokenizer's EOS), its decode."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    question = "the capital of France is"
    ids = hf_tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                     tokenize=True, return_dict=False)
    new = hf_greedy(hf, ids, 10, [hf.config.eos_token_id, hf_tok.eos_token_id])[len(ids):]
    assert rt.generate_text(question, max_new_tokens=10) == hf_tok.decode(new, skip_special_tokens=True)
    plain = hf_tok(question)["input_ids"]
    new = hf_greedy(hf, plain, 10, [hf.config.eos_token_id, hf_tok.eos_token_id])[len(plain):]
    assert rt.generate_text(question, max_new_tokens=10, chat=False) == hf_tok.decode(new, skip_special_tokens=True)


def _adapters(rt, root):
    """Two random adapters on different weights, large enough to change what the tiny model says."""
    rng = np.random.default_rng(0)
    weights = [w for w in rt.manifest["weights"] if w["patchable"]]
    paths = []
    for name, chosen in (("a", weights[:4]), ("b", weights[4:8])):
        targets = []
        for w in chosen:
            idx = np.sort(rng.choice(w["shape"][0] * w["shape"][1], 64, replace=False))
            targets.append(make_target(w["name"], w["shape"], idx, rng.normal(0, 2, 64).astype(np.float32),
                                       base_digest=w["digest"]))
        paths.append(write_shira(root / f"{name}.shira", make_adapter(name, targets)))
    return paths


def test_cli_prints_the_text_with_fused_adapters(rt, onnx_dir, tmp_path):
    a, b = _adapters(rt, tmp_path)
    args = ["generate", str(onnx_dir), "--no-chat", "--max-new-tokens", "8", "the capital of France is"]
    fused = CliRunner().invoke(main, [*args[:2], "--adapter", str(a), "--adapter", str(b), "--scale", "1",
                                      "--scale", "0.5", *args[2:]])
    base = CliRunner().invoke(main, args)
    assert fused.exit_code == 0 and base.exit_code == 0, fused.output + base.output
    assert base.output == rt.generate_text("the capital of France is", 8, chat=False) + "\n"
    base_ids = rt.generate([PROMPT], 8, None)
    try:
        rt.switch([a, b], [1.0, 0.5])
        assert fused.output == rt.generate_text("the capital of France is", 8, chat=False) + "\n"
        assert not np.array_equal(rt.generate([PROMPT], 8, None), base_ids)   # the adapters did change the model
    finally:
        rt.switch(None)


def test_cli_escapes_control_characters_of_the_text():
    from shira_edge.commands.generate import terminal_safe

    assert terminal_safe("\x1b[2Jhi\u202e\n\tok \\ é") == "\\x1b[2Jhi\\u202e\n\tok \\ é"


def test_cli_flag_errors_come_before_loading(tmp_path):
    not_an_export = tmp_path   # an empty directory: loading it would fail on manifest.json
    for flags, name in ((["--temperature", "-0.5"], "--temperature"), (["--top-p", "0"], "--top-p"),
                        (["--adapter", __file__, "--scale", "1", "--scale", "2"], "--scale")):
        result = CliRunner().invoke(main, ["generate", str(not_an_export), *flags, "hello"])
        assert result.exit_code == 2 and name in result.output and "manifest" not in result.output, result.output


def _copy_export(src, dst, **files):
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["files"].update(files)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def test_an_export_without_tokenizer_says_to_reexport(onnx_dir, tmp_path):
    bare = _copy_export(onnx_dir, tmp_path / "bare", tokenizer=None, tokenizer_config=None, chat_template=None)
    with Runtime(bare, policy="instant") as rt:
        assert rt.generate([PROMPT], 2).shape == (1, len(PROMPT) + 2)   # token ids still work
        with pytest.raises(TokenizerError, match="carries no tokenizer.*re-export"):
            rt.generate_text("hello")
    result = CliRunner().invoke(main, ["generate", str(bare), "hello"])
    assert result.exit_code == 1 and "carries no tokenizer" in result.output


def test_broken_tokenizer_files_are_named(onnx_dir, tmp_path):
    broken = _copy_export(onnx_dir, tmp_path / "broken")
    (broken / "tokenizer.json").write_text((onnx_dir / "tokenizer.json").read_text()[:5000])
    with Runtime(broken, policy="instant") as rt, pytest.raises(TokenizerError, match="tokenizer.json: not a tok"):
        rt.tokenizer
    (broken / "tokenizer.json").write_bytes((onnx_dir / "tokenizer.json").read_bytes())
    (broken / "chat_template.jinja").write_text("{% for m in messages %}")
    with Runtime(broken, policy="instant") as rt, pytest.raises(TokenizerError, match="chat_template.jinja: not a"):
        rt.tokenizer
    (broken / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (broken / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<never-seen>"}))
    with Runtime(broken, policy="instant") as rt, pytest.raises(TokenizerError, match="eos_token '<never-seen>'"):
        rt.tokenizer


def test_a_chat_template_cannot_leave_its_sandbox(onnx_dir, tmp_path):
    escape = _copy_export(onnx_dir, tmp_path / "escape")
    (escape / "chat_template.jinja").write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with Runtime(escape, policy="instant") as rt, pytest.raises(ValueError, match="chat_template.jinja.*unsafe"):
        rt.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


def test_export_refuses_a_tokenizer_the_device_would_not_reproduce(tmp_path):
    """The export reads its files back through the runtime and compares with transformers: a tokenizer whose
    behaviour lives in Python (here a decode override) or that does not fit the model's vocabulary is refused."""
    from shira_edge.exporters.common import ExportError
    from shira_edge.exporters.tokenizer_files import export_tokenizer

    tok = make_tokenizer()
    (tmp_path / "ok").mkdir()
    assert export_tokenizer(tok, tmp_path / "ok", vocab_size=512)["chat_template"] == "chat_template.jinja"

    class Shouting(type(tok)):
        def _decode(self, *args, **kwargs):
            return super()._decode(*args, **kwargs).upper()

    shouting = Shouting(tokenizer_object=tok.backend_tokenizer, bos_token="</s>", eos_token="</s>")
    (tmp_path / "shouting").mkdir()
    with pytest.raises(ExportError, match="decode.*through tokenizer.json but .* through transformers"):
        export_tokenizer(shouting, tmp_path / "shouting", vocab_size=512)
    (tmp_path / "small").mkdir()
    with pytest.raises(ExportError, match="token id 511, but the model's vocabulary is 300"):
        export_tokenizer(tok, tmp_path / "small", vocab_size=300)


def test_a_prompt_longer_than_the_model_positions_is_refused_first(rt):
    limit = rt.manifest["io"]["max_positions"]
    with pytest.raises(ValueError, match=f"prompt has {limit + 1} tokens.*{limit} positions"):
        rt.generate(np.full((1, limit + 1), 7), max_new_tokens=1)
    with pytest.raises(ValueError, match=f"max_new_tokens=20.*lower max_new_tokens to 11"):
        rt.generate(np.full((1, limit - 10), 7), max_new_tokens=20)
    assert rt.generate(np.full((1, limit - 10), 7), max_new_tokens=11, eos_token_id=None).shape == (1, limit + 1)


# ---------------------------------------------------------------------- ExecuTorch: one export, a few checks


def test_executorch_text_equals_onnx_and_rows_pad(et_dir, rt):
    with Runtime(et_dir) as et:
        assert et.generate_text("the capital of France is", 8) == rt.generate_text("the capital of France is", 8)
        both = et.generate([PROMPT, [2, 7, 300, 12, 5]], max_new_tokens=12)   # batch 1: a row at a time
        assert np.array_equal(both, rt.generate([PROMPT, [2, 7, 300, 12, 5]], max_new_tokens=12))
        sampled = et.generate([PROMPT], 12, None, temperature=5.0, seed=3)
        assert np.array_equal(sampled, et.generate([PROMPT], 12, None, temperature=5.0, seed=3))


def test_executorch_prompt_longer_than_the_cache_names_max_seq_len(et_dir):
    with Runtime(et_dir) as et:
        with pytest.raises(ValueError, match="prompt has 41 tokens.*static KV cache of 40.*--max-seq-len"):
            et.generate(np.full((1, 41), 7))
        with pytest.raises(ValueError, match="max_new_tokens=32.*--max-seq-len"):
            et.generate(np.full((1, 30), 7), max_new_tokens=32)

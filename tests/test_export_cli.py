"""`shira-edge export` refuses bad input with one clear line, exit code != 0, and no partial OUT_DIR."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from shira_edge.cli import main


def export(*args):
    return CliRunner().invoke(main, ["export", *map(str, args)])


def leftovers(parent, name):
    """Anything the export left beside OUT_DIR (its temp dir is `.NAME.tmp-*`)."""
    return sorted(p.name for p in parent.iterdir() if name in p.name)


def assert_clean_error(result, *words):
    assert result.exit_code not in (0, None), result.output
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit), result.exception  # a ClickException, not a crash
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("Error: "), result.output
    for word in words:
        assert word in line, (word, line)


def test_unknown_model(tmp_path):
    result = export("--model", "no-such-model", "-o", tmp_path / "out")
    assert_clean_error(result, "--model", "no-such-model", "opt-125m")
    assert leftovers(tmp_path, "out") == []


def test_existing_out_dir_without_force(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    result = export("--model", "tiny-opt", "-o", tmp_path / "out")
    assert_clean_error(result, "already exists", "--force")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    assert leftovers(tmp_path, "out") == ["out"]


def test_unwritable_path(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = export("--model", "tiny-opt", "-o", blocker / "out")
    assert_clean_error(result, "cannot write", str(blocker))


@pytest.mark.parametrize("target,words", [
    ("model.decoder.layers.0.self_attn_layer_norm", ["LayerNorm", "not an nn.Linear"]),
    ("model.decoder.embed_tokens", ["Embedding", "not an nn.Linear"]),
    ("lm_head", ["tied to model.decoder.embed_tokens.weight"]),
    ("model.decoder.layers.9.fc1", ["no such module"]),
], ids=["layernorm", "embedding", "tied-lm-head", "missing"])
def test_refused_targets(tmp_path, target, words):
    result = export("--model", "tiny-opt", "--targets", target, "-o", tmp_path / "out")
    assert_clean_error(result, "--targets", target, *words)
    assert leftovers(tmp_path, "out") == []


def test_missing_adapter(tmp_path):
    result = export("--model", "tiny-opt", "--adapter", tmp_path / "nope.shira", "-o", tmp_path / "out")
    assert_clean_error(result, "--adapter", "nope.shira")
    assert leftovers(tmp_path, "out") == []


@pytest.mark.slow
def test_failed_parity_check_leaves_nothing(tmp_path):
    # A tolerance of 0 demands bit-identical logits from ONNX Runtime and PyTorch, which their different summation
    # orders never give: the real check runs on a real export and must refuse it.
    result = export("--model", "tiny-opt", "--atol", "0", "-o", tmp_path / "out")
    assert_clean_error(result, "parity check failed", "max_abs_diff")
    assert leftovers(tmp_path, "out") == []


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(
        tmp_path / "gpt2")
    result = export("--model", tmp_path / "gpt2", "-o", tmp_path / "out")
    assert_clean_error(result, "GPT2LMHeadModel", "'gpt2'", "not supported", "llama, mistral, opt, qwen2")
    assert leftovers(tmp_path, "out") == []


@pytest.mark.parametrize("fmt", ["onnx", "executorch"])
def test_max_seq_len_above_the_models_positions(tmp_path, fmt):
    result = export("--model", "tiny-opt", "--format", fmt, "--max-seq-len", "4096", "-o", tmp_path / "out")
    assert_clean_error(result, "--max-seq-len 4096", "2..256", "max_position_embeddings")
    assert leftovers(tmp_path, "out") == []


def test_fuse_qkv_is_onnx_only(tmp_path):
    result = export("--model", "tiny-opt", "--format", "executorch", "--fuse-qkv", "-o", tmp_path / "out")
    assert_clean_error(result, "--fuse-qkv", "executorch")
    assert leftovers(tmp_path, "out") == []

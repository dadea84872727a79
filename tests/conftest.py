"""Shared fixtures. Tiny models are built from a config here; no test downloads anything."""

from __future__ import annotations

import json
import os
from importlib import resources

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# A 2-layer OPT with hidden size 32: the shape every fast test uses. It is the shipped tiny-opt config (the
# `tiny-opt` alias), so a test model and `--model tiny-opt --random-init` are one model, defined once.
TINY_OPT = {k: v for k, v in json.loads(resources.files("shira_edge").joinpath("configs", "tiny-opt.json")
                                        .read_text()).items()
            if not k.startswith("_") and k not in ("architectures", "model_type")}


def make_tiny_opt(seed: int = 0, **overrides):
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    model = OPTForCausalLM(OPTConfig(**{**TINY_OPT, **overrides}))
    return model.eval()


@pytest.fixture(scope="session")
def tiny_opt_dir(tmp_path_factory):
    """A tiny OPT saved with save_pretrained: load it back through the real from_pretrained path."""
    path = tmp_path_factory.mktemp("tiny-opt")
    make_tiny_opt(seed=0).save_pretrained(path)
    return path


# Tiny Llama-family models: GQA (4 query heads over 2 KV heads), RMSNorm, RoPE, SwiGLU. Each is one exporter test row.
TINY_LLAMA = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=True,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
TINY_FAMILY = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    # Llama 3.x: rope_scaling "llama3" (frequencies rescaled at init), an untied lm_head
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(
        tie_word_embeddings=False, rope_parameters=dict(
            rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=32))),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),           # q/k/v carry a bias
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=6, tie_word_embeddings=False)),
}


def make_tiny(family: str, seed: int = 0, **overrides):
    """A tiny random model of one architecture family ("opt", "llama", "llama3", "qwen2", "mistral")."""
    if family == "opt":
        return make_tiny_opt(seed, **overrides)
    import torch
    import transformers

    config_cls, model_cls, extra = TINY_FAMILY[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**{**TINY_LLAMA, **extra, **overrides})
    return getattr(transformers, model_cls)(config).eval()


@pytest.fixture(scope="session")
def tiny_exports(tmp_path_factory):
    """backend -> export dir of the tiny OPT (seed 0), written once per session by the real exporters."""
    from shira_edge.exporters.common import Stages
    from shira_edge.exporters.executorch_export import export_executorch
    from shira_edge.exporters.onnx_export import export_onnx
    from shira_edge.models import ModelInfo
    from shira_edge.runtime.manifest import write_manifest

    info = ModelInfo("tiny-opt", "tests/conftest.py", "OPTForCausalLM", "random-init", 0)
    dirs = {}
    for backend, export in (("onnx", export_onnx), ("executorch", export_executorch)):
        out = tmp_path_factory.mktemp(f"runtime-{backend}")
        kwargs = {"max_seq_len": 32} if backend == "executorch" else {}
        write_manifest(out, export(make_tiny_opt(seed=0), info, out, stages=Stages(quiet=True), **kwargs))
        dirs[backend] = out
    return dirs

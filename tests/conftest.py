"""Shared fixtures. Tiny models are built from a config here; no test downloads anything."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# A 2-layer OPT with hidden size 32: the shape every fast test uses.
TINY_OPT = dict(
    vocab_size=512, hidden_size=32, word_embed_proj_dim=32, ffn_dim=64, num_hidden_layers=2,
    num_attention_heads=4, max_position_embeddings=256, dropout=0.0, attention_dropout=0.0,
    activation_dropout=0.0, layerdrop=0.0, do_layer_norm_before=True, enable_bias=True,
    pad_token_id=1, bos_token_id=2, eos_token_id=2,
)


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

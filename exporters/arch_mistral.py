"""Mistral: Llama's layers, with a sliding attention window on every layer when `sliding_window` is set."""

from __future__ import annotations

from . import arch_llama


def describe(hf_model):
    window = getattr(hf_model.config, "sliding_window", None)
    layers = tuple(range(hf_model.config.num_hidden_layers)) if window else ()
    return arch_llama.describe(hf_model, sliding_window=window, sliding_layers=layers)

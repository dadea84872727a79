"""Qwen2 / Qwen2.5: Llama's layers with a bias on q/k/v (carried by the reused Linear modules), and a sliding
window only on the layers `layer_types` marks "sliding_attention" (none unless use_sliding_window)."""

from __future__ import annotations

from . import arch_llama


def describe(hf_model):
    cfg = hf_model.config
    types = getattr(cfg, "layer_types", None) or []
    layers = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    return arch_llama.describe(hf_model, sliding_window=cfg.sliding_window if layers else None, sliding_layers=layers)

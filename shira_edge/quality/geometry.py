"""What explains fusion interference: the two adapters' weight deltas (sizes and angle) and, for SHiRA, how much
their masks overlap.

    >>> import torch
    >>> delta_geometry({"w": torch.tensor([[3.0, 0.0]])}, {"w": torch.tensor([[0.0, 4.0]])})
    {'delta_norm_task1': 3.0, 'delta_norm_task2': 4.0, 'delta_cosine': 0.0}
    >>> mask_overlap({"w": {1, 2, 3, 4}}, {"w": {3, 4, 5, 6}})
    0.5
"""

from __future__ import annotations

import math
from typing import Any


def shira_support(peft_model) -> dict[str, set[int]]:
    """Module name -> flat indices of the SHiRA mask (PEFT's layer state: call tuner.layer.to_peft first)."""
    support = {}
    for name, module in peft_model.base_model.model.named_modules():
        indices = getattr(module, "shira_indices", {}).get("default")
        if indices is not None:
            rows, cols = indices.long()
            support[name] = set((rows * module.in_features + cols).tolist())
    return support


def mask_overlap(a: dict[str, set[int]], b: dict[str, set[int]]) -> float:
    """|A ∩ B| / |A| over all layers (both masks have the same size K per layer)."""
    return sum(len(a[n] & b[n]) for n in a) / sum(len(a[n]) for n in a)


def delta_geometry(d1: dict[str, Any], d2: dict[str, Any]) -> dict[str, float]:
    """Frobenius norms of two adapters' deltas over all layers, and their cosine: fusion interference grows with
    how large the other adapter's delta is and how aligned the two are."""
    dot = sum(float((d1[n] * d2[n]).sum()) for n in d1)
    n1 = math.sqrt(sum(float(d.pow(2).sum()) for d in d1.values()))
    n2 = math.sqrt(sum(float(d.pow(2).sum()) for d in d2.values()))
    return {"delta_norm_task1": n1, "delta_norm_task2": n2, "delta_cosine": dot / (n1 * n2) if n1 and n2 else 0.0}

"""SHiRA masks: which K = r(m+n) entries of each adapted weight are trainable.

Every mask function has PEFT's signature `mask_fn(base_layer, r, **kwargs) -> mask` (a 0/1 tensor with the
weight's shape, dtype and device) and selects exactly K entries. Score-based masks break ties by flat index (a
stable sort on -score), so the same inputs always give the same mask.

    >>> import torch
    >>> from shira_edge.tuner.masks import make_mask_fn
    >>> layer = torch.nn.Linear(8, 6)
    >>> mask = make_mask_fn("wm", seed=0)(layer, 2)
    >>> int(mask.sum()) == 2 * (6 + 8)
    True

- rand:   PEFT's `random_mask` (seeded).
- wm:     top-K |W|.
- grad:   top-K |dL/dW|, dL/dW accumulated over calibration batches (see `gradient_scores`).
- snip:   top-K |W * dL/dW|.
- struct: the full diagonal, then whole rows and columns (seeded order, alternating row/column) until K is
          reached; the last line is filled partially, lowest index first (SHiRA paper, appendix: SHiRA-Struct).
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from . import MASKS

NEEDS_GRADIENTS = ("grad", "snip")

MaskFn = Callable[..., torch.Tensor]


def num_shira_params(out_features: int, in_features: int, r: int) -> int:
    """K = r(m+n): the same number of trainable parameters as a rank-r LoRA on an m x n weight."""
    return r * (out_features + in_features)


def max_rank(out_features: int, in_features: int) -> int:
    """The largest r with r(m+n) <= m*n."""
    return (out_features * in_features) // (out_features + in_features)


def top_k_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """A boolean mask of the k largest scores; equal scores go to the lower flat index."""
    if not 0 < k <= score.numel():
        raise ValueError(f"cannot select {k} entries from a {tuple(score.shape)} weight")
    order = torch.sort(-score.detach().flatten().float(), stable=True).indices[:k]
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    mask[order] = True
    return mask.view(score.shape)


def _as_weight_mask(mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # PEFT finds the indices with `mask == 1.0` and wants the weight's dtype and device.
    return mask.to(device=weight.device, dtype=weight.dtype)


def _k(base_layer: nn.Module, r: int) -> int:
    out_features, in_features = base_layer.weight.shape
    return num_shira_params(out_features, in_features, r)


def rand_mask(base_layer: nn.Module, r: int, random_seed: int | None = None, **kwargs) -> torch.Tensor:
    from peft.tuners.shira.mask_functions import random_mask

    return _as_weight_mask(random_mask(base_layer, r, random_seed=random_seed), base_layer.weight)


def wm_mask(base_layer: nn.Module, r: int, **kwargs) -> torch.Tensor:
    weight = base_layer.weight
    return _as_weight_mask(top_k_mask(weight.abs(), _k(base_layer, r)), weight)


def struct_priority(out_features: int, in_features: int, generator: torch.Generator) -> torch.Tensor:
    """Order in which struct takes entries: 0 on the diagonal, then 1 + the position of the first line
    (row i or column j, in a seeded alternating order) that covers the entry."""
    rows = torch.randperm(out_features, generator=generator)
    cols = torch.randperm(in_features, generator=generator)
    row_rank = torch.empty(out_features, dtype=torch.long)
    row_rank[rows] = 2 * torch.arange(out_features) + 1
    col_rank = torch.empty(in_features, dtype=torch.long)
    col_rank[cols] = 2 * torch.arange(in_features) + 2
    priority = torch.minimum(row_rank[:, None], col_rank[None, :])
    diag = torch.arange(min(out_features, in_features))
    priority[diag, diag] = 0
    return priority


def struct_mask(base_layer: nn.Module, r: int, random_seed: int | None = None, **kwargs) -> torch.Tensor:
    weight = base_layer.weight
    generator = torch.Generator()
    generator.manual_seed(0 if random_seed is None else random_seed)
    priority = struct_priority(*weight.shape, generator)
    return _as_weight_mask(top_k_mask(-priority.float(), _k(base_layer, r)), weight)


def scored_mask_fn(scores: Mapping[nn.Module, torch.Tensor], kind: str) -> MaskFn:
    """A mask_fn over precomputed dL/dW per base layer (keyed by the layer object PEFT passes in)."""

    def mask_fn(base_layer: nn.Module, r: int, **kwargs) -> torch.Tensor:
        if base_layer not in scores:
            raise KeyError(f"no gradient scores for {base_layer}; run gradient_scores over the same target modules")
        grad = scores[base_layer].to(base_layer.weight.device)
        score = grad.abs() if kind == "grad" else (base_layer.weight.detach() * grad).abs()
        return _as_weight_mask(top_k_mask(score, _k(base_layer, r)), base_layer.weight)

    mask_fn.__name__ = f"{kind}_mask"
    return mask_fn


def make_mask_fn(kind: str, *, seed: int | None = 0,
                 grads: Mapping[nn.Module, torch.Tensor] | None = None) -> MaskFn:
    """The mask_fn for `kind`; grad and snip need `grads` from `gradient_scores`."""
    if kind not in MASKS:
        raise ValueError(f"unknown mask {kind!r}; choose one of {', '.join(MASKS)}")
    if kind in NEEDS_GRADIENTS:
        if grads is None:
            raise ValueError(f"mask {kind!r} needs gradient scores: pass grads=gradient_scores(...)")
        return scored_mask_fn(grads, kind)
    base = {"rand": rand_mask, "wm": wm_mask, "struct": struct_mask}[kind]

    def mask_fn(base_layer: nn.Module, r: int, **kwargs) -> torch.Tensor:
        kwargs.pop("random_seed", None)  # PEFT passes it only for mask_type="random"; the seed here is ours
        return base(base_layer, r, random_seed=seed, **kwargs)

    mask_fn.__name__ = f"{kind}_mask"
    return mask_fn


def gradient_scores(model: nn.Module, layers: Mapping[str, nn.Linear], batches: Iterable[torch.Tensor],
                    all_reduce: Callable[[torch.Tensor], None] | None = None) -> dict[nn.Module, torch.Tensor]:
    """dL/dW of the causal-LM loss for each layer's weight, summed over `batches` (token id tensors, or dicts of
    model inputs whose `labels` pick the tokens the loss is on, e.g. only the answers of prompt -> answer data).

    Only the target weights get gradients, so calibration costs one backward through the frozen model per
    batch. `all_reduce` (e.g. a torch.distributed sum) combines the sums of several ranks, so every rank builds
    the same mask from the whole calibration set.
    """
    saved = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    weights = [layer.weight for layer in layers.values()]
    for w in weights:
        w.requires_grad_(True)
        w.grad = None
    was_training = model.training
    model.eval()  # no dropout: the same data gives the same mask
    try:
        for batch in batches:   # token ids (loss on every token), or model kwargs with their own labels
            kwargs = batch if isinstance(batch, Mapping) else {"input_ids": batch, "labels": batch}
            model(**kwargs).loss.backward()
        grads = {}
        for layer in layers.values():
            grad = layer.weight.grad if layer.weight.grad is not None else torch.zeros_like(layer.weight)
            if all_reduce is not None:
                all_reduce(grad)
            grads[layer] = grad.detach()
    finally:
        for w in weights:
            w.grad = None
        for name, p in model.named_parameters():
            p.requires_grad_(saved[name])
        model.train(was_training)
    return grads

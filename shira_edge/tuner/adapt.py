"""Put a SHiRA (or LoRA baseline) adapter on a causal LM, through PEFT, after checking the request.

    >>> from shira_edge.models import load_model
    >>> from shira_edge.tuner.adapt import adapt
    >>> model, _ = load_model("tiny-opt")
    >>> peft_model = adapt(model, method="shira", r=4, target_modules=["q_proj", "v_proj"], mask="wm")
    >>> peft_model.get_nb_trainable_parameters()[0]   # 2 layers x 2 modules x 4 x (32 + 32)
    1024
"""

from __future__ import annotations

import warnings
from typing import Mapping, Sequence

import torch
from torch import nn

from . import DEFAULT_TARGETS, MASKS, METHODS
from .layer import to_efficient
from .masks import NEEDS_GRADIENTS, make_mask_fn, max_rank, num_shira_params


class TunerInputError(ValueError):
    """A bad training request, found before any training starts. `flag` is the CLI flag it came from."""

    def __init__(self, flag: str, message: str):
        super().__init__(message)
        self.flag = flag


def find_targets(model: nn.Module, target_modules: Sequence[str]) -> dict[str, nn.Linear]:
    """Module name -> Linear for every module matching a target name (exact or last name parts), as PEFT
    matches them; an unknown name is an error that lists the linear modules there are."""
    linear = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    if not target_modules:
        raise TunerInputError("--target-modules", "--target-modules is empty: name at least one linear module")
    found: dict[str, nn.Linear] = {}
    for target in target_modules:
        hits = {n: m for n, m in linear.items() if n == target or n.endswith("." + target)}
        if not hits:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in linear})
            raise TunerInputError(
                "--target-modules",
                f"unknown module {target!r} in --target-modules: the model's linear modules are "
                f"{', '.join(leaves)}")
        found.update(hits)
    return found


def check_rank(targets: Mapping[str, nn.Linear], r: int) -> None:
    """SHiRA trains r(m+n) entries of an m x n weight, so r(m+n) must not exceed m*n."""
    if r <= 0:
        raise TunerInputError("--r", f"--r must be a positive integer, got {r}")
    for name, layer in targets.items():
        m, n = layer.weight.shape
        if num_shira_params(m, n, r) > m * n:
            raise TunerInputError(
                "--r",
                f"--r {r} is too large for {name} ({m}x{n}): r(m+n) = {r * (m + n)} exceeds m*n = {m * n}; "
                f"use --r {max_rank(m, n)} or less")


def check_request(method: str, mask: str) -> None:
    if method not in METHODS:
        raise TunerInputError("--method", f"unknown method {method!r} for --method; choose {' or '.join(METHODS)}")
    if mask not in MASKS:
        raise TunerInputError("--mask", f"unknown mask {mask!r} for --mask; choose one of {', '.join(MASKS)}")


def adapter_config(method: str, *, r: int, target_modules: Sequence[str], mask: str = "rand",
                   mask_seed: int = 0, grads: Mapping[nn.Module, torch.Tensor] | None = None,
                   lora_alpha: float | None = None, task_type: str | None = "CAUSAL_LM"):
    """PEFT's own config. SHiRA records the mask name in `mask_type` and its seed in `random_seed`, so both
    travel in adapter_config.json; `rand` is saved as PEFT's "random" (PEFT rebuilds it on load)."""
    from peft import LoraConfig, ShiraConfig

    check_request(method, mask)
    targets = sorted(set(target_modules))
    if method == "lora":
        # alpha = 2r is the common choice; dropout 0 keeps LoRA at its smallest memory footprint.
        return LoraConfig(r=r, lora_alpha=2 * r if lora_alpha is None else lora_alpha, lora_dropout=0.0,
                          target_modules=targets, bias="none", task_type=task_type)
    with warnings.catch_warnings():
        # ShiraConfig warns that a non-"random" mask_type needs a mask_fn: it gets one right below.
        warnings.simplefilter("ignore")
        config = ShiraConfig(r=r, target_modules=targets, random_seed=mask_seed, task_type=task_type,
                             mask_type="random" if mask == "rand" else mask)
    config.mask_fn = make_mask_fn(mask, seed=mask_seed, grads=grads)
    return config


def adapt(model: nn.Module, *, method: str = "shira", r: int = 32, target_modules: Sequence[str] = DEFAULT_TARGETS,
          mask: str = "rand", mask_seed: int = 0, grads: Mapping[nn.Module, torch.Tensor] | None = None,
          lora_alpha: float | None = None, efficient: bool = True):
    """Validate, then wrap `model` with PEFT (get_peft_model). For SHiRA with `efficient`, the layers train
    through shira_edge's copy-free path (call `layer.to_peft` before saving; `train_adapter` does)."""
    from peft import get_peft_model

    check_request(method, mask)
    targets = find_targets(model, target_modules)
    if method == "shira":
        check_rank(targets, r)
        if mask in NEEDS_GRADIENTS and grads is None:
            raise TunerInputError("--mask", f"--mask {mask} needs gradient scores (masks.gradient_scores)")
    elif r <= 0:
        raise TunerInputError("--r", f"--r must be a positive integer, got {r}")
    config = adapter_config(method, r=r, target_modules=target_modules, mask=mask, mask_seed=mask_seed,
                            grads=grads, lora_alpha=lora_alpha)
    with warnings.catch_warnings():
        # PEFT asks transformers 5 a deprecated question here; the notice says nothing about this run.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, config)
    if method == "shira" and efficient:
        to_efficient(peft_model)
    return peft_model

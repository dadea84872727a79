"""Pack a PEFT SHiRA adapter dir into one compact .shira file (the library behind `shira-edge pack`).

    >>> from shira_edge.pack import pack_adapter
    >>> summary = pack_adapter("adapter/", "adapter.shira", dtype="fp16")   # doctest: +SKIP

The base model is needed for each target's shape and base digest (so a runtime can refuse an adapter made for
another model). It is `model` if given, else the `shira_edge.json` sidecar that `shira-edge train` writes, else
adapter_config.json's base_model_name_or_path.
"""

from __future__ import annotations

import json
from pathlib import Path

from shira_edge import __version__
from shira_edge.peft_adapter import PeftAdapterError, PeftShiraAdapter, read_peft_shira
from shira_edge.runtime.shira_format import ShiraFormatError, make_adapter, make_target, write_shira
from shira_edge.runtime.untrusted import printable, read_regular


class PackError(ValueError):
    """Bad input to pack (adapter dir, base model, output path); the message names it and says what to do."""


SIDECAR = "shira_edge.json"   # train's record beside the PEFT files (tuner/train.py writes it, pack reads it)


def read_sidecar(adapter_dir: Path) -> dict:
    """train's SIDECAR record as a JSON object ({} when there is none); PackError naming the file if it is bad."""
    sidecar_path = adapter_dir / SIDECAR
    if not sidecar_path.is_file():
        return {}
    try:
        side = json.loads(read_regular(sidecar_path, SIDECAR, limit=1 << 20))
        why = None if isinstance(side, dict) else f"it holds a {type(side).__name__}, not an object"
    except (OSError, ValueError, RecursionError) as exc:
        why = exc
    if why is not None:
        raise PackError(printable(f"{sidecar_path}: cannot read it as JSON: {why}; fix or delete it, or pass "
                                  f"--model")) from None
    return side


def base_model_choice(peft: PeftShiraAdapter, side: dict, model: str | None, random_init: bool,
                      seed: int | None) -> dict:
    """Which base model to load: {"name", "random_init", "seed", "from"} ("from" says where the choice came from).

    side is read_sidecar(peft.directory); both files are read once, by pack_adapter."""
    adapter_dir = peft.directory
    sidecar_path = adapter_dir / SIDECAR
    sidecar = side.get("base_model") or {}
    if model:
        return {"name": model, "random_init": random_init, "seed": 0 if seed is None else seed, "from": "--model"}
    if isinstance(sidecar, dict) and isinstance(sidecar.get("name"), str):
        was_random = sidecar.get("weights") == "random-init"
        side_seed = sidecar.get("seed") if isinstance(sidecar.get("seed"), int) else 0
        return {"name": sidecar["name"], "random_init": random_init or was_random,
                "seed": side_seed if seed is None else seed, "from": str(sidecar_path)}
    name = peft.config.get("base_model_name_or_path")
    if isinstance(name, str) and name:
        return {"name": name, "random_init": random_init, "seed": 0 if seed is None else seed,
                "from": f"{adapter_dir / 'adapter_config.json'} base_model_name_or_path"}
    raise PackError(
        f"cannot tell which base model {printable(adapter_dir)} was made for: no --model, no {SIDECAR} sidecar, and "
        f"adapter_config.json has no base_model_name_or_path. Pass --model NAME (an alias such as tiny-opt or "
        f"opt-125m, a hub id or a save_pretrained dir), with --random-init --seed N for a seeded random base."
    )


def pack_adapter(adapter_dir: str | Path, output: str | Path, *, dtype: str = "fp32", model: str | None = None,
                 random_init: bool = False, seed: int | None = None) -> dict:
    """Pack and write; returns the summary numbers. Raises PackError with a one-line message on bad input."""
    from shira_edge.models import ModelNotAvailable, load_model
    from shira_edge.runtime.fingerprint import weight_digest

    adapter_dir = Path(adapter_dir)
    try:
        peft = read_peft_shira(adapter_dir)
    except PeftAdapterError as exc:
        raise PackError(str(exc)) from None
    side = read_sidecar(adapter_dir)   # read once: it names the base model and records the mask
    choice = base_model_choice(peft, side, model, random_init, seed)
    try:
        base, info = load_model(choice["name"], random_init=choice["random_init"], seed=choice["seed"])
    except ModelNotAvailable as exc:
        raise PackError(printable(f"base model (from {choice['from']}): {exc}")) from None

    state = base.state_dict()
    targets = []
    for name, entry in peft.entries.items():
        weight = state.get(name)
        if weight is None or weight.ndim != 2:
            raise PackError(printable(
                f"{entry.file}: key {entry.module}.shira_weight adapts {name}, which is not a 2-D weight of the "
                f"base model {info.name!r}; pass the --model the adapter was trained on"
            ))
        shape = tuple(weight.shape)
        try:
            indices, values = entry.flat_sorted(shape)
        except PeftAdapterError as exc:
            raise PackError(str(exc)) from None
        digest = weight_digest(weight.detach().float().numpy())
        targets.append(make_target(name, shape, indices, values, base_digest=digest, dtype=dtype))

    cfg = peft.config
    metadata = {
        "tool": f"shira-edge {__version__}",
        "source_adapter": adapter_dir.resolve().name,  # the name only: a full path would make packing host-dependent
        "peft_version": cfg.get("peft_version"),
        "r": cfg.get("r"),
        "mask_type": cfg.get("mask_type"),
        "mask_seed": cfg.get("random_seed"),
        "base_weights": info.weights,
        "base_seed": info.seed,
        "base_architecture": info.architecture,
    }
    # train's own record of the mask (e.g. a smart mask PEFT calls "custom")
    metadata.update({k: side[k] for k in ("method", "mask", "mask_seed", "tokenizer") if k in side})
    try:
        adapter = make_adapter(info.name, targets, dtype=dtype, metadata=metadata)
        path = write_shira(output, adapter)
    except ShiraFormatError as exc:
        raise PackError(f"{printable(adapter_dir)}: {exc}") from None   # the reader escapes what it quotes
    except OSError as exc:
        raise PackError(printable(f"cannot write {output}: {exc.strerror or exc}; choose a writable -o "
                                             f"path")) from None

    nnz = sum(t.nnz for t in targets)
    params = sum(t.shape[0] * t.shape[1] for t in targets)
    size = path.stat().st_size
    return {"path": str(path), "targets": len(targets), "nnz": nnz, "density": nnz / params, "bytes": size,
            "bytes_per_param": size / max(nnz, 1), "dtype": dtype, "base": info.name, "weights": info.weights}

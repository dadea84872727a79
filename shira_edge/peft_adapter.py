"""Read a PEFT SHiRA adapter directory into numpy arrays, keyed by the base weight each entry adapts.

    >>> from shira_edge.peft_adapter import read_peft_shira           # doctest: +SKIP
    >>> adapter = read_peft_shira("adapter/")                         # doctest: +SKIP
    >>> entry = adapter.entries["model.decoder.layers.0.self_attn.q_proj.weight"]   # doctest: +SKIP
    >>> indices, values = entry.flat_sorted((32, 32))                 # doctest: +SKIP

PEFT saves `base_model.model.<module>.shira_weight` (fp32 values [nnz]) and `base_model.model.<module>.shira_indices`
(int32 [2, nnz] rows/cols, float32 when saved on Windows) in adapter_model.safetensors; the scale is 1.0 (PEFT's
training-time scaling, which it does not save). safetensors.numpy is enough to read them: no torch here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
VALUES_SUFFIX = ".shira_weight"
INDICES_SUFFIX = ".shira_indices"


class PeftAdapterError(ValueError):
    """The adapter directory is not a usable PEFT SHiRA adapter; the message names the file and key."""


@dataclass(frozen=True)
class PeftShiraEntry:
    file: Path          # adapter_model.safetensors, for messages
    module: str         # the key prefix in the file, e.g. base_model.model.model.decoder.layers.0.fc1
    rows: np.ndarray    # int64 [nnz]
    cols: np.ndarray    # int64 [nnz]
    values: np.ndarray  # float32 [nnz]

    def flat_sorted(self, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Row-major flat positions for a weight of `shape` (out, in), sorted, with their values.

        PEFT's indices come from torch.where and are already row-major sorted; sorting anyway accepts any order.
        """
        out_f, in_f = shape
        key = self.module + INDICES_SUFFIX
        for axis, idx, limit in (("row", self.rows, out_f), ("column", self.cols, in_f)):
            bad = np.flatnonzero((idx < 0) | (idx >= limit))
            if len(bad):
                raise PeftAdapterError(
                    f"{self.file}: key {key}: {axis} index {int(idx[bad[0]])} (entry {int(bad[0])}) is out of "
                    f"range for the base weight's shape {out_f}x{in_f}; was the adapter made for another model?"
                )
        flat = self.rows * in_f + self.cols
        order = np.argsort(flat, kind="stable")
        flat, values = flat[order], self.values[order]
        dup = np.flatnonzero(np.diff(flat) == 0)
        if len(dup):
            pos = int(flat[dup[0]])
            raise PeftAdapterError(f"{self.file}: key {key}: duplicate index (row {pos // in_f}, column "
                                   f"{pos % in_f})")
        return flat, values


@dataclass(frozen=True)
class PeftShiraAdapter:
    directory: Path
    config: dict                        # adapter_config.json as read
    entries: dict[str, PeftShiraEntry]  # base weight state_dict name -> entry


def read_peft_config(adapter_dir: str | Path) -> dict:
    """adapter_config.json, checked to be a SHiRA adapter."""
    path = Path(adapter_dir) / CONFIG_FILE
    if not Path(adapter_dir).is_dir():
        raise PeftAdapterError(f"{adapter_dir}: not a directory; pass the PEFT adapter directory "
                               f"(the one holding {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise PeftAdapterError(f"{path}: missing; is {adapter_dir} a PEFT adapter directory "
                               f"(written by save_pretrained)?") from None
    except (OSError, ValueError) as exc:
        raise PeftAdapterError(f"{path}: cannot read it as JSON: {exc}") from None
    peft_type = config.get("peft_type") if isinstance(config, dict) else None
    if peft_type != "SHIRA":
        hint = " (a LoRA adapter? train with --method shira, or use LoRA fusion)" if peft_type == "LORA" else ""
        raise PeftAdapterError(f"{path}: peft_type is {peft_type!r}{hint}; pack needs a SHiRA adapter "
                               f"(peft_type \"SHIRA\")")
    return config


def read_peft_shira(adapter_dir: str | Path) -> PeftShiraAdapter:
    """Read and check a PEFT SHiRA adapter directory (config and tensors); shapes are checked later, by pack."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    config = read_peft_config(adapter_dir)
    file = Path(adapter_dir) / WEIGHTS_FILE
    if not file.is_file():
        raise PeftAdapterError(f"{file}: missing; save the adapter with save_pretrained "
                               f"(safe_serialization=True, the default)")
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise PeftAdapterError(f"{file}: cannot read it as safetensors: {exc}") from None

    modules: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        for suffix in (VALUES_SUFFIX, INDICES_SUFFIX):
            if key.endswith(suffix):
                modules.setdefault(key[: -len(suffix)], {})[suffix] = value
                break
        else:
            what = "a LoRA tensor" if ".lora_" in key else "not a SHiRA tensor"
            raise PeftAdapterError(f"{file}: key {key}: {what}; .shira holds only <module>{VALUES_SUFFIX} and "
                                   f"<module>{INDICES_SUFFIX} (modules_to_save is not supported)")
    if not modules:
        raise PeftAdapterError(f"{file}: holds no SHiRA tensors")

    entries: dict[str, PeftShiraEntry] = {}
    for module in sorted(modules):
        entry = _entry(file, module, modules[module])
        weight_name = (module[len(PREFIX):] if module.startswith(PREFIX) else module) + ".weight"
        entries[weight_name] = entry
    return PeftShiraAdapter(Path(adapter_dir), config, entries)


def _entry(file: Path, module: str, pair: dict[str, np.ndarray]) -> PeftShiraEntry:
    for suffix in (VALUES_SUFFIX, INDICES_SUFFIX):
        if suffix not in pair:
            other = INDICES_SUFFIX if suffix == VALUES_SUFFIX else VALUES_SUFFIX
            raise PeftAdapterError(f"{file}: key {module}{suffix} is missing (its {module}{other} is there)")
    values, indices = pair[VALUES_SUFFIX], pair[INDICES_SUFFIX]
    vkey, ikey = module + VALUES_SUFFIX, module + INDICES_SUFFIX
    if values.ndim != 1 or values.dtype.kind != "f":
        raise PeftAdapterError(f"{file}: key {vkey}: expected a 1-D float tensor, got {values.dtype} "
                               f"{list(values.shape)}")
    if indices.ndim != 2 or indices.shape[0] != 2:
        raise PeftAdapterError(f"{file}: key {ikey}: expected shape [2, nnz] (rows, columns), got "
                               f"{list(indices.shape)}")
    if indices.shape[1] != values.shape[0]:
        raise PeftAdapterError(f"{file}: key {ikey}: {indices.shape[1]} index pairs but {vkey} has "
                               f"{values.shape[0]} values")
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        raise PeftAdapterError(f"{file}: key {vkey}: value {int(bad[0])} is {values[bad[0]]}; the adapter is "
                               f"broken (NaN or inf), retrain it")
    if indices.dtype.kind == "f":  # PEFT stores indices as float32 on Windows
        if not (np.isfinite(indices).all() and (indices == np.round(indices)).all()):
            raise PeftAdapterError(f"{file}: key {ikey}: float indices that are not whole numbers")
    elif indices.dtype.kind not in "iu":
        raise PeftAdapterError(f"{file}: key {ikey}: indices of dtype {indices.dtype}, expected int32")
    indices = indices.astype(np.int64)
    return PeftShiraEntry(file, module, indices[0], indices[1], values.astype(np.float32))

"""Read a PEFT SHiRA adapter directory into numpy arrays, keyed by the base weight each entry adapts.

    >>> from shira_edge.peft_adapter import read_peft_shira           # doctest: +SKIP
    >>> adapter = read_peft_shira("adapter/")                         # doctest: +SKIP
    >>> entry = adapter.entries["model.decoder.layers.0.self_attn.q_proj.weight"]   # doctest: +SKIP
    >>> indices, values = entry.flat_sorted((32, 32))                 # doctest: +SKIP

PEFT saves `base_model.model.<module>.shira_weight` (values [nnz] in the model's dtype: fp32, or bf16/fp16 after
half-precision training) and `base_model.model.<module>.shira_indices` (int32 [2, nnz] rows/cols, float32 when saved
on Windows) in adapter_model.safetensors; the scale is 1.0 (PEFT's training-time scaling, which it does not save).

The file is read by `read_safetensors` here, not safetensors.numpy, which cannot hold bf16: bf16 values are widened
to float32 exactly (bf16 is the high half of a float32). Everything read is untrusted: only regular files are
opened (a FIFO would block), and key names are escaped in every message.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shira_edge.runtime.untrusted import printable, read_regular

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
VALUES_SUFFIX = ".shira_weight"
INDICES_SUFFIX = ".shira_indices"
MAX_FILE = 1 << 34            # 16 GiB; an adapter is far smaller
MAX_CONFIG = 1 << 20
# safetensors dtype -> numpy little-endian dtype; BF16 is read as its uint16 bits and widened below.
SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4",
                      "I16": "<i2", "I8": "i1", "U8": "u1", "U16": "<u2", "U32": "<u4", "U64": "<u8"}


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
                    f"{printable(self.file)}: key {printable(key)}: {axis} index {int(idx[bad[0]])} (entry {int(bad[0])}) is out of "
                    f"range for the base weight's shape {out_f}x{in_f}; was the adapter made for another model?"
                )
        flat = self.rows * in_f + self.cols
        order = np.argsort(flat, kind="stable")
        flat, values = flat[order], self.values[order]
        dup = np.flatnonzero(np.diff(flat) == 0)
        if len(dup):
            pos = int(flat[dup[0]])
            raise PeftAdapterError(f"{printable(self.file)}: key {printable(key)}: duplicate index (row {pos // in_f}, column "
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
        raise PeftAdapterError(f"{printable(adapter_dir)}: not a directory; pass the PEFT adapter directory "
                               f"(the one holding {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        config = json.loads(read_regular(path, CONFIG_FILE, limit=MAX_CONFIG).decode("utf-8"))
    except FileNotFoundError:
        raise PeftAdapterError(f"{printable(path)}: missing; is {printable(adapter_dir)} a PEFT adapter directory "
                               f"(written by save_pretrained)?") from None
    except (OSError, ValueError, RecursionError) as exc:   # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise PeftAdapterError(f"{printable(path)}: cannot read it as JSON: {printable(exc)}") from None
    peft_type = config.get("peft_type") if isinstance(config, dict) else None
    if peft_type != "SHIRA":
        hint = " (a LoRA adapter? train with --method shira, or use LoRA fusion)" if peft_type == "LORA" else ""
        raise PeftAdapterError(f"{printable(path)}: peft_type is {peft_type!r}{hint}; pack needs a SHiRA "
                               f"adapter (peft_type \"SHIRA\")")
    return config


def read_peft_shira(adapter_dir: str | Path) -> PeftShiraAdapter:
    """Read and check a PEFT SHiRA adapter directory (config and tensors); shapes are checked later, by pack."""
    config = read_peft_config(adapter_dir)
    file = Path(adapter_dir) / WEIGHTS_FILE
    if not file.exists():
        raise PeftAdapterError(f"{printable(file)}: missing; save the adapter with save_pretrained "
                               f"(safe_serialization=True, the default)")
    tensors = read_safetensors(file)

    modules: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        for suffix in (VALUES_SUFFIX, INDICES_SUFFIX):
            if key.endswith(suffix):
                modules.setdefault(key[: -len(suffix)], {})[suffix] = value
                break
        else:
            what = "a LoRA tensor" if ".lora_" in key else "not a SHiRA tensor"
            raise PeftAdapterError(f"{printable(file)}: key {printable(key)}: {what}; .shira holds only <module>{VALUES_SUFFIX} and "
                                   f"<module>{INDICES_SUFFIX} (modules_to_save is not supported)")
    if not modules:
        raise PeftAdapterError(f"{printable(file)}: holds no SHiRA tensors")

    entries: dict[str, PeftShiraEntry] = {}
    for module in sorted(modules):
        entry = _entry(file, module, modules[module])
        weight_name = (module[len(PREFIX):] if module.startswith(PREFIX) else module) + ".weight"
        entries[weight_name] = entry
    return PeftShiraAdapter(Path(adapter_dir), config, entries)


def read_safetensors(file: Path) -> dict[str, np.ndarray]:
    """{key: array} of a .safetensors file, every header field checked; BF16 comes back as exact float32."""
    where = printable(file)
    try:
        raw = read_regular(file, WEIGHTS_FILE, limit=MAX_FILE)
    except (OSError, ValueError) as exc:
        raise PeftAdapterError(f"{where}: cannot read it: {printable(getattr(exc, 'strerror', None) or exc)}") \
            from None
    bad = f"{where}: cannot read it as safetensors:"
    if len(raw) < 8:
        raise PeftAdapterError(f"{bad} {len(raw)} bytes, shorter than the 8-byte header length")
    (header_len,) = struct.unpack("<Q", raw[:8])
    if header_len > len(raw) - 8:
        raise PeftAdapterError(f"{bad} header length {header_len} runs past the end of the file")
    try:
        header = json.loads(raw[8:8 + header_len].decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise PeftAdapterError(f"{bad} header is not UTF-8 JSON ({printable(str(exc)[:120])})") from None
    if not isinstance(header, dict):
        raise PeftAdapterError(f"{bad} header is not a JSON object")
    data = memoryview(raw)[8 + header_len:]
    tensors = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        at = f"{where}: key {printable(key)}:"
        if not isinstance(info, dict) or info.get("dtype") not in SAFETENSORS_DTYPES:
            dtype = info.get("dtype") if isinstance(info, dict) else None
            raise PeftAdapterError(f"{at} dtype {dtype!r} is not one of "
                                   f"{', '.join(SAFETENSORS_DTYPES)}")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        ok = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0   # noqa: E731
        if not (isinstance(shape, list) and all(ok(d) for d in shape)):
            raise PeftAdapterError(f"{at} shape {shape!r} is not a list of sizes")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(ok(o) for o in offsets)
                and offsets[0] <= offsets[1] <= len(data)):
            raise PeftAdapterError(f"{at} data_offsets {offsets!r} are not inside the "
                                   f"{len(data)}-byte data section")
        dtype = np.dtype(SAFETENSORS_DTYPES[info["dtype"]])
        count = int(np.prod(shape, dtype=object)) if shape else 1
        if count * dtype.itemsize != offsets[1] - offsets[0]:
            raise PeftAdapterError(f"{at} {offsets[1] - offsets[0]} bytes do not hold a {info['dtype']} tensor of "
                                   f"shape {shape}")
        array = np.frombuffer(data[offsets[0]:offsets[1]], dtype=dtype).reshape(shape)
        if info["dtype"] == "BF16":   # the high half of a float32: widening is exact
            array = (array.astype(np.uint32) << 16).view(np.float32)
        tensors[key] = array
    return tensors


def _entry(file: Path, module: str, pair: dict[str, np.ndarray]) -> PeftShiraEntry:
    where, mod = printable(file), printable(module)   # names from the file reach the terminal escaped
    for suffix in (VALUES_SUFFIX, INDICES_SUFFIX):
        if suffix not in pair:
            other = INDICES_SUFFIX if suffix == VALUES_SUFFIX else VALUES_SUFFIX
            raise PeftAdapterError(f"{where}: key {mod}{suffix} is missing (its {mod}{other} is there)")
    values, indices = pair[VALUES_SUFFIX], pair[INDICES_SUFFIX]
    vkey, ikey = module + VALUES_SUFFIX, module + INDICES_SUFFIX
    if values.ndim != 1 or values.dtype.kind != "f":
        raise PeftAdapterError(f"{where}: key {printable(vkey)}: expected a 1-D float tensor, got {values.dtype} "
                               f"{list(values.shape)}")
    if indices.ndim != 2 or indices.shape[0] != 2:
        raise PeftAdapterError(f"{where}: key {printable(ikey)}: expected shape [2, nnz] (rows, columns), got "
                               f"{list(indices.shape)}")
    if indices.shape[1] != values.shape[0]:
        raise PeftAdapterError(f"{where}: key {printable(ikey)}: {indices.shape[1]} index pairs but {printable(vkey)} has "
                               f"{values.shape[0]} values")
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        raise PeftAdapterError(f"{where}: key {printable(vkey)}: value {int(bad[0])} is {values[bad[0]]}; the adapter is "
                               f"broken (NaN or inf), retrain it")
    if indices.dtype.kind == "f":  # PEFT stores indices as float32 on Windows
        if not (np.isfinite(indices).all() and (indices == np.round(indices)).all()):
            raise PeftAdapterError(f"{where}: key {printable(ikey)}: float indices that are not whole numbers")
    elif indices.dtype.kind not in "iu":
        raise PeftAdapterError(f"{where}: key {printable(ikey)}: indices of dtype {indices.dtype}, expected int32")
    indices = indices.astype(np.int64)
    return PeftShiraEntry(file, module, indices[0], indices[1], values.astype(np.float32))

"""Reader and writer of the `.shira` adapter format (spec: docs/shira-format.md). numpy only: this runs on device.

    >>> import numpy as np
    >>> from shira_edge.runtime.shira_format import make_target, make_adapter, encode_shira, read_shira
    >>> t = make_target("fc.weight", (4, 8), indices=[9, 2, 30], values=[0.5, -1.0, 2.0], base_digest="0" * 64)
    >>> blob = encode_shira(make_adapter("tiny", [t], dtype="fp16"))
    >>> back = read_shira(blob).targets["fc.weight"]
    >>> back.indices.tolist(), back.delta_values().tolist()
    ([2, 9, 30], [-1.0, 0.5, 2.0])

Every violation found while reading raises ShiraFormatError naming the source, the place (target name or byte
offset) and the problem. Sizes are checked against the file length before anything is allocated, so a hostile
file costs at most O(file size) memory and time.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .fingerprint import base_fingerprint
from .orphans import remove_orphans, temp_prefix
from .untrusted import open_regular, printable

MAGIC = b"\x89SHIRA\r\n"   # high byte and CR LF catch 7-bit and text-mode transfers, as PNG's magic does
VERSION = 1                 # bumped only on breaking changes; additive header keys are ignored by older readers
PREFIX = struct.Struct("<8sII")  # magic, version, header_len
ALIGN = 8                   # every data section starts at a multiple of this (relative to the file start)
MAX_HEADER = 1 << 20        # 1 MiB of JSON holds thousands of targets; more is hostile
MAX_ELEMENTS = 1 << 48      # out*in of one weight; keeps every flat position far inside int64
MAX_STREAM = 1 << 31        # entries in one index stream; with <=32-bit entries their sum cannot overflow int64
MAX_ADAPTER_BYTES = 1 << 34  # 16 GiB: far above any adapter (a dense fp32 copy of a 4B-parameter model)

# dtype name -> little-endian storage dtype. bf16 has no numpy dtype: its raw bits are kept as uint16.
VALUE_DTYPES = {"fp32": np.dtype("<f4"), "fp16": np.dtype("<f2"), "bf16": np.dtype("<u2")}
INDEX_DTYPES = {1: np.dtype("<u1"), 2: np.dtype("<u2"), 4: np.dtype("<u4")}
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")
_FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}\Z")


class ShiraFormatError(ValueError):
    """A .shira file (or an adapter handed to the writer) breaks the spec; the message says what and where."""


@dataclass(frozen=True)
class ShiraTarget:
    name: str               # PyTorch state_dict name of the base weight
    shape: tuple[int, int]  # (out, in), PyTorch layout
    indices: np.ndarray     # int64 [nnz] flat row-major positions row*in+col, strictly increasing
    values: np.ndarray      # [nnz] in the stored dtype (float32, float16, or bf16 bits as uint16)
    scale: float            # delta = scale * values
    base_digest: str        # runtime.fingerprint.weight_digest of the base weight

    @property
    def nnz(self) -> int:
        return int(self.indices.shape[0])

    def delta_values(self) -> np.ndarray:
        """float32 [nnz] = scale * values, multiplied in float32 as PyTorch does for `weight * scaling`."""
        return np.float32(self.scale) * decode_values(self.values)

    def dense_delta(self) -> np.ndarray:
        """The dense float32 (out, in) delta. For tests and tools; the runtime scatters delta_values() instead."""
        out = np.zeros(self.shape[0] * self.shape[1], dtype=np.float32)
        out[self.indices] = self.delta_values()
        return out.reshape(self.shape)


@dataclass(frozen=True)
class ShiraAdapter:
    base_model: dict        # {"name": str, "fingerprint": "sha256:..."}
    dtype: str              # "fp32" | "fp16" | "bf16"
    metadata: dict          # free-form JSON
    targets: dict[str, ShiraTarget] = field(default_factory=dict)


@dataclass(frozen=True)
class TargetLayout:
    """Where one target's sections lie in the file: what `inspect` reports beside the arrays."""

    index_width: int
    index_offset: int       # absolute file offsets
    index_bytes: int
    values_offset: int
    values_bytes: int


# ---------------------------------------------------------------- values


def decode_values(values: np.ndarray) -> np.ndarray:
    """Stored values (float32, float16 or bf16 bits as uint16) -> float32."""
    if values.dtype.kind == "u":  # bf16: the high half of a float32
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float32)


def store_values(values, dtype: str) -> np.ndarray:
    """Float values -> the stored dtype of `dtype` (round to nearest even). uint16 input is taken as bf16 bits."""
    if dtype not in VALUE_DTYPES:
        raise ShiraFormatError(f"dtype {dtype!r} is not one of {', '.join(VALUE_DTYPES)}")
    v = np.asarray(values)
    if dtype == "bf16":
        if v.dtype == np.uint16:
            return v.astype("<u2")
        bits = v.astype(np.float32).view(np.uint32).astype(np.uint64)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return rounded.astype("<u2")
    if v.dtype.kind != "f":
        raise ShiraFormatError(f"values must be floating point for {dtype}, got {v.dtype}")
    with np.errstate(over="ignore"):  # overflow to inf is reported by the finiteness check
        return v.astype(VALUE_DTYPES[dtype])


def _finite(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind == "u":  # bf16 bits: exponent all ones is inf or NaN
        return (values & 0x7F80) != 0x7F80
    return np.isfinite(values)


# ---------------------------------------------------------------- indices


def encode_indices(indices: np.ndarray) -> tuple[int, np.ndarray]:
    """Sorted flat positions -> (width, stream) with the fewest bytes; ties go to the narrower width.

    The stream holds the gaps (the first from 0). A gap g >= E, where E is the width's all-ones value, is written
    as g // E escape entries E followed by g % E, so that `cumsum(stream)[stream != E]` gives the positions back.
    """
    gaps = np.diff(indices.astype(np.int64), prepend=np.int64(0))
    best = None
    for width, dt in INDEX_DTYPES.items():
        esc = np.iinfo(dt).max
        escapes = gaps // esc
        size = (len(gaps) + int(escapes.sum())) * width
        if best is None or size < best[0]:
            best = (size, width, esc, escapes)
    _, width, esc, escapes = best
    n_escapes = int(escapes.sum())
    if n_escapes == 0:
        return width, gaps.astype(INDEX_DTYPES[width])
    stream = np.full(len(gaps) + n_escapes, esc, dtype=INDEX_DTYPES[width])
    stream[np.cumsum(escapes + 1) - 1] = gaps % esc
    return width, stream


def decode_indices(stream: np.ndarray) -> np.ndarray:
    """An index stream -> int64 positions (no checks; read_shira checks what it decodes)."""
    sums = np.cumsum(stream, dtype=np.int64)
    keep = stream != np.iinfo(stream.dtype).max
    return sums if keep.all() else sums[keep]


# ---------------------------------------------------------------- building adapters


def make_target(name: str, shape: Iterable[int], indices, values, *, base_digest: str, scale: float = 1.0,
                dtype: str = "fp32") -> ShiraTarget:
    """A target from entries in any order: sorted by position (values with them) and stored as `dtype`."""
    idx = np.asarray(indices)
    if idx.size == 0:  # an empty list comes in as float64
        idx = idx.astype(np.int64)
    if idx.dtype.kind not in "iu":
        raise ShiraFormatError(f"target {name!r}: indices must be integers, got {idx.dtype}")
    idx = idx.astype(np.int64).reshape(-1)
    vals = store_values(np.asarray(values).reshape(-1), dtype)
    if idx.shape != vals.shape:
        raise ShiraFormatError(f"target {name!r}: {len(idx)} indices but {len(vals)} values")
    order = np.argsort(idx, kind="stable")
    return ShiraTarget(name, tuple(int(d) for d in shape), idx[order], vals[order], float(scale), base_digest)


def make_adapter(name: str, targets: Iterable[ShiraTarget], *, dtype: str = "fp32",
                 metadata: Mapping[str, Any] | None = None) -> ShiraAdapter:
    """An adapter whose base fingerprint is computed from its targets' shapes and base digests."""
    by_name: dict[str, ShiraTarget] = {}
    for t in targets:
        if t.name in by_name:
            raise ShiraFormatError(f"target {t.name!r} given twice")
        by_name[t.name] = t
    fingerprint = base_fingerprint({t.name: (t.shape, t.base_digest) for t in by_name.values()})
    return ShiraAdapter({"name": name, "fingerprint": fingerprint}, dtype, dict(metadata or {}), by_name)


# ---------------------------------------------------------------- writer


def _canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _pad(n: int) -> int:
    return -n % ALIGN


def assemble(header: Mapping[str, Any], data: bytes) -> bytes:
    """Prefix + header JSON (space-padded so that data starts aligned) + data section. Offsets in `header` are
    relative to the data section, so the header can be written without knowing its own length."""
    text = _canonical_json(header)
    text += b" " * _pad(PREFIX.size + len(text))
    if len(text) > MAX_HEADER:
        raise ShiraFormatError(f"header is {len(text)} bytes, over the {MAX_HEADER}-byte cap")
    return PREFIX.pack(MAGIC, VERSION, len(text)) + text + data


def _checked_target(t: ShiraTarget, dtype: str) -> ShiraTarget:
    """The writer's view of a target: validated, entries sorted, values in the stored dtype."""
    where = f"target {t.name!r}"
    if not isinstance(t.name, str) or not t.name:
        raise ShiraFormatError(f"target name must be a non-empty string, got {t.name!r}")
    shape = tuple(int(d) for d in t.shape)
    if len(shape) != 2 or min(shape) < 1 or shape[0] * shape[1] > MAX_ELEMENTS:
        raise ShiraFormatError(f"{where}: shape {t.shape} is not (out, in) with 1 <= out*in <= 2**48")
    if not _HEX64.match(str(t.base_digest)):
        raise ShiraFormatError(f"{where}: base_digest must be 64 lowercase hex digits, got {t.base_digest!r}")
    if not np.isfinite(t.scale):
        raise ShiraFormatError(f"{where}: scale {t.scale} is not finite")
    s = make_target(t.name, shape, t.indices, t.values, base_digest=t.base_digest, scale=t.scale, dtype=dtype)
    if s.nnz and (s.indices[0] < 0 or s.indices[-1] >= shape[0] * shape[1]):
        raise ShiraFormatError(f"{where}: index out of range for shape {shape[0]}x{shape[1]}")
    if s.nnz > 1 and not (np.diff(s.indices) > 0).all():
        raise ShiraFormatError(f"{where}: duplicate index {int(s.indices[1:][np.diff(s.indices) == 0][0])}")
    if not _finite(s.values).all():
        raise ShiraFormatError(f"{where}: values hold NaN or inf (after conversion to {dtype})")
    return s


def encode_shira(adapter: ShiraAdapter) -> bytes:
    """The adapter as .shira bytes. Deterministic: targets sorted by name, entries by position, canonical JSON."""
    dtype = adapter.dtype
    if dtype not in VALUE_DTYPES:
        raise ShiraFormatError(f"dtype {dtype!r} is not one of {', '.join(VALUE_DTYPES)}")
    targets = [_checked_target(t, dtype) for t in sorted(adapter.targets.values(), key=lambda t: t.name)]
    if len({t.name for t in targets}) != len(targets) or any(k != t.name for k, t in adapter.targets.items()):
        raise ShiraFormatError("adapter.targets must map each target's own name to it, once")
    expected = base_fingerprint({t.name: (t.shape, t.base_digest) for t in targets})
    if adapter.base_model.get("fingerprint") != expected:
        raise ShiraFormatError(
            f"base_model fingerprint {adapter.base_model.get('fingerprint')!r} does not match the targets' base "
            f"digests ({expected}); build the adapter with make_adapter() to compute it"
        )

    chunks: list[bytes] = []
    pos = 0  # relative to the data section, which starts aligned

    def section(raw: bytes) -> tuple[int, int]:
        nonlocal pos
        chunks.append(b"\0" * _pad(pos))
        pos += _pad(pos)
        chunks.append(raw)
        start, pos = pos, pos + len(raw)
        return start, len(raw)

    entries = []
    for t in targets:
        width, stream = encode_indices(t.indices)
        i_off, i_len = section(stream.tobytes())
        v_off, v_len = section(t.values.tobytes())
        entries.append({
            "name": t.name, "shape": list(t.shape), "nnz": t.nnz, "scale": t.scale, "base_digest": t.base_digest,
            "index_width": width, "index_offset": i_off, "index_length": i_len,
            "values_offset": v_off, "values_length": v_len,
        })
    header = {"base_model": dict(adapter.base_model), "dtype": dtype, "metadata": adapter.metadata,
              "targets": entries}
    try:
        return assemble(header, b"".join(chunks))
    except (TypeError, ValueError) as exc:  # metadata that JSON cannot hold
        if isinstance(exc, ShiraFormatError):
            raise
        raise ShiraFormatError(f"header cannot be written as JSON: {exc}") from None


def write_shira(path: str | os.PathLike, adapter: ShiraAdapter) -> Path:
    """Encode and write atomically: a temp file in the same directory, fsync, then os.replace."""
    path = Path(path)
    blob = encode_shira(adapter)  # before touching the filesystem: a bad adapter leaves nothing behind
    remove_orphans(path.parent, path.name)   # temp files of writers that were killed (SIGKILL)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ---------------------------------------------------------------- reader


def read_shira(source: str | os.PathLike | bytes | bytearray | memoryview) -> ShiraAdapter:
    """Read and check a .shira file or buffer. Paths are memory-mapped; values are views into the map."""
    return read_shira_layout(source)[0]


def read_shira_bytes(data: bytes, label: str = "<bytes>") -> ShiraAdapter:
    """read_shira of bytes already read from somewhere; `label` names that place in errors."""
    return _Reader(np.frombuffer(data, dtype=np.uint8), label).read()[0]


def read_shira_layout(source) -> tuple[ShiraAdapter, dict[str, TargetLayout]]:
    """read_shira plus where each target's sections lie in the file (for `inspect`)."""
    buf, label = _open(source)
    return _Reader(buf, label).read()


def _open(source) -> tuple[np.ndarray, str]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return np.frombuffer(source, dtype=np.uint8), "<bytes>"
    path = Path(source)
    label = printable(path)
    try:
        fd = open_regular(path, "adapter")   # a FIFO or device would block or never end
    except OSError as exc:
        raise ShiraFormatError(f"{label}: cannot read: {printable(exc.strerror or exc)}") from None
    try:
        size = os.fstat(fd).st_size
        if size > MAX_ADAPTER_BYTES:
            raise ShiraFormatError(f"{label}: {size} bytes is over the {MAX_ADAPTER_BYTES}-byte cap for an adapter")
        if size == 0:  # mmap refuses empty files
            return np.zeros(0, dtype=np.uint8), label
        mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    except OSError as exc:
        raise ShiraFormatError(f"{label}: cannot read: {printable(exc.strerror or exc)}") from None
    finally:
        os.close(fd)
    return np.frombuffer(mm, dtype=np.uint8), label


class _Reader:
    def __init__(self, buf: np.ndarray, label: str):
        self.buf, self.label, self.size = buf, label, len(buf)

    def fail(self, where: str, what: str):
        raise ShiraFormatError(f"{self.label}: {where}: {what}")

    def read(self) -> tuple[ShiraAdapter, dict[str, TargetLayout]]:
        header, data_start = self._header()
        dtype = header.get("dtype")
        if not isinstance(dtype, str) or dtype not in VALUE_DTYPES:
            self.fail("header", f"dtype {_short(dtype)} is not one of {', '.join(VALUE_DTYPES)}")
        base = header.get("base_model")
        if not (isinstance(base, dict) and isinstance(base.get("name"), str)
                and isinstance(base.get("fingerprint"), str) and _FINGERPRINT.match(base["fingerprint"])):
            self.fail("header", 'base_model must be {"name": str, "fingerprint": "sha256:<64 hex>"}')
        metadata = header.get("metadata", {})
        if not isinstance(metadata, dict):
            self.fail("header", "metadata must be a JSON object")
        entries = header.get("targets")
        if not isinstance(entries, list):
            self.fail("header", "targets must be a list")

        layouts = [self._entry(i, e, data_start, dtype) for i, e in enumerate(entries)]
        names = [e["name"] for e in entries]
        for a, b in zip(names, names[1:]):
            if not a < b:
                self.fail(f"target {_short(b)}", "targets must be sorted by name with no duplicates")
        self._check_tiling(names, layouts, data_start)

        targets = {e["name"]: self._target(e, lay, dtype) for e, lay in zip(entries, layouts)}
        expected = base_fingerprint({t.name: (t.shape, t.base_digest) for t in targets.values()})
        if base["fingerprint"] != expected:
            self.fail("header", f"base_model.fingerprint {base['fingerprint']} does not match the targets' "
                                f"shapes and base digests ({expected})")
        adapter = ShiraAdapter(dict(base), dtype, metadata, targets)
        return adapter, dict(zip(names, layouts))

    def _header(self) -> tuple[dict, int]:
        if self.size < PREFIX.size:
            self.fail("offset 0", f"truncated: {self.size} bytes, shorter than the {PREFIX.size}-byte prefix")
        magic, version, header_len = PREFIX.unpack(self.buf[:PREFIX.size].tobytes())
        if magic != MAGIC:
            self.fail("offset 0", f"bad magic {magic!r}: not a .shira file")
        if version != VERSION:
            self.fail("offset 8", f"unsupported version {version} (this reader reads version {VERSION})")
        if header_len > MAX_HEADER:
            self.fail("offset 12", f"header length {header_len} is over the {MAX_HEADER}-byte cap")
        if _pad(PREFIX.size + header_len):
            self.fail("offset 12", f"header length {header_len} does not end on an {ALIGN}-byte boundary")
        data_start = PREFIX.size + header_len
        if data_start > self.size:
            self.fail("offset 12", f"truncated: header needs bytes {PREFIX.size}..{data_start}, "
                                   f"file has {self.size}")
        try:
            header = json.loads(self.buf[PREFIX.size:data_start].tobytes().decode("utf-8"),
                                parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            self.fail(f"header at offset {PREFIX.size}", f"not valid UTF-8 JSON: {str(exc)[:120]}")
        if not isinstance(header, dict):
            self.fail(f"header at offset {PREFIX.size}", "must be a JSON object")
        return header, data_start

    def _entry(self, i: int, e: Any, data_start: int, dtype: str) -> TargetLayout:
        if not isinstance(e, dict) or not isinstance(e.get("name"), str) or not e["name"]:
            self.fail(f"targets[{i}]", "must be an object with a non-empty string name")
        where = f"target {_short(e['name'])}"
        shape = e.get("shape")
        if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(d) and d >= 1 for d in shape)):
            self.fail(where, f"shape {_short(shape)} is not [out, in] with positive integers")
        if shape[0] * shape[1] > MAX_ELEMENTS:
            self.fail(where, f"shape {shape[0]}x{shape[1]} has more than 2**48 elements")
        for key in ("nnz", "index_offset", "index_length", "values_offset", "values_length"):
            if not (_is_int(e.get(key)) and e[key] >= 0):
                self.fail(where, f"{key} {_short(e.get(key))} is not a non-negative integer")
        if e["nnz"] > shape[0] * shape[1]:
            self.fail(where, f"nnz {e['nnz']} is more than the {shape[0] * shape[1]} elements of the shape")
        scale = e.get("scale")
        if not _finite_number(scale):
            self.fail(where, f"scale {_short(scale)} is not a finite number")
        if not (isinstance(e.get("base_digest"), str) and _HEX64.match(e["base_digest"])):
            self.fail(where, "base_digest is not 64 lowercase hex digits")
        width = e.get("index_width")
        if not _is_int(width) or width not in INDEX_DTYPES:
            self.fail(where, f"index_width {_short(width)} is not 1, 2 or 4")
        layout = TargetLayout(width, data_start + e["index_offset"], e["index_length"],
                              data_start + e["values_offset"], e["values_length"])
        for part, off, n in (("indices", layout.index_offset, layout.index_bytes),
                             ("values", layout.values_offset, layout.values_bytes)):
            if off + n > self.size:
                self.fail(f"{where} {part} at offset {off}", f"truncated: needs {n} bytes, file ends at {self.size}")
        if layout.values_bytes != e["nnz"] * VALUE_DTYPES[dtype].itemsize:
            self.fail(f"{where} values at offset {layout.values_offset}",
                      f"{layout.values_bytes} bytes do not hold nnz={e['nnz']} {dtype} values")
        if layout.index_bytes % width or layout.index_bytes // width > MAX_STREAM:
            self.fail(f"{where} indices at offset {layout.index_offset}",
                      f"{layout.index_bytes} bytes is not a whole number of {width}-byte entries (at most 2**31)")
        if layout.index_bytes // width < e["nnz"]:
            self.fail(f"{where} indices at offset {layout.index_offset}",
                      f"{layout.index_bytes // width} entries cannot hold nnz={e['nnz']} indices")
        return layout

    def _check_tiling(self, names: list[str], layouts: list[TargetLayout], data_start: int) -> None:
        """Sections must follow each other with only alignment padding (zeros) between them, up to the file end."""
        sections = sorted(
            [(lay.index_offset, lay.index_bytes, f"target {_short(n)} indices") for n, lay in zip(names, layouts)]
            + [(lay.values_offset, lay.values_bytes, f"target {_short(n)} values") for n, lay in zip(names, layouts)]
        )
        end, prev = data_start, "the header"
        for off, n, what in sections:
            if off < end:
                self.fail(f"{what} at offset {off}", f"overlaps {prev}, which ends at offset {end}")
            if off != end + _pad(end):
                self.fail(f"{what} at offset {off}", f"hole after {prev}: expected offset {end + _pad(end)}")
            if self.buf[end:off].any():
                self.fail(f"padding at offset {end}", "alignment padding must be zero bytes")
            end, prev = off + n, what
        if end != self.size:
            self.fail(f"offset {end}", f"{self.size - end} trailing bytes after the last section "
                                       f"(data must end at the end of the file)")

    def _target(self, e: dict, lay: TargetLayout, dtype: str) -> ShiraTarget:
        name, nnz, (rows, cols) = e["name"], e["nnz"], e["shape"]
        where = f"target {_short(name)}"
        idt = INDEX_DTYPES[lay.index_width]
        stream = self.buf[lay.index_offset:lay.index_offset + lay.index_bytes].view(idt)
        at = f"{where} indices at offset {lay.index_offset}"
        if len(stream) and stream[-1] == np.iinfo(idt).max:
            self.fail(at, "index stream ends inside an escape run")
        indices = decode_indices(stream)
        if len(indices) != nnz:
            self.fail(at, f"stream decodes to {len(indices)} indices, header says nnz={nnz}")
        if nnz > 1:
            bad = np.flatnonzero(np.diff(indices) <= 0)
            if len(bad):
                k = int(bad[0]) + 1
                self.fail(at, f"indices not strictly increasing: entry {k} is {int(indices[k])} after "
                              f"{int(indices[k - 1])}")
        if nnz and indices[-1] >= rows * cols:
            self.fail(at, f"index {int(indices[-1])} out of range for shape {rows}x{cols}")
        values = self.buf[lay.values_offset:lay.values_offset + lay.values_bytes].view(VALUE_DTYPES[dtype])
        bad = np.flatnonzero(~_finite(values))
        if len(bad):
            k = int(bad[0])
            self.fail(f"{where} values at offset {lay.values_offset + k * values.itemsize}",
                      f"value {k} is NaN or inf")
        return ShiraTarget(name, (rows, cols), indices, values, float(e["scale"]), e["base_digest"])


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _finite_number(x: Any) -> bool:
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return False
    try:
        return bool(np.isfinite(float(x)))
    except OverflowError:  # a JSON integer beyond float range
        return False


def _reject_constant(name: str):
    raise ValueError(f"{name} is not allowed in the header")


def _short(x: Any, limit: int = 80) -> str:
    """repr() of untrusted header content, cut short; repr escapes control characters."""
    text = repr(x)
    return text if len(text) <= limit else text[:limit] + "..."

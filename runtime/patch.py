"""Adapter -> patch plan: positions in the backend's flat weight buffer and the final float32 values to write there.

All the work of a switch happens here, once per adapter (and once per combination of adapters and scales); the
result is cached by the runtime, and a switch is then two calls of `scatter_into`: write the live plan's saved base
values back, write the new plan's values.

- `Slot` says where one manifest weight sits in the backend buffer (start element, layout) and where its pristine
  base bytes are on disk (file, offset).
- `prepare_adapter` reads and validates a `.shira` against the slots (fingerprint, per-target digest, patchable,
  shape, finite values) and maps its row-major (out, in) indices to buffer positions with runtime/layout.py
  (`transposed` layout stores W[r, c] at c * out + r; slices of fused tensors, row permutations and packed layouts
  are mapped there too).
- `compose` turns [(adapter, scale), ...] into a `Plan`: the sorted union of positions, the base values there (read
  from the export's own files, so a plan never depends on what is live), and base + s1*d1 + s2*d2 ... computed in
  float32 in that order, the order PEFT merges adapters in, so the result equals PEFT's merged weights bit for bit.

    >>> import numpy as np
    >>> slot = Slot("w", out=2, inp=3, layout="transposed", start=10, file=None, offset=0, digest="", patchable=True)
    >>> buffer_positions(slot, np.array([1, 5]))       # W[0,1] -> 1*2+0, W[1,2] -> 2*2+1, plus start
    array([12, 15])
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .fingerprint import weight_digest
from .layout import buffer_positions, file_elements, tensor_elements, tensor_shape
from .shira_format import MAX_ADAPTER_BYTES, ShiraFormatError, decode_values, read_shira, read_shira_bytes
from .untrusted import open_regular, printable, read_regular


class AdapterMismatch(ValueError):
    """The adapter cannot be applied to this export; the message names the adapter, the target and what to do."""


@dataclass(frozen=True)
class Slot:
    """Where one manifest weight lives; runtime/layout.py maps its (row, col) through these fields."""

    name: str            # PyTorch state_dict name
    out: int
    inp: int
    layout: str          # "as_is": T[o, c]; "transposed": T[c, o] (o = out_offset + row_perm[r])
    start: int           # first element of the backend tensor T in the backend's flat float32 buffer
    file: Path | None    # pristine base bytes of T: the export's own file ...
    offset: int          # ... at this byte offset, row-major `tensor_shape`
    digest: str
    patchable: bool
    tensor_shape: tuple[int, int] | None = None   # (R, C) of T; None: (out, inp), reversed when transposed
    out_offset: int = 0                            # where this weight's outputs start in T (fused tensors)
    row_perm: np.ndarray | None = field(default=None, compare=False)   # PyTorch row r -> output row_perm[r]
    packing: object | None = field(default=None, compare=False)        # a layout.MlasPackedB / TablePacking

    @property
    def tensor_size(self) -> int:
        rows, cols = tensor_shape(self)
        return rows * cols


_FILE_VIEWS: "weakref.WeakKeyDictionary[Slot, Slot]" = weakref.WeakKeyDictionary()


def file_view(slot: Slot) -> Slot:
    """The slot as the export's file stores it (T row-major from element 0, unpacked): what read_base reads.

    An unpacked slot is its own view. A packed slot's view is made once and lives as long as the slot, so that
    pin_base / read_base see one object per weight."""
    if slot.packing is None:
        return slot
    view = _FILE_VIEWS.get(slot)
    if view is None:
        view = _FILE_VIEWS.setdefault(slot, replace(slot, start=0, packing=None))
    return view


def buffer_order(slot: Slot, sorted_indices: np.ndarray) -> np.ndarray | None:
    """The permutation that sorts buffer positions of strictly increasing row-major indices (None: already sorted).

    Transposed buffers are ordered by (col, row); a stable sort on the column alone gives that, since rows already
    increase, and a narrow key lets numpy use its linear-time radix sort.
    """
    plain = slot.packing is None and slot.row_perm is None
    if plain and slot.layout == "as_is":
        return None
    if not plain:   # permuted or packed: sort the positions themselves
        return np.argsort(buffer_positions(slot, sorted_indices), kind="stable")
    cols = np.asarray(sorted_indices) % slot.inp
    key = cols.astype(np.uint16) if slot.inp <= 1 << 16 else cols
    return np.argsort(key, kind="stable")




class BaseChanged(RuntimeError):
    """The export's data file was modified in place (or truncated) since the runtime loaded it."""


class PinnedFile:
    """One data file, opened when the runtime loaded the export and read with pread for as long as it runs: a file
    replaced by rename (a re-export with --force, an update) no longer matters to it."""

    def __init__(self, path):
        self.path = Path(path)
        self.fd = open_regular(self.path, "export data file")

    def identity(self) -> tuple:
        st = os.fstat(self.fd)   # ctime moves on every write and cannot be set back, unlike mtime
        return st.st_size, st.st_mtime_ns, st.st_ctime_ns

    def pread(self, offset: int, nbytes: int) -> bytes:
        data = os.pread(self.fd, nbytes, offset)
        if len(data) != nbytes:
            raise BaseChanged(f"{printable(self.path)}: truncated since the runtime loaded it (bytes "
                              f"{offset}..{offset + nbytes} are gone); load the export again")
        return data

    def __del__(self):
        fd, self.fd = getattr(self, "fd", None), None
        if fd is not None:
            os.close(fd)


@dataclass
class _Pin:
    file: PinnedFile
    identity: tuple | None   # the file's identity when its bytes were last known to be the slot's; None: unknown


_PINS: "weakref.WeakKeyDictionary[Slot, _Pin]" = weakref.WeakKeyDictionary()
_PINS_LOCK = threading.Lock()


def pin_base(slots) -> None:
    """Open the data files of `slots` now (at load), so that read_base reads the bytes that were loaded.

    Backends (or the Runtime) call this once, right after reading their buffers; a slot never pinned is pinned
    on its first read_base, which then checks its bytes against the manifest digest first."""
    files: dict[Path, PinnedFile] = {}
    for slot in slots:
        if slot.file is None:
            continue
        pinned = files.get(slot.file) or files.setdefault(slot.file, PinnedFile(slot.file))
        with _PINS_LOCK:
            _PINS[slot] = _Pin(pinned, pinned.identity())


def read_base(slot: Slot, positions: np.ndarray) -> np.ndarray:
    """Base values at buffer positions of one slot, from the export's file (never from the live, patched buffer).

    The values are those the runtime loaded: the file is read through the descriptor pin_base opened at load, and
    if that file was modified in place since, this slot's bytes are checked against its manifest digest (equal:
    read on; different or truncated: BaseChanged, never other values). Stable API: (Slot, int64 positions) ->
    float32, positions counted from slot.start in the slot's stored layout."""
    with _PINS_LOCK:
        pin = _PINS.get(slot)
    if pin is None:
        pin = _Pin(PinnedFile(slot.file), None)
        with _PINS_LOCK:
            pin = _PINS.setdefault(slot, pin)
    now = pin.file.identity()
    if now != pin.identity:
        _verify(slot, pin.file)
        pin.identity = now
    # A plain read of the span touched, not a kept memmap: a mapping would keep the pages it touched (at 1% random
    # density, nearly all of them) resident in this process long after the plan is built.
    at = np.asarray(positions, dtype=np.int64) - slot.start
    if at.size == 0:
        return np.zeros(0, np.float32)
    lo, hi = int(at.min()), int(at.max()) + 1
    rows, cols = tensor_shape(slot)
    if lo < 0 or hi > rows * cols:
        raise IndexError(f"{slot.name}: positions {lo + slot.start}..{hi + slot.start} are outside its tensor")
    span = np.frombuffer(pin.file.pread(slot.offset + 4 * lo, 4 * (hi - lo)), "<f4")
    return span[at - lo].astype(np.float32)


def _verify(slot: Slot, file: PinnedFile) -> None:
    if not slot.digest:   # a hand-made slot (tests, tools) has no digest to check against
        return
    rows, cols = tensor_shape(slot)
    stored = np.frombuffer(file.pread(slot.offset, 4 * rows * cols), "<f4")
    # PyTorch (out, in), as digested, through the one weight map (slices, row_perm, transposes)
    weight = stored[tensor_elements(slot, np.arange(slot.out)[:, None], np.arange(slot.inp)[None, :])]
    if weight_digest(weight) != slot.digest:
        raise BaseChanged(f"{printable(file.path)}: {slot.name} no longer holds the weights this runtime loaded "
                          f"(the file was rewritten since); load the export again")


@dataclass(frozen=True)
class Target:
    """One adapter target, mapped: buffer positions sorted ascending, with the raw float32 values and file scale."""

    slot: Slot
    positions: np.ndarray
    values: np.ndarray
    scale: float

    def delta(self, user_scale: float) -> np.ndarray:
        # One float32 multiply by the combined scale, as PEFT does (shira_weight * scaling). An overflow here is
        # caught and refused by compose() with a clear message, so numpy's own warning would only be noise.
        with np.errstate(over="ignore"):
            return self.values * np.float32(self.scale * user_scale)


@dataclass(frozen=True)
class PreparedAdapter:
    """A validated adapter, mapped into one export's buffer. Hashable by `key`; cached by the runtime."""

    name: str
    key: str
    targets: tuple[Target, ...]

    @property
    def nnz(self) -> int:
        return sum(t.positions.size for t in self.targets)


@dataclass(frozen=True)
class Plan:
    """What one live state writes: final values at sorted positions, and the base values to restore there."""

    active: tuple[tuple[str, float], ...]
    positions: np.ndarray   # int64, strictly increasing
    values: np.ndarray      # float32 final weights
    base: np.ndarray        # float32 base weights at the same positions

    @property
    def nbytes(self) -> int:
        return self.positions.nbytes + self.values.nbytes + self.base.nbytes


BASE_PLAN = Plan((), np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.float32))


_KEY_MEMO: dict[str, tuple[tuple, str]] = {}   # path -> (stat identity, content key), for unchanged files
RACY_S = 2.0   # a file changed this recently may change again within one timestamp tick: hash it every time
KEY_MEMO_SIZE = 4096
_KEY_LOCK = threading.Lock()


def adapter_key(source, content: bytes | None = None) -> str:
    """Cache key of an adapter source: its content (SHA-256), for files and bytes alike.

    For a file, the hash is memoised per (device, inode, size, mtime, ctime), so a cache hit costs one stat; ctime
    moves on every write and cannot be set back, so even an in-place rewrite that restores the mtime is seen. Like
    git's "racily clean" rule, a file changed within RACY_S of hashing is hashed again next time. `content`: the
    file's bytes, already read (prepare_adapter hashes exactly the bytes it parses)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "bytes:" + hashlib.sha256(source).hexdigest()
    path = Path(source).expanduser().resolve()
    try:
        st = path.stat()
    except OSError as exc:
        raise FileNotFoundError(f"adapter {printable(source)}: {exc.strerror}; pass the path of a .shira file") \
            from None
    ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if content is not None:   # read before this stat: its identity may be newer than the bytes, so no memo
        return f"file:{path}:{hashlib.sha256(content).hexdigest()}"
    with _KEY_LOCK:
        memo = _KEY_MEMO.get(str(path))
    if memo is not None and memo[0] == ident:
        return memo[1]
    # Stat first, then read: if the file changes meanwhile, the memo maps the old identity, which never recurs.
    key = f"file:{path}:{hashlib.sha256(_read_adapter(path)).hexdigest()}"
    with _KEY_LOCK:
        if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > RACY_S * 1e9:
            if len(_KEY_MEMO) >= KEY_MEMO_SIZE:   # an app streaming through many adapters: forget the oldest
                del _KEY_MEMO[next(iter(_KEY_MEMO))]
            _KEY_MEMO[str(path)] = (ident, key)
        else:
            _KEY_MEMO.pop(str(path), None)
    return key


def _read_adapter(path: Path) -> bytes:
    try:
        return read_regular(path, "adapter", limit=MAX_ADAPTER_BYTES)
    except (OSError, ValueError) as exc:
        raise ShiraFormatError(f"{printable(path)}: cannot read: {printable(getattr(exc, 'strerror', None) or exc)}") \
            from None


def adapter_name(source, adapter) -> str:
    if not isinstance(source, (bytes, bytearray, memoryview)):
        return Path(source).stem
    meta = getattr(adapter, "metadata", None) or {}
    return str(meta.get("name") or adapter_key(source)[6:18])


def prepare_adapter(source, slots: dict[str, Slot], fingerprint_of) -> PreparedAdapter:
    """Read, validate and map one adapter. Raises AdapterMismatch (or the reader's ShiraFormatError); touches nothing.

    `fingerprint_of(names)` returns the export's fingerprint over those weights (from the manifest).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        key, adapter = adapter_key(source), read_shira(bytes(source))
    else:   # one read: the key is the hash of exactly the bytes parsed, even if the file changes meanwhile
        content = _read_adapter(Path(source).expanduser())
        key, adapter = adapter_key(source, content), read_shira_bytes(content, printable(source))
    name = adapter_name(source, adapter)
    where = f"adapter {name!r} ({'bytes' if key.startswith('bytes:') else printable(source)})"

    for tname, t in adapter.targets.items():
        slot = slots.get(tname)
        if slot is None:
            raise AdapterMismatch(f"{where}: target {tname!r} is not a weight of this export; the adapter was made "
                                  f"for another model or with --targets this export does not have")
        if not slot.patchable:
            raise AdapterMismatch(f"{where}: target {tname!r} is not patchable in this export ({slot.layout}); "
                                  f"train the adapter without it")
        if tuple(t.shape) != (slot.out, slot.inp):
            raise AdapterMismatch(f"{where}: target {tname!r} has shape {tuple(t.shape)} but the export's weight "
                                  f"is {(slot.out, slot.inp)}")
        if t.base_digest and t.base_digest != slot.digest:
            raise AdapterMismatch(f"{where}: target {tname!r} was made for different base weights (digest "
                                  f"{t.base_digest[:12]}... vs export {slot.digest[:12]}...); pack it against this "
                                  f"base model")
    expected = fingerprint_of(list(adapter.targets))
    got = (adapter.base_model or {}).get("fingerprint")
    if got != expected:
        raise AdapterMismatch(f"{where}: base fingerprint {got} does not match this export's {expected} over the "
                              f"adapter's targets; the adapter was made for another base model")

    targets = []
    for tname in sorted(adapter.targets, key=lambda n: slots[n].start):
        t = adapter.targets[tname]
        try:
            values, scale = decode_values(np.asarray(t.values)), float(t.scale)
        except (TypeError, ValueError) as exc:
            raise AdapterMismatch(f"{where}: target {tname!r}: values do not convert to float32 ({exc})") from None
        if not np.isfinite(values).all() or not np.isfinite(np.float32(scale)):
            raise AdapterMismatch(f"{where}: target {tname!r} has non-finite values or scale")
        positions = buffer_positions(slots[tname], t.indices)
        order = buffer_order(slots[tname], t.indices)
        if order is not None:
            positions, values = positions[order], values[order]
        targets.append(Target(slots[tname], positions, values, scale))
    return PreparedAdapter(name, key, tuple(targets))


def compose(parts: list[tuple[PreparedAdapter, float]]) -> Plan:
    """The live state for adapters at scales: base + s1*d1 + s2*d2 ..., in float32, in the given order (PEFT's)."""
    if not parts:
        return BASE_PLAN
    by_slot: dict[str, list[tuple[Target, float]]] = {}
    for adapter, scale in parts:
        for t in adapter.targets:
            by_slot.setdefault(t.slot.name, []).append((t, scale))
    pos_chunks, val_chunks, base_chunks = [], [], []
    for group in sorted(by_slot.values(), key=lambda g: g[0][0].slot.start):
        slot = group[0][0].slot
        positions = group[0][0].positions if len(group) == 1 else np.unique(np.concatenate([t.positions for t, _ in group]))
        view = file_view(slot)
        base = read_base(view, file_elements(slot, positions) + view.start)
        values = base.copy()
        with np.errstate(over="ignore", invalid="ignore"):   # checked just below
            for t, scale in group:
                at = np.searchsorted(positions, t.positions)
                values[at] = values[at] + t.delta(scale)
        if not np.isfinite(values).all():
            bad = ", ".join(f"{a.name}@{s}" for a, s in parts)
            raise AdapterMismatch(f"{slot.name}: base + scaled delta overflows float32 for {bad}; use smaller scales")
        pos_chunks.append(positions), val_chunks.append(values), base_chunks.append(base)
    active = tuple((a.name, float(s)) for a, s in parts)
    positions, values, base = (np.concatenate(c) for c in (pos_chunks, val_chunks, base_chunks))
    if positions.size > 1 and np.any(np.diff(positions) <= 0):   # weights sharing one fused tensor interleave
        order = np.argsort(positions, kind="stable")
        positions, values, base = positions[order], values[order], base[order]
    return Plan(active, positions, values, base)

"""The packed-in-place switch for ONNX Runtime: adapters are written straight into the packed (MLAS packed-B) weights
a live session computes with, so a switch is a scatter and the next run is at the base model's speed.

Start-up (`PackedInPlace`), all of it before the runtime accepts a switch:

1. **Layout, probed here.** For every distinct (K, N) of the patchable weights a one-MatMul model whose weight
   element e holds the float32 with bit pattern 0x3f800000 + e is saved by ORT with its prepacked weights
   (`session.save_external_prepacked_constant_initializers=1`); where each pattern landed gives the offset of
   element e (`probe_layout`). If that equals the MLAS closed form (layout.MlasPackedB) the closed form is kept (no
   table); otherwise the probed table is (layout.TablePacking).
2. **Pack cache** (`write_pack_cache`). One data file holding every initializer of the export and, next to each
   weight that only MatMuls read, ORT's packed copy of it, with the export's graph pointing at both. ORT packs the
   weights a few MB at a time in models of bare MatMuls and files each blob under "MatMul+<hash of the packed
   bytes>", the key the export's own MatMul kernel looks up at load. (Letting one ORT session save the whole
   export packed held its weights, their heap-packed copies and the whole file at once: 2.1x a plain session's
   memory at the peak, against 1.3-1.4x this way.) It goes into a fresh private directory on a tmpfs
   (`pack_dir()`). ORT refuses a memfd's /proc/self/fd/N path (its external-data check canonicalises it to
   "/memfd:... (deleted)"), and any location outside the model's directory, so the directory is on /dev/shm; it is
   unlinked as soon as the packed session and our mapping are open, so nothing outlives the process, and a
   directory left by a process that died during the few seconds before is removed at the next start
   (`remove_stale`). The cache is built from the export at every start, never reused: a crash mid-switch cannot
   leave patched "base" weights behind.
3. **One packed session** over it. ORT maps the data file (MAP_PRIVATE) and its MatMul kernels read the packed
   blobs from that mapping. We map the same file MAP_SHARED (`np.memmap(mode="r+")`) as the patch target `flat`;
   writes through it reach the session's mapping through the page cache.
4. **Release, verify.** The unpacked originals of the patchable tensors that only MatMuls read are released
   (fallocate PUNCH_HOLE), and the logits must stay bit-identical; if not, they are written back. Every patchable
   tensor's packed blob must equal the export's tensor placed through the probed layout, bit for bit (padding
   zero).
5. **Self-test** (backend.live_patch_self_test). Double a patchable tensor in the packed cache: the logits must
   move; restore it. Every tensor of the first and the last layer, and one per layer in between, roles in turn;
   then the logits must be bit-identical to before.

Any failure raises PackedPathUnavailable with the reason; the ONNX backend then falls back to rebuilding sessions.

What this relies on that ORT does not promise (all checked by 1-5 on the running machine and ORT build): that the
session reads packed weights from the mapped file rather than a private copy, that a blob packed in a bare MatMul
model is the one the export's MatMul asks for, that the session never writes to that mapping, keeps the saved
layout, and does not read the unpacked originals after it was created.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from . import onnx_proto, tmpfs
from .backend import SelfTestFailed, live_patch_self_test, patchable_tensors
from .layout import MlasPackedB, TablePacking, tensor_shape
from .manifest import tensor_shape as entry_tensor_shape

PREFIX = "shira-edge-pack-"
ONE_BITS = 0x3F800000                  # float32 1.0: probe value of element e is the float with bits ONE_BITS + e
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2
PAGE = os.sysconf("SC_PAGE_SIZE")
CHUNK_BYTES = 16 << 20                 # weights ORT packs per chunk while the pack cache is written


class PackedPathUnavailable(RuntimeError):
    """The packed-in-place switch cannot run here (message: why); the backend falls back to rebuilding."""


# ---------------------------------------------------------------- where the cache lives


def pack_dir() -> Path:
    """runtime/tmpfs.py's pack_dir, failing the way this path falls back."""
    try:
        return tmpfs.pack_dir()
    except tmpfs.NoTmpfs as exc:
        raise PackedPathUnavailable(str(exc)) from None


def remove_stale(root: Path) -> None:
    """Remove pack-cache directories of processes that no longer exist (they died during their start-up)."""
    for d in root.glob(PREFIX + "*"):
        try:
            pid = int(d.name[len(PREFIX):].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, PermissionError, OSError):
            continue


# ---------------------------------------------------------------- saving a packed model


def save_packed(ort, model, options, out_dir: Path, data_name: str) -> tuple[Path, Path]:
    """Let ORT write `model` (path or bytes) optimized, with its prepacked weights, into out_dir: (model, data)."""
    out_model = out_dir / (data_name + ".onnx")
    options.optimized_model_filepath = str(out_model)
    options.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", data_name)
    ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                         providers=["CPUExecutionProvider"])
    return out_model, out_dir / data_name


class _Appender:
    """Appends tensors to the pack cache's data file at aligned offsets; returns their external-data entries."""

    def __init__(self, path: Path):
        self.name, self.file, self.size = path.name, open(path, "wb"), 0

    def put(self, data) -> tuple[int, int]:
        # Page-aligned tensors are mapped by ORT, not read into its heap; 64 bytes keep small ones SIMD-aligned.
        align = PAGE if len(data) >= PAGE else 64
        pad = -self.size % align
        self.file.write(b"\0" * pad)
        self.file.write(data)
        at, self.size = self.size + pad, self.size + pad + len(data)
        return at, len(data)

    def entries(self, at: int, length: int) -> list[tuple[str, str]]:
        return [("location", self.name), ("offset", str(at)), ("length", str(length))]


def _tensor_bytes(init: onnx_proto.Initializer, export_dir: Path, files: dict) -> bytes | None:
    """The data of one initializer of the (untrusted) export: inline raw data, or its checked external range."""
    if not init.external:
        return init.raw
    location = init.external.get("location", "")
    path = (export_dir / location).resolve()
    if Path(location).is_absolute() or path.parent != export_dir.resolve() or not path.is_file():
        raise PackedPathUnavailable(f"{init.name}: external data location {location!r} is not a file of the export")
    try:
        offset, length = int(init.external.get("offset", 0)), int(init.external["length"])
    except (KeyError, ValueError):
        raise PackedPathUnavailable(f"{init.name}: external data offset/length are not integers") from None
    f = files.get(path) or files.setdefault(path, open(path, "rb"))
    if offset < 0 or length < 0 or offset + length > os.fstat(f.fileno()).st_size:
        raise PackedPathUnavailable(f"{init.name}: external data [{offset}, +{length}) lies outside {location}")
    f.seek(offset)
    return f.read(length)


def write_pack_cache(ort, export_model: Path, make_options, out_dir: Path, data_name: str,
                     chunk_bytes: int = CHUNK_BYTES) -> tuple[Path, Path]:
    """Write the export as a model whose initializers all live in one data file in out_dir, together with ORT's packed
    copy of every weight that only MatMuls read: (model, data). Step 2 of the module docstring: ORT packs
    `chunk_bytes` of weights at a time, so the peak is the file plus one chunk, not the file plus every weight twice.
    The export is untrusted: an external-data location outside its directory, or a range past its file, is refused."""
    export = export_model.read_bytes()
    b_weights = onnx_proto.matmul_weights(export)
    out, files, external = _Appender(out_dir / data_name), {}, {}
    chunk: list[tuple[str, np.ndarray]] = []

    def flush():
        model, data = save_packed(ort, onnx_proto.matmuls_model(chunk), make_options(), out_dir, "chunk")
        try:
            saved = {i.name: i for i in onnx_proto.initializers(model.read_bytes())}
            with open(data, "rb") as f:
                for name, _ in chunk:
                    blobs = saved[name].prepacked_blobs()
                    if len(blobs) != 1:
                        raise PackedPathUnavailable(f"ORT saved {len(blobs)} packed blobs of {name}, not one")
                    f.seek(blobs[0].offset)
                    at, _ = out.put(f.read(blobs[0].length))
                    external[name].append(blobs[0].at(at))
        finally:
            model.unlink(missing_ok=True)
            data.unlink(missing_ok=True)
        chunk.clear()

    try:
        for init in onnx_proto.initializers(export):
            packable = init.name in b_weights and init.data_type == onnx_proto.FLOAT and len(init.dims) == 2
            if not (init.external or packable):   # small inline constants stay as they are
                continue
            data = _tensor_bytes(init, export_model.parent, files)
            if data is None:
                continue
            external[init.name] = out.entries(*out.put(data))
            if packable:
                chunk.append((init.name, np.frombuffer(data, "<f4").reshape(init.dims)))
                if sum(w.nbytes for _, w in chunk) >= chunk_bytes:
                    flush()
        if chunk:
            flush()
    finally:
        out.file.close()
        for f in files.values():
            f.close()
    model = out_dir / (data_name + ".onnx")
    model.write_bytes(onnx_proto.with_external_data(export, external))
    return model, out_dir / data_name


def blob_of(init: onnx_proto.Initializer, where: str) -> tuple[int, int]:
    """(offset, length) in bytes of the single MatMul prepacked blob of one initializer."""
    blobs = init.prepacked()
    if len(blobs) != 1 or blobs[0][0] != "MatMul":
        raise PackedPathUnavailable(f"{where}: {init.name} has prepacked blobs {blobs}, not exactly one MatMul blob")
    _, offset, length = blobs[0]
    if offset % 4 or length % 4:
        raise PackedPathUnavailable(f"{where}: {init.name}'s packed blob is not 4-byte aligned")
    return offset, length


def probe_layout(ort, k: int, n: int, make_options, workdir: Path):
    """The packed layout ORT uses here for a constant MatMul weight of shape (K, N): packing object + whether it is the
    MLAS closed form."""
    if k * n >= 0x7F800000 - ONE_BITS:
        raise PackedPathUnavailable(f"a ({k}, {n}) weight is too large to probe")
    bits = np.arange(k * n, dtype=np.uint32) + np.uint32(ONE_BITS)
    model_path, data_path = save_packed(ort, onnx_proto.matmul_model(k, n, bits.view(np.float32)), make_options(),
                                        workdir, f"probe-{k}x{n}")
    try:
        init = next(i for i in onnx_proto.initializers(model_path.read_bytes()) if i.name == "W")
        offset, length = blob_of(init, f"layout probe {k}x{n}")
        blob = np.fromfile(data_path, "<u4", length // 4, offset=offset)
    except (OSError, StopIteration, ValueError) as exc:
        raise PackedPathUnavailable(f"layout probe {k}x{n}: {exc}") from None
    finally:
        model_path.unlink(missing_ok=True)
        data_path.unlink(missing_ok=True)
    filled = blob != 0
    elements = blob[filled].astype(np.int64) - ONE_BITS
    if elements.size != k * n or np.any(np.bincount(elements, minlength=k * n) != 1) or np.any(blob[~filled]):
        raise PackedPathUnavailable(f"layout probe {k}x{n}: the packed blob is not a permutation of the weight "
                                    f"plus zero padding")
    table = np.empty(k * n, np.int64)
    table[elements] = np.flatnonzero(filled)
    closed = MlasPackedB(k, n)
    if closed.size == blob.size and np.array_equal(closed.positions(np.arange(k * n)), table):
        return closed, True
    return TablePacking(table, blob.size), False


def release_freed_memory() -> None:
    """Give freed heap back to the OS; no-op where glibc is absent. glibc keeps large freed buffers: on the rebuild
    path the process grew by ~700 MB over a few switches without this (opt-125m, docs/runtime.md), and here the pack
    cache's chunk buffers would stay resident through the packed session's peak."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def punch_hole(fd: int, start: int, stop: int, page: int) -> int:
    """Free the whole pages inside [start, stop) of a tmpfs file; returns the bytes freed (0 where unsupported)."""
    a, b = -(-start // page) * page, stop // page * page
    if b <= a:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, a, b - a) != 0:
        return 0
    return b - a


# ---------------------------------------------------------------- the live cache


class PackedInPlace:
    """One packed session over a tmpfs pack cache, and `flat`: the cache's data file mapped writable (float32)."""

    def __init__(self, ort, model_path: Path, manifest_weights: list[dict], make_options, logits_of, probe_ids,
                 slots_from):
        """make_options(): fresh SessionOptions; logits_of(session, ids): logits; slots_from(place): the Slots,
        given place(entry) -> (start, packing) for each patchable tensor (backend.slots_from_manifest)."""
        clock = [time.perf_counter()]
        self.start_timings = {}   # seconds per start-up step, for docs and the benchmark

        def lap(step: str) -> None:
            clock.append(time.perf_counter())
            self.start_timings[step] = round(clock[-1] - clock[-2], 3)

        root = pack_dir()
        remove_stale(root)
        work = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=root))
        self.fd, self._session = None, None
        try:
            # Probes first: they are small, and the memory peak comes later, while the packed session is made.
            self.layouts = {}   # (K, N) -> (packing, closed form?)
            for w in manifest_weights:
                if w["patchable"]:
                    shape = entry_tensor_shape(w)
                    if shape not in self.layouts:
                        self.layouts[shape] = probe_layout(ort, *shape, make_options, work)
            lap("layout_probes")
            saved_model, saved_data = write_pack_cache(ort, model_path, make_options, work, "model.pack")
            release_freed_memory()   # the chunks' transient buffers, before ORT's own peak
            lap("write_pack_cache")
            self._session = ort.InferenceSession(str(saved_model), make_options(), providers=["CPUExecutionProvider"])
            lap("packed_session")
            self.fd = os.open(saved_data, os.O_RDWR)
            self.flat = np.memmap(saved_data, dtype="<f4", mode="r+")
            saved = saved_model.read_bytes()
            inits = {i.name: i for i in onnx_proto.initializers(saved)}
            readers = onnx_proto.consumers(saved)
        except BaseException:
            self.close()
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)   # the session and the mapping keep the data alive
        self._originals = {}   # packed start in flat -> (offset, length) of its unpacked copy in the cache file

        def place(entry):
            init = inits.get(entry["tensor"])
            if init is None:
                raise PackedPathUnavailable(f"the pack cache's model has no initializer {entry['tensor']!r}")
            offset, length = blob_of(init, "pack cache")
            packing = self.layouts.get(tuple(init.dims), (None,))[0]
            if packing is None or packing.size * 4 != length:
                raise PackedPathUnavailable(f"{entry['tensor']}: packed blob of {length} bytes does not match "
                                            f"the probed layout of shape {init.dims}")
            if set(readers.get(entry["tensor"], ())) == {"MatMul"}:   # only then is the original dead after packing
                self._originals[offset // 4] = (int(init.external["offset"]), int(init.external["length"]))
            return offset // 4, packing

        try:
            self.slots = slots_from(place)
            self.freed_bytes = self.release_originals(logits_of, probe_ids)
            lap("release_originals")
            self.verify_layout()   # after the release: its transient buffers then stay below the session's peak
            lap("verify_layout")
            self.self_test(logits_of, probe_ids)
            lap("self_test")
        except BaseException:   # the fallback takes over: free the session and the tmpfs file now, not at GC
            self.close()
            raise
        self.start_timings["total"] = round(clock[-1] - clock[0], 3)

    # The switch needs nothing from the session: the scatter wrote into the weights it computes from.
    def weights_changed(self) -> None:
        pass

    def after_scatter(self) -> None:
        pass

    def weights_reverted(self) -> None:
        pass

    def session(self):
        return self._session

    ready = True

    def wait_ready(self, timeout: float | None = None) -> bool:
        return True

    def tensors(self):
        return patchable_tensors(self.slots.values())

    def verify_layout(self) -> None:
        """Every patchable packed blob equals the export's tensor placed through the probed layout, bit for bit."""
        orders = {}
        for slot in self.tensors():
            rows, cols = tensor_shape(slot)
            order = orders.get((rows, cols))
            if order is None:
                order = orders[(rows, cols)] = slot.packing.positions(np.arange(rows * cols))
            expected = np.zeros(slot.packing.size, np.float32)
            expected[order] = np.fromfile(slot.file, "<f4", rows * cols, offset=slot.offset)
            live = self.flat[slot.start: slot.start + slot.packing.size]
            if not np.array_equal(live.view(np.uint32), expected.view(np.uint32)):
                raise PackedPathUnavailable(f"{slot.name}: the packed weights ORT saved do not match the layout "
                                            f"probed on this machine")

    def release_originals(self, logits_of, ids) -> int:
        """Punch holes over the unpacked copies of the patchable tensors that only MatMuls read (those read only the
        packed copy once the session exists); write them back if the logits change. Returns the bytes freed."""
        before = logits_of(self._session, ids)
        page = os.sysconf("SC_PAGE_SIZE")
        freed = sum(punch_hole(self.fd, o, o + n, page) for o, n in self._originals.values())
        if freed and not np.array_equal(logits_of(self._session, ids), before):
            for slot in self.tensors():   # the originals are the export's tensors: read them back from there
                if slot.start not in self._originals:
                    continue
                o, n = self._originals[slot.start]
                self.flat[o // 4: (o + n) // 4] = np.fromfile(slot.file, "<f4", n // 4, offset=slot.offset)
            freed = 0
        return freed

    def self_test(self, logits_of, ids) -> None:
        """backend.live_patch_self_test on two tokens (with one, attention ignores the keys)."""
        try:
            live_patch_self_test(self.flat, self.slots.values(), lambda: logits_of(self._session, ids[:, :2]))
        except SelfTestFailed as exc:
            raise PackedPathUnavailable(f"self-test: {exc} (this ORT build does not compute from the mapped packed "
                                        f"weights)") from None

    def close(self) -> None:
        self._session = self.flat = None   # the mapping goes with its last reference; the tmpfs file with the fd
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)

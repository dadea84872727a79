"""The packed-in-place switch for ExecuTorch + XNNPACK: adapters are written straight into the packed weights the
loaded program computes with, through XNNPACK's file-backed weight cache, so a switch is a scatter with no reload
and the next run is at the plain program's speed.

Start-up (`PackedProgram`), all of it before the runtime accepts a switch:

1. **Cache file.** A fresh memfd, or an unnamed file in $SHIRA_EDGE_PACK_DIR if that is set (`cache_file`; a
   tmpfs: a disk-backed file would make every switch pay write-back), is handed to
   the native runner (runtime/et_native.py) as XNNPACK's `packed_cache_path`, with `weight_cache_enabled`, for this
   one load. XNNPACK packs every Linear weight from the export's .ptd into pages of that file it maps MAP_SHARED,
   computes from them, and appends an index (weight key + bias key -> offset, size, seed) at the end. The cache is
   built from the export at every start and dies with the process: a crash mid-switch leaves nothing behind.
2. **Mapping.** We map the same memfd MAP_SHARED as `flat`, the patch target: a write through it is a write into
   the pages the program reads.
3. **Layout, found here.** For each patchable weight the index gives its packed block; the block size fixes the
   candidate output-block widths nr (XNNPACK's GEMM packing: per nr outputs, nr bias values, then K rows of nr
   weights; nr differs per CPU), and the block's contents decide: every element of the export's weight must sit
   where `XnnpackPackedFC` puts it, bit for bit. A weight packed elsewhere (onto the heap, twice, in another
   layout) fails here.
4. **Self-test** (backend.live_patch_self_test). Double a weight's whole packed block: the logits must move;
   restore it. Every weight of the first and the last layer and one per layer in between, roles in turn; then the
   logits must be bit-identical to before.

Any failure raises PackedPathUnavailable with the reason; the ExecuTorch backend then falls back to reloading.

What this relies on that ExecuTorch does not promise (checked by 3-4 on the running machine and executorch build,
and pinned in et_compat): that XNNPACK computes from the cache file's pages rather than a copy, never rewrites
them after load, and keeps this layout and index format. A later load over the same cache path would be served the
cached (possibly patched) blocks by name, unchecked; the memfd's path is private to one load, so none ever is.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np

from . import tmpfs
from .et_compat import read_xnn_cache_index
from .et_native import NativeProgram, NativeUnavailable
from .backend import SelfTestFailed, live_patch_self_test, slots_from_manifest
from .manifest import tensor_shape
from .patch import PinnedFile

NR_CANDIDATES = (4, 8, 16, 24, 32, 48, 64, 96, 128)   # output-block widths XNNPACK's f32 GEMM kernels use
PROBE_ELEMENTS = 257   # elements of each weight compared in its packed block
SELF_TEST_IDS = np.array([2, 3], np.int64)   # two tokens: with one, attention ignores the keys


class PackedPathUnavailable(RuntimeError):
    """The packed-in-place switch cannot run here (message: why); the backend falls back to reloading."""


class XnnpackPackedFC:
    """XNNPACK's packed f32 fully-connected weights for T = W (N outputs x K inputs, row-major): ceil(N/nr) blocks,
    each nr bias values then K rows of nr weights (kr = sr = 1). A layout.py packing: positions/elements/size.

        >>> p = XnnpackPackedFC(k=2, n=3, nr=2)          # blocks of 2 outputs: [b0 b1][W00 W10][W01 W11] [b2 .]...
        >>> p.positions(np.array([0, 1, 2, 4])), p.size   # W[0,0], W[0,1], W[1,0], W[2,0]
        (array([2, 4, 3, 8]), 12)
        >>> p.elements(np.array([0, 2, 5, 9]))            # bias, W[0,0], W[1,1], padding output 3
        array([-1,  0,  3, -1])
    """

    def __init__(self, k: int, n: int, nr: int):
        self.k, self.n, self.nr = int(k), int(n), int(nr)
        self.block = self.nr * (self.k + 1)
        self.size = -(-self.n // self.nr) * self.block

    def positions(self, elements: np.ndarray) -> np.ndarray:
        out, col = np.divmod(np.asarray(elements, np.int64), self.k)
        block, lane = np.divmod(out, self.nr)
        return block * self.block + self.nr * (1 + col) + lane

    def elements(self, offsets: np.ndarray) -> np.ndarray:
        block, q = np.divmod(np.asarray(offsets, np.int64), self.block)
        row, lane = np.divmod(q, self.nr)       # row 0 holds the biases
        out = block * self.nr + lane
        return np.where((row > 0) & (out < self.n), out * self.k + row - 1, -1)

    def unpack(self, packed: np.ndarray) -> np.ndarray:
        """The (N, K) weight held by a packed block of `size` floats (a copy): `positions` read back in bulk.

            >>> p = XnnpackPackedFC(k=2, n=3, nr=2)
            >>> w = np.arange(6, dtype=np.float32)
            >>> packed = np.zeros(p.size, np.float32); packed[p.positions(np.arange(6))] = w
            >>> np.array_equal(p.unpack(packed), w.reshape(3, 2))
            True
        """
        blocks = packed.reshape(-1, self.k + 1, self.nr)[:, 1:, :]
        return blocks.transpose(0, 2, 1).reshape(-1, self.k)[: self.n]


def _memfd() -> tuple[int, str]:
    try:
        fd = os.memfd_create("shira-edge-xnnpack-cache", os.MFD_CLOEXEC)
    except (AttributeError, OSError) as exc:
        raise PackedPathUnavailable(f"no memfd on this system ({exc})") from None
    return fd, f"/proc/self/fd/{fd}"


def cache_file() -> tuple[int, str]:
    """(fd, path) of a fresh private tmpfs file for XNNPACK's cache: an unnamed file (O_TMPFILE) in
    $SHIRA_EDGE_PACK_DIR if that is set (a tmpfs of the user's choice, e.g. one mounted huge=always), else a memfd.
    Either has no name anyone else can open, and dies with its last fd and mapping."""
    try:
        root = tmpfs.pack_dir(default=None)
    except tmpfs.NoTmpfs as exc:
        raise PackedPathUnavailable(f"{tmpfs.PACK_DIR_ENV}={os.environ.get(tmpfs.PACK_DIR_ENV)!r}: {exc}") from None
    if root is None:
        fd, path = _memfd()
    else:
        try:
            fd = os.open(root, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except (AttributeError, OSError) as exc:
            raise PackedPathUnavailable(f"cannot make XNNPACK's cache file in {root} ({exc})") from None
        path = f"/proc/self/fd/{fd}"
    if not os.path.exists(path):
        os.close(fd)
        raise PackedPathUnavailable("/proc/self/fd is not mounted, so XNNPACK cannot open its cache file by path")
    return fd, path


class PackedProgram:
    """One program loaded over a private XNNPACK cache file, its packed weights mapped writable as `flat`.

    `slots`: one per manifest weight; patchable ones point into `flat` through an XnnpackPackedFC packing.
    `forward(ids, start)` runs it. Raises PackedPathUnavailable (or NativeUnavailable) if anything does not hold.
    """

    def __init__(self, lib, pte, data_file, manifest: dict, vocab: int):
        self.flat, self._map, self.program = None, None, None
        self._fd, path = cache_file()
        try:
            self.program = NativeProgram(lib, pte, data_file, cache_path=path, vocab=vocab)
            size = os.fstat(self._fd).st_size
            if size == 0:
                raise PackedPathUnavailable("XNNPACK wrote nothing to the cache file (weight cache not honoured)")
            self._map = mmap.mmap(self._fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            try:
                index = read_xnn_cache_index(self._map)
            except ValueError as exc:
                raise PackedPathUnavailable(str(exc)) from None
            self.flat = np.frombuffer(self._map, np.float32, count=size // 4)
            # Each shape's layout is checked on every element of its first weight; every weight is then checked
            # on PROBE_ELEMENTS elements spread over it, which a block of another weight would fail.
            self._layouts: dict[tuple, XnnpackPackedFC] = {}
            # Read with pread, not a mapping: mapped, the probed pages (and the fault-around pages next to each)
            # counted in this process's RSS until unmapped, +406 MiB on SmolLM2, which made the start-up's peak.
            self._ptd = PinnedFile(data_file)
            try:
                self.slots = slots_from_manifest(manifest, Path(data_file).parent, lambda w: self._place(w, index))
            finally:
                del self._ptd
            self._self_test()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ layout

    def _place(self, w: dict, index: dict) -> tuple[int, XnnpackPackedFC]:
        """(start in flat, packing) of one patchable backend tensor T (R outputs x C inputs), verified."""
        rows, cols = tensor_shape(w)
        if w["layout"] != "as_is":
            raise PackedPathUnavailable(f"{w['name']}: a transposed weight is packed another way by XNNPACK; only "
                                        f"(out, in) weights are mapped into its packing")
        entries = [v for name, v in index.items() if name.startswith(w["tensor"])]
        if len(entries) != 1:
            raise PackedPathUnavailable(f"{w['name']}: {len(entries)} packed copies in XNNPACK's cache file "
                                        f"(expected 1: a weight packed on the heap or twice would miss patches)")
        offset, nbytes, _seed = entries[0]
        if offset % 4 or nbytes % 4:
            raise PackedPathUnavailable(f"{w['name']}: packed block at byte {offset} is not float-aligned")
        block = self.flat[offset // 4: (offset + nbytes) // 4]
        packing = self._layouts.get((rows, cols, block.size)) or self._probe_layout(w, rows, cols, block)
        probe = np.linspace(0, rows * cols - 1, PROBE_ELEMENTS).astype(np.int64)
        stored = np.frombuffer(b"".join(self._ptd.pread(w["offset"] + 4 * int(e), 4) for e in probe), "<f4")
        if not np.array_equal(block[packing.positions(probe)], stored):
            raise PackedPathUnavailable(f"{w['name']}: its packed block in XNNPACK's cache file does not hold this "
                                        f"weight where the {rows}x{cols} layout found here puts it")
        return offset // 4, packing

    def _probe_layout(self, w: dict, rows: int, cols: int, block: np.ndarray) -> XnnpackPackedFC:
        """The packing of the first tensor of each shape: the nr whose layout holds every element, bit for bit."""
        tensor = np.frombuffer(self._ptd.pread(w["offset"], 4 * rows * cols), "<f4").reshape(rows, cols)
        for nr in NR_CANDIDATES:
            packing = XnnpackPackedFC(cols, rows, nr)
            if packing.size == block.size and np.array_equal(packing.unpack(block), tensor):
                self._layouts[(rows, cols, block.size)] = packing
                return packing
        raise PackedPathUnavailable(f"{w['name']}: its packed block ({block.size * 4} B) matches no known XNNPACK "
                                    f"layout for {rows}x{cols} on this CPU")

    # ------------------------------------------------------------------ self-test

    def _self_test(self) -> None:
        """backend.live_patch_self_test on two tokens: the whole packed block of each tested weight (its bias lanes
        too) doubled in the cache file must move the logits, and restoring must give them back bit for bit."""
        try:
            live_patch_self_test(self.flat, self.slots.values(), lambda: self.forward(SELF_TEST_IDS, 0))
        except SelfTestFailed as exc:
            raise PackedPathUnavailable(f"self-test: {exc} (XNNPACK does not compute from the cache file)") from None

    # ------------------------------------------------------------------ running

    def forward(self, ids: np.ndarray, start: int) -> np.ndarray:
        return self.program.forward(ids, start)

    def after_scatter(self) -> None:
        pass   # the scatter wrote into the pages the program computes from: nothing to rebuild

    def close(self) -> None:
        # the program first: it holds XNNPACK's cache (and its mapping of the file) for this path
        program, self.program = self.program, None
        if program is not None:
            program.close()
        self.flat = None
        mapping, self._map = self._map, None
        if mapping is not None:
            try:
                mapping.close()
            except BufferError:   # a view of flat is still alive somewhere; the mapping goes with it
                pass
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            os.close(fd)


__all__ = ["PackedProgram", "PackedPathUnavailable", "XnnpackPackedFC", "NativeUnavailable"]

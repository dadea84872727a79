"""The switch kernel: write precomputed float32 values at precomputed positions of a flat weight buffer.

A SHiRA switch is nothing but this. Positions are int64 offsets into a 1-D float32 view of the buffer that holds
the weights (the runtime keeps every patchable weight in one such buffer), sorted ascending so that writes walk
memory forward and each touched cache line is fetched once. Values are final weights (base + scale * delta, or the
saved base values on a restore), so there is no arithmetic and no rounding here: a scatter is exact by
construction and restoring is just scattering the saved base values.

    >>> import numpy as np
    >>> flat = np.zeros(8, np.float32)
    >>> scatter_into(flat, np.array([1, 5], np.int64), np.array([2.5, -1.0], np.float32))
    >>> flat.tolist()
    [0.0, 2.5, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0]

The writes are done by native/scatter.c, which prefetches the element 64 writes ahead: the positions are too
sparse for the hardware prefetcher, and on a tmpfs mapping in 4 KiB pages every write would otherwise wait for its
miss. It is built on first use (runtime/native_build.py) and used only after it gave bit-identical results to
numpy's fancy assignment on a test pattern; without a C compiler, or with SHIRA_EDGE_SCATTER=numpy, the writes are
numpy's (`kernel()` says which, and a RuntimeWarning says once why not native). Both release the GIL, so with
`threads > 1` contiguous slices of the (sorted) positions are written by a pool of threads; slices are disjoint, so
no two threads touch the same element.
"""

from __future__ import annotations

import ctypes
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import native_build

# Below this many elements per thread the pool's hand-off costs more than it saves.
MIN_PER_THREAD = 1 << 16

_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _pool(threads: int) -> ThreadPoolExecutor:
    with _pools_lock:
        pool = _pools.get(threads)
        if pool is None:
            pool = _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="shira-scatter")
        return pool


SOURCE = native_build.NATIVE_DIR / "scatter.c"
_native = None        # the native function once loaded and checked, False once known unavailable
_native_lock = threading.Lock()


def _command(out) -> list[str]:
    return ["gcc", "-std=c11", "-O2", "-fPIC", "-shared", str(SOURCE), "-o", str(out)]


def _load_native():
    if os.environ.get("SHIRA_EDGE_SCATTER") == "numpy":
        raise native_build.NativeUnavailable("SHIRA_EDGE_SCATTER=numpy")
    path = native_build.library_path(SOURCE, "libshira_scatter", _command)
    if not path.is_file():
        native_build.build(path, SOURCE, _command)
    try:
        fn = ctypes.CDLL(str(path)).shira_scatter
    except (OSError, AttributeError) as exc:
        raise native_build.NativeUnavailable(f"{path}: cannot be loaded ({exc}); delete it to rebuild") from None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64], None
    # the check: every length around the prefetch distance, and a random sparse pattern, against numpy
    rng = np.random.default_rng(0)
    for n in (0, 1, 63, 64, 65, 3000):
        want = rng.standard_normal(1 << 16).astype(np.float32)
        got = want.copy()
        positions = np.sort(rng.choice(want.size, n, replace=False)).astype(np.int64)
        values = rng.standard_normal(n).astype(np.float32)
        want[positions] = values
        fn(got.ctypes.data, positions.ctypes.data, values.ctypes.data, n)
        if not np.array_equal(got.view(np.uint32), want.view(np.uint32)):
            raise native_build.NativeUnavailable(f"{path}: its writes differ from numpy's on a test pattern")
    return fn


def kernel() -> str:
    """"native" or "numpy": what writes a scatter in this process (the first call builds and checks the native one)."""
    global _native
    with _native_lock:
        if _native is None:
            try:
                _native = _load_native()
            except native_build.NativeUnavailable as exc:
                _native = False
                if str(exc) != "SHIRA_EDGE_SCATTER=numpy":
                    warnings.warn(f"the native scatter kernel is unavailable ({exc}); switches use numpy's fancy "
                                  f"assignment, 1.7-2.7x slower where measured (docs/benchmarks.md)",
                                  RuntimeWarning, stacklevel=2)
    return "native" if _native else "numpy"


def _write(flat: np.ndarray, positions: np.ndarray, values: np.ndarray) -> None:
    if _native:
        _native(flat.ctypes.data, positions.ctypes.data, values.ctypes.data, positions.size)
    else:
        flat[positions] = values


def check_plan(flat: np.ndarray, positions: np.ndarray, values: np.ndarray) -> None:
    """Raise ValueError unless (flat, positions, values) is something `scatter_into` may write. Done once per plan."""
    if flat.dtype != np.float32 or flat.ndim != 1 or not flat.flags.writeable:
        raise ValueError(f"target must be a writable 1-D float32 array, got {flat.dtype} {flat.shape}")
    if positions.dtype != np.int64 or values.dtype != np.float32 or positions.shape != values.shape:
        raise ValueError(f"positions must be int64 and values float32 of one length, got "
                         f"{positions.dtype}{positions.shape} and {values.dtype}{values.shape}")
    if positions.size and (positions[0] < 0 or positions[-1] >= flat.size or np.any(np.diff(positions) <= 0)):
        raise ValueError(f"positions must be strictly increasing within [0, {flat.size})")
    if not (flat.flags.c_contiguous and positions.flags.c_contiguous and values.flags.c_contiguous):
        raise ValueError("target, positions and values must be C-contiguous")


def scatter_into(flat: np.ndarray, positions: np.ndarray, values: np.ndarray, threads: int = 1) -> None:
    """flat[positions] = values, split over `threads` threads. Trusts its inputs: see `check_plan` (the native
    kernel also needs positions and values C-contiguous, as plans make them)."""
    if _native is None:
        kernel()
    n = positions.size
    threads = max(1, min(int(threads), n // MIN_PER_THREAD))
    if threads == 1:
        _write(flat, positions, values)
        return
    bounds = np.linspace(0, n, threads + 1).astype(np.int64)
    futures = [_pool(threads).submit(_write, flat, positions[a:b], values[a:b])
               for a, b in zip(bounds[:-1], bounds[1:])]
    for f in futures:
        f.result()

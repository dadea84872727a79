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

numpy's fancy assignment releases the GIL for plain dtypes, so with `threads > 1` contiguous slices of the
(sorted) positions are written by a pool of threads; slices are disjoint, so no two threads touch the same element.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

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


def check_plan(flat: np.ndarray, positions: np.ndarray, values: np.ndarray) -> None:
    """Raise ValueError unless (flat, positions, values) is something `scatter_into` may write. Done once per plan."""
    if flat.dtype != np.float32 or flat.ndim != 1 or not flat.flags.writeable:
        raise ValueError(f"target must be a writable 1-D float32 array, got {flat.dtype} {flat.shape}")
    if positions.dtype != np.int64 or values.dtype != np.float32 or positions.shape != values.shape:
        raise ValueError(f"positions must be int64 and values float32 of one length, got "
                         f"{positions.dtype}{positions.shape} and {values.dtype}{values.shape}")
    if positions.size and (positions[0] < 0 or positions[-1] >= flat.size or np.any(np.diff(positions) <= 0)):
        raise ValueError(f"positions must be strictly increasing within [0, {flat.size})")


def scatter_into(flat: np.ndarray, positions: np.ndarray, values: np.ndarray, threads: int = 1) -> None:
    """flat[positions] = values, split over `threads` threads. Trusts its inputs: see `check_plan`."""
    n = positions.size
    threads = max(1, min(int(threads), n // MIN_PER_THREAD))
    if threads == 1:
        flat[positions] = values
        return
    bounds = np.linspace(0, n, threads + 1).astype(np.int64)
    futures = [_pool(threads).submit(flat.__setitem__, positions[a:b], values[a:b])
               for a, b in zip(bounds[:-1], bounds[1:])]
    for f in futures:
        f.result()

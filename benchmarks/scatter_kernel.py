"""The switch kernel alone: native/scatter.c against numpy's fancy assignment, and the copy floor, interleaved.

    python benchmarks/scatter_kernel.py                      # opt-125m r=4 sizes: 663,552 positions in 85M floats
    python benchmarks/scatter_kernel.py --rounds 25 --anon   # into anonymous memory instead of a /dev/shm mapping

The target is a /dev/shm file mapped MAP_SHARED (what the packed-in-place paths write into), positions sorted and
random; floor = a sequential copy of as many bytes as the 64-byte lines the positions touch. Medians (ms).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shira_edge.runtime import scatter  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--floats", type=int, default=85_000_000)
    ap.add_argument("--positions", type=int, default=663_552)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--anon", action="store_true", help="anonymous memory instead of a /dev/shm mapping")
    args = ap.parse_args()
    if scatter.kernel() != "native":
        print("the native kernel is unavailable here; nothing to compare", file=sys.stderr)
        return 1
    rng = np.random.default_rng(0)
    if args.anon:
        flat = np.ones(args.floats, np.float32)
    else:
        fd, path = tempfile.mkstemp(dir="/dev/shm")
        os.ftruncate(fd, args.floats * 4)
        os.close(fd)
        flat = np.memmap(path, np.float32, "r+", shape=(args.floats,))
        os.unlink(path)
        flat[:] = 1.0
    positions = np.sort(rng.choice(args.floats, args.positions, replace=False)).astype(np.int64)
    values = rng.standard_normal(positions.size).astype(np.float32)
    lines = np.unique(positions // 16).size
    src, dst = np.ones(lines * 16, np.float32), np.zeros(lines * 16, np.float32)
    modes = {"numpy": lambda: flat.__setitem__(positions, values),
             "native": lambda: scatter._native(flat.ctypes.data, positions.ctypes.data, values.ctypes.data,
                                               positions.size),
             "copy floor": lambda: np.copyto(dst, src)}
    times = {m: [] for m in modes}
    for _ in range(args.rounds):
        for m, f in modes.items():
            t = time.perf_counter()
            f()
            times[m].append(time.perf_counter() - t)
    for m, ts in times.items():
        print(f"{m:10s} median {statistics.median(ts) * 1e3:.2f} ms (min {min(ts) * 1e3:.2f}, max {max(ts) * 1e3:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Part (a), the paper's Fig. 7: the weight update alone, SHiRA's scatter against LoRA fusion `W += B @ A`.

SHiRA goes through the runtime's own switch kernel (`scatter_into` with precomputed positions and values into one
flat float32 buffer, which is how the runtime holds every patchable weight); LoRA is torch's in-place `addmm_`, the
fastest fusion a host has. Both write into their own buffers of the same size, at equal trainable parameters
(nnz = r(m+n)), interleaved round by round.

    >>> res = bench_shapes("64x64", [(64, 64)], r=2, threads=1, samples=3, warmup=1)
    >>> res["nnz"], res["speedup"]["n"]
    (256, 3)
"""

from __future__ import annotations

import numpy as np

from ..runtime.scatter import scatter_into
from .adapters import random_positions, shira_nnz
from .stats import interleave, paired_ratio, summarize

SQUARE_SIZES = (1024, 2048, 3072, 4096)


def bench_shapes(label: str, shapes: list[tuple[int, int]], r: int, threads: int, samples: int, warmup: int,
                 seed: int = 0) -> dict:
    """Time loading one adapter onto a set of weights of these shapes: SHiRA scatter vs LoRA fusion."""
    import torch

    rng = np.random.default_rng(seed)
    sizes = [m * n for m, n in shapes]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    # ones, not zeros: freshly mapped zero pages would make the first writes page faults, which is not a switch
    flat = np.ones(sum(sizes), np.float32)
    positions = np.concatenate([s + random_positions(shape, shira_nnz(shape, r), rng)
                                for s, shape in zip(starts, shapes)])
    values = rng.standard_normal(positions.size, dtype=np.float32)
    lora = [(torch.ones(m, n), torch.from_numpy(rng.standard_normal((m, r), dtype=np.float32)),
             torch.from_numpy(rng.standard_normal((r, n), dtype=np.float32))) for m, n in shapes]

    def shira():
        scatter_into(flat, positions, values, threads)

    def fuse():
        for w, b, a in lora:
            w.addmm_(b, a)

    torch.set_num_threads(threads)
    times = interleave({"shira_scatter": shira, "lora_fusion": fuse}, samples=samples, warmup=warmup)
    return {
        "label": label, "shapes": [list(s) for s in shapes], "r": r, "nnz": int(positions.size),
        "params": int(sum(sizes)), "density": positions.size / sum(sizes),
        "shira_scatter": summarize(times["shira_scatter"]), "lora_fusion": summarize(times["lora_fusion"]),
        "speedup": paired_ratio(times["lora_fusion"], times["shira_scatter"]),
    }


def run(model_shapes: list[tuple[int, int]], model_label: str, ranks: list[int], threads: int, samples: int,
        warmup: int, sizes=SQUARE_SIZES, progress=None) -> dict:
    rows = []
    for r in ranks:
        for label, shapes in [(f"{n}x{n}", [(n, n)]) for n in sizes] + [(model_label, model_shapes)]:
            rows.append(bench_shapes(label, shapes, r, threads, samples, warmup))
            if progress is not None:
                progress()
    return {"what": "weight update only: SHiRA scatter_into vs LoRA W.addmm_(B, A), equal params nnz = r(m+n)",
            "threads": threads, "rows": rows}

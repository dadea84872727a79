"""The whole benchmark: exports (made or reused), adapters, parts (a)-(d) under one progress bar, then the report.

    >>> result = run_bench("tiny-opt", backends=["onnxruntime"], ranks=[4], threads=1, quick=True,
    ...                    out_dir="bench/")                                    # doctest: +SKIP
    >>> sorted(result["parts"])                                                 # doctest: +SKIP
    ['a_weight_update', 'b_switch', 'c_inference', 'd_memory']
"""

from __future__ import annotations

import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BACKENDS = ("onnxruntime", "executorch")
FORMAT = {"onnxruntime": "onnx", "executorch": "executorch"}
ET_MAX_SEQ_LEN = 256   # >= the 128-token prefill and the decode's cached prompt
FULL, QUICK = (20, 2), (3, 1)   # (samples, warm-up rounds) per figure


class BenchError(RuntimeError):
    """The benchmark cannot run as asked; the message names the flag or file and what to do."""


def run_bench(model: str, *, backends, ranks, threads: int, quick: bool, out_dir, random_init: bool = False,
              seed: int = 0, export_dirs=(), samples: int | None = None, keep_work: bool = False) -> dict:
    from tqdm import tqdm

    from ..runtime.manifest import ManifestError, read_manifest
    from . import inference, memory, report, switch, weight_update
    from .adapters import patchable, random_lora, write_fused_copy, write_random_shira
    from .engines import kinds, set_threads
    from .ort_baseline import OrtBaseline
    from .stats import machine_info

    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_samples, warmup = QUICK if quick else FULL
    n_samples = samples or n_samples
    machine = machine_info()
    import torch

    set_threads(threads)
    settings = {"model": model, "random_init": random_init, "seed": seed, "backends": list(backends),
                "ranks": list(ranks), "threads": threads, "quick": quick, "samples": n_samples, "warmup": warmup,
                "torch_threads": torch.get_num_threads()}
    print(f"shira-edge bench: {model}, backends {', '.join(backends)}, r {ranks}, {threads} threads everywhere "
          f"(ORT intra-op, ExecuTorch pool, torch, scatter), {n_samples} samples after {warmup} warm-up rounds",
          flush=True)

    reuse = {}
    for d in export_dirs:
        try:
            m = read_manifest(d)
        except ManifestError as exc:
            raise BenchError(f"--export-dir {d}: {exc}") from None
        reuse[m["backend"]] = Path(d)
    exports = {b: _export(model, b, random_init, seed, reuse.get(b), out_dir / "exports" / b) for b in backends}
    manifests = {b: read_manifest(d) for b, d in exports.items()}

    work = out_dir / "work"
    units = (len(ranks) * 5                                          # (a): 4 squares + the model set, per r
             + len(backends) * len(ranks) * (n_samples + warmup)     # (b): rounds
             + len(backends) * len(ranks) * len(kinds()) * (n_samples + warmup)   # (c): rounds
             + 1)                                                    # (d)
    bar = tqdm(total=units, desc="bench", unit="step", dynamic_ncols=True)
    tick = lambda: bar.update(1)  # noqa: E731
    parts: dict = {"b_switch": [], "c_inference": [], "d_memory": []}
    try:
        first = manifests[backends[0]]
        shapes = [tuple(w["shape"]) for w in patchable(first)]
        bar.set_description("(a) weight update")
        parts["a_weight_update"] = weight_update.run(shapes, f"{model} ({len(shapes)} weights)", list(ranks),
                                                     threads, n_samples, warmup, progress=tick)
        mem_specs = []
        for backend in backends:
            d, m = exports[backend], manifests[backend]
            weights = patchable(m)
            wdir = work / backend
            wdir.mkdir(parents=True, exist_ok=True)
            side = OrtBaseline(d, m, threads) if backend == "onnxruntime" else None
            lora_graph = side.lora_graph(wdir / "lora-side-branches") if side else None
            for i, r in enumerate(ranks):
                shira = (write_random_shira(wdir / f"shira-r{r}-x.shira", weights, r, 1),
                         write_random_shira(wdir / f"shira-r{r}-y.shira", weights, r, 2))
                lora = (random_lora(weights, r, 1), random_lora(weights, r, 2))
                fused = write_fused_copy(d, m, wdir / f"fused-r{r}-y", lora[1])
                bar.set_description(f"(b) switch {backend} r={r}")
                parts["b_switch"].append(switch.run(d, m, r, shira, lora, fused, wdir / "cold", threads, n_samples,
                                                    warmup, progress=tick))
                bar.set_description(f"(c) inference {backend} r={r}")
                parts["c_inference"].append(inference.run(d, m, r, shira, lora_graph,
                                                          side.lora_feeds(lora[0]) if side else None, threads,
                                                          n_samples, warmup, progress=tick))
                if i == 0 or not quick:
                    spec = {"export_dir": str(d), "threads": threads, "r": r, "shira": [str(p) for p in shira],
                            "fused_dir": str(fused), "lora_graph": str(lora_graph) if lora_graph else None}
                    modes = ["shira", "lora_fused"] + (["lora_unfused"] if side else [])
                    if i == 0:
                        modes = ["base", "naive_reload"] + modes
                    mem_specs += [{**spec, "mode": mode} for mode in modes]
        bar.set_description(f"(d) memory, {len(mem_specs)} processes")
        # Peak RSS is per process, so processes may run side by side (up to `threads`) without changing it.
        with ThreadPoolExecutor(max(1, threads)) as pool:
            parts["d_memory"] = list(pool.map(memory.run_isolated, mem_specs))
        tick()
    finally:
        bar.close()
        if not keep_work:
            shutil.rmtree(work, ignore_errors=True)

    result = {"format": "shira-edge bench v1", "machine": machine, "settings": settings,
              "exports": {b: {"dir": str(d), "model": manifests[b]["model"], "fingerprint": manifests[b]["fingerprint"]}
                          for b, d in exports.items()},
              "parts": parts, "wall_seconds": round(time.perf_counter() - started, 1)}
    result["headline"] = report.headline(result)
    report.write_all(result, out_dir)
    return result


def _export(model: str, backend: str, random_init: bool, seed: int, given: Path | None, cache_dir: Path) -> Path:
    """An export of `model` for `backend`: the one given with --export-dir, one left in BENCH_DIR/exports by an
    earlier run, or a new one. A reused export must be of the same model, weights and seed."""
    from ..exporters.common import ExportError, Stages
    from ..runtime.manifest import ManifestError, read_manifest
    from ..export import run_export

    for d in (given, cache_dir):
        if d is None or not (d / "manifest.json").is_file():
            if d is given and d is not None:
                raise BenchError(f"--export-dir {d}: no manifest.json; pass a directory written by `shira-edge export`")
            continue
        try:
            m = read_manifest(d)
        except ManifestError as exc:
            raise BenchError(f"export {d}: {exc}") from None
        got = m["model"]
        want_weights = "random-init" if random_init or model == "tiny-opt" else "pretrained"
        matches = (got.get("name") == model and got.get("weights") == want_weights
                   and (want_weights != "random-init" or got.get("seed") == seed) and m["backend"] == backend)
        if matches:
            return d
        if d is given:
            raise BenchError(f"--export-dir {d}: it is a {m['backend']} export of {got.get('name')!r} "
                             f"({got.get('weights')}, seed {got.get('seed')}), not of {model!r} "
                             f"({want_weights}, seed {seed}); export that model or drop --export-dir")
    print(f"exporting {model} for {backend} into {cache_dir} (reused by later runs) ...", flush=True)
    try:
        run_export(model, fmt=FORMAT[backend], random_init=random_init, seed=seed, max_seq_len=ET_MAX_SEQ_LEN,
                   force=True, out_dir=cache_dir, stages=Stages(quiet=True))
    except ExportError as exc:
        raise BenchError(f"export of {model} for {backend} failed: {exc}") from None
    return cache_dir


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

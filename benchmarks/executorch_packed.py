"""Checks of ExecuTorch's packed-in-place switch beside `shira-edge bench` (docs/runtime.md, "ExecuTorch,
packed-in-place"): the switch against this backend's reload path, latency with the run order alternating per round,
and memory measured before the runtime is closed. One thread everywhere; medians and p25-p75 of paired ratios.

    python benchmarks/executorch_packed.py switch  /tmp/exports/opt125m-et --rounds 10
    python benchmarks/executorch_packed.py latency /tmp/exports/opt125m-et --rounds 21
    MALLOC_MMAP_THRESHOLD_=67108864 python benchmarks/executorch_packed.py latency /tmp/exports/opt125m-et
    python benchmarks/executorch_packed.py memory  /tmp/exports/opt125m-et

latency compares, interleaved: `base` (the shipped files through executorch.runtime, what the bench calls the
base), `runtime` (Runtime on the packed-in-place path, adapter live) and `native_heap` (the native runner without
the cache file: XNNPACK packs on its heap). MALLOC_MMAP_THRESHOLD_ makes the heap-packed programs' buffers come from
the grown heap, where they get transparent huge pages; the cache file (tmpfs) gets none where shmem_enabled = never.
memory runs each mode in a fresh process with the bench's Footprint sampler.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path



def _adapters(manifest, root: Path):
    from shira_edge.bench.adapters import patchable, write_random_shira

    return [write_random_shira(root / f"{n}.shira", patchable(manifest), 4, seed) for n, seed in (("x", 1), ("y", 2))]


def _summary(samples, base=None) -> str:
    """Median and p25-p75 (ms), and of the per-round ratios to `base`: the bench's own statistics, so the spreads
    quoted beside bench figures and these ones are computed alike."""
    from shira_edge.bench.stats import paired_ratio, summarize

    s = summarize(samples)
    text = f"median {s['median'] * 1e3:.1f} ms (p25-p75 {s['p25'] * 1e3:.1f}-{s['p75'] * 1e3:.1f})"
    if base is not None:
        q = paired_ratio(samples, base)
        text += f", /base {q['median']:.3f} (p25-p75 {q['p25']:.3f}-{q['p75']:.3f})"
    return text


def _one_thread() -> None:
    """One thread for ExecuTorch's process-wide pool (and torch's), before any program is loaded: a resize under
    a loaded program would leave it pointing at a destroyed pool."""
    from shira_edge.bench.engines import set_threads
    from shira_edge.runtime import et_native

    et_native.set_threads(et_native.library(), 1)
    set_threads(1)


def switch(export_dir: Path, rounds: int, root: Path) -> dict:
    """X <-> Y until switch() returns and until the first decode output: packed-in-place vs reload, interleaved."""
    from shira_edge.bench.engines import stepper
    from shira_edge.runtime import Runtime

    _one_thread()
    rts = {"packed": Runtime(export_dir, threads=1), "reload": Runtime(export_dir, threads=1, in_place=False)}
    x, y = _adapters(rts["packed"].manifest, root)
    for rt in rts.values():
        rt.plan(x), rt.plan(y), rt.switch(x)
    t = {f"{k}_{p}": [] for k in rts for p in ("switch", "until_decode")}
    for i in range(rounds):
        for k in (list(rts) if i % 2 == 0 else list(rts)[::-1]):
            rt, decode = rts[k], stepper(rts[k], rts[k].manifest, "decode")
            s = time.perf_counter()
            rt.switch(y if i % 2 == 0 else x)
            s1 = time.perf_counter()
            decode()
            t[f"{k}_switch"].append(s1 - s), t[f"{k}_until_decode"].append(time.perf_counter() - s)
    out = {k: _summary(v) for k, v in t.items()}
    from shira_edge.bench.stats import paired_ratio

    q = paired_ratio(t["reload_until_decode"], t["packed_until_decode"])
    out["reload / packed, until the first decode"] = f"{q['median']:.2f}x (p25-p75 {q['p25']:.2f}-{q['p75']:.2f})"
    return {"switch_path": rts["packed"].switch_path, **out}


def latency(export_dir: Path, rounds: int, root: Path) -> dict:
    import torch  # noqa: F401  (the bindings' base needs it)

    from shira_edge.bench.engines import PlainModel, shape_of, stepper, token_ids
    from shira_edge.runtime import Runtime, et_native
    from shira_edge.runtime.manifest import read_manifest

    manifest = read_manifest(export_dir)
    _one_thread()
    base = PlainModel("executorch", export_dir, manifest, 1)
    rt = Runtime(export_dir, threads=1)
    rt.switch(_adapters(manifest, root)[0])
    heap = et_native.NativeProgram(et_native.library(), export_dir / "model.pte", export_dir / "model.ptd",
                                   cache_path="", vocab=manifest["io"]["vocab_size"])
    out = {"switch_path": rt.switch_path}
    for kind in ("decode", "prefill_32"):
        ids, past = token_ids(kind, manifest["io"]["vocab_size"]), shape_of(kind)[1]
        modes = {"base": base.call(kind), "runtime": stepper(rt, manifest, kind),
                 "native_heap": lambda: heap.forward(ids[0], past)}
        for fn in modes.values():
            fn()
        t = {k: [] for k in modes}
        for r in range(rounds):
            for k in (list(modes) if r % 2 == 0 else list(modes)[::-1]):
                s = time.perf_counter()
                modes[k]()
                t[k].append(time.perf_counter() - s)
        out.update({f"{kind}/{k}": _summary(v, t["base"]) for k, v in t.items()})
    return out


def memory_of(export_dir: Path, mode: str, root: Path) -> dict:
    """One mode in this process: footprint (the bench's Footprint) at the end, before anything is closed, and peak."""
    import torch  # noqa: F401  (every ExecuTorch mode of the bench imports torch and the bindings first)
    from executorch.extension.pybindings import portable_lib  # noqa: F401

    from shira_edge.bench.engines import PlainModel, stepper
    from shira_edge.bench.memory import Footprint
    from shira_edge.runtime import Runtime
    from shira_edge.runtime.manifest import read_manifest

    manifest = read_manifest(export_dir)
    _one_thread()
    footprint = Footprint()
    kinds = ("decode", "prefill_128")
    if mode == "base":
        base = PlainModel("executorch", export_dir, manifest, 1)
        for kind in kinds:
            base.call(kind)()
    else:
        rt = Runtime(export_dir, threads=1)
        for adapter in _adapters(manifest, root) * 2:
            rt.switch(adapter)
            for kind in kinds:
                stepper(rt, manifest, kind)()
    end, peak, tmpfs = footprint.stop()
    return {"mode": mode, "end_MiB": round(end / 2**20), "peak_MiB": round(peak / 2**20),
            "tmpfs_MiB": round(tmpfs / 2**20)}


def memory(export_dir: Path) -> dict:
    out = {}
    for mode in ("base", "packed"):
        done = subprocess.run([sys.executable, __file__, "_memory_of", str(export_dir), "--mode", mode],
                              capture_output=True, text=True, check=True)
        out[mode] = json.loads(done.stdout)
    out["packed / base"] = {k: round(out["packed"][k] / out["base"][k], 3) for k in ("end_MiB", "peak_MiB")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["switch", "latency", "memory", "_memory_of"])
    parser.add_argument("export_dir", type=Path, help="an ExecuTorch export (shira-edge export --format executorch)")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (switch, latency)")
    parser.add_argument("--mode", choices=["base", "packed"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.what == "switch":
            result = switch(args.export_dir, args.rounds, root)
        elif args.what == "latency":
            result = latency(args.export_dir, args.rounds, root)
        elif args.what == "memory":
            result = memory(args.export_dir)
        else:
            result = memory_of(args.export_dir, args.mode, root)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

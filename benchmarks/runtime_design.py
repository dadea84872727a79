"""Design measurements for the runtime (docs/runtime.md): steady-state latency of ONNX Runtime's packed-in-place path
and of each policy of its rebuild path (in_place=False) against the base model's best configuration, switch-to-live
and switch-to-ready times, ExecuTorch switch cost, resident memory (USS: the rebuild path only; the packed-in-place
path keeps its weights in shared tmpfs pages, which USS does not count: `shira-edge bench` part (d) measures it).

    shira-edge export --model opt-125m --random-init -o /tmp/opt125m-onnx
    shira-edge export --model opt-125m --random-init --format executorch -o /tmp/opt125m-et
    python benchmarks/runtime_design.py --onnx /tmp/opt125m-onnx --et /tmp/opt125m-et --json runtime_design.json

Compared configurations run interleaved in one process (the machine is shared; medians and ratios are what count).
Adapters are random SHiRA adapters at --density over every patchable weight, made with the real .shira writer.
"""

from __future__ import annotations

import os

# One BLAS thread, like the one-thread scatter it is compared with; BLAS's default pool oversubscribes shared cores.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from shira_edge.runtime import Runtime
from shira_edge.bench.adapters import patchable, random_shira
from shira_edge.bench.engines import shape_of
from shira_edge.bench.ort_baseline import OrtBaseline
from shira_edge.runtime.shira_format import write_shira

SHAPES = {"decode 1 (past 32)": "decode", "prefill 32": "prefill_32", "prefill 128": "prefill_128"}   # bench kinds


def random_adapter(manifest: dict, density: float, seed: int, path: Path) -> Path:
    write_shira(path, random_shira(f"random-{seed}", patchable(manifest), r=None, seed=seed, density=density))
    return path


def median_ms(samples) -> float:
    return float(np.median(samples) * 1e3)


def onnx_latency(export_dir: Path, manifest: dict, adapter: Path, threads: int, repeats: int) -> dict:
    baseline = OrtBaseline(export_dir, manifest, threads)   # the base model's best configuration: prepacking on
    plain = baseline.base_session()
    rts = {p: Runtime(export_dir, threads=threads, policy=p, in_place=False) for p in ("instant", "auto")}
    rts["packed-in-place"] = Runtime(export_dir, threads=threads)
    for rt in rts.values():
        rt.switch(adapter)
        rt.wait_ready()
    results = {}
    for label, kind in SHAPES.items():
        seq, past = shape_of(kind)
        feeds = baseline.feeds(kind)
        calls = {"base (plain session)": lambda: plain.run(["logits"], feeds)}
        for policy, rt in rts.items():
            ids = np.full((1, seq), 5, np.int64)
            cache = None
            if past:
                _, cache = rt.step(np.full((1, past), 5, np.int64))
            calls[f"{policy} (adapter live)"] = lambda rt=rt, ids=ids, cache=cache: rt.step(ids, cache)
        samples = {k: [] for k in calls}
        for fn in calls.values():
            fn()
        for _ in range(repeats):
            for k, fn in calls.items():
                t = time.perf_counter()
                fn()
                samples[k].append(time.perf_counter() - t)
        base = median_ms(samples["base (plain session)"])
        results[label] = {k: {"ms": round(median_ms(v), 2), "x_base": round(median_ms(v) / base, 3)}
                          for k, v in samples.items()}
    for rt in rts.values():
        rt.close()
    return results


def switch_times(export_dir: Path, adapters: list[Path], threads: int, repeats: int, policies) -> dict:
    out = {}
    for policy in ("packed-in-place", *policies):
        in_place = policy == "packed-in-place"
        with Runtime(export_dir, threads=threads, policy="auto" if in_place else policy, in_place=in_place) as rt:
            rt.wait_ready()
            t = time.perf_counter()
            rt.switch(adapters[0])
            cold = time.perf_counter() - t
            rt.wait_ready()
            rt.plan(adapters[1])
            live, ready, scatter = [], [], []
            for i in range(repeats):
                t = time.perf_counter()
                rt.switch(adapters[(i + 1) % 2])
                live.append(time.perf_counter() - t)
                rt.wait_ready()
                ready.append(time.perf_counter() - t)
                scatter.append(rt.last_switch["scatter_s"])
            plan = rt.plan(adapters[0])
            out[policy] = {"first_switch_ms (read+validate+map+compose+scatter)": round(cold * 1e3, 1),
                           "switch_to_live_ms": round(median_ms(live), 2),
                           "switch_to_ready_ms": round(median_ms(ready), 1),
                           "scatter_ms (restore A + write B)": round(median_ms(scatter), 2),
                           "nnz": int(plan.positions.size), "plan_mb": round(plan.nbytes / 2**20, 1)}
    return out


def scatter_floor(export_dir: Path, adapter: Path, repeats: int) -> dict:
    """One plan's write alone vs the memory-bandwidth floor of the cache lines it touches."""
    from shira_edge.runtime.scatter import scatter_into

    with Runtime(export_dir, policy="instant", in_place=False) as rt:
        plan, flat = rt.plan(adapter), rt.weight_buffer.copy()   # the same kernel on a same-size copy
        lines = np.unique(plan.positions // 16).size
        big = np.empty(64 << 20, np.uint8)
        copy = []
        for _ in range(repeats):
            t = time.perf_counter()
            big[32 << 20:] = big[: 32 << 20]
            copy.append(time.perf_counter() - t)
        bandwidth = (32 << 20) * 2 / float(np.median(copy))     # bytes read + written per second
        one = []
        for threads in (1, 2):
            for _ in range(repeats):
                t = time.perf_counter()
                scatter_into(flat, plan.positions, plan.values, threads)
                one.append((threads, time.perf_counter() - t))
                scatter_into(flat, plan.positions, plan.base, threads)
        # LoRA fusion into the same buffers at the same parameter count (r = density * out*in / (out+in)):
        # W += B @ A per weight, in the buffer's layout (a transposed buffer gets (B @ A).T = A.T @ B.T).
        rng, lora = np.random.default_rng(0), []
        slots = [s for s in rt.slots.values() if s.patchable]
        factors = []
        for slot in slots:
            r = max(1, round(plan.positions.size / len(slots) / (slot.out + slot.inp)))
            b = rng.standard_normal((slot.out, r), dtype=np.float32)
            a = rng.standard_normal((r, slot.inp), dtype=np.float32)
            factors.append((slot, b, a) if slot.layout == "as_is" else (slot, a.T.copy(), b.T.copy()))
        for _ in range(repeats):
            t = time.perf_counter()
            for slot, left, right in factors:
                view = flat[slot.start: slot.start + slot.out * slot.inp].reshape(left.shape[0], right.shape[1])
                view += left @ right
            lora.append(time.perf_counter() - t)
        floor = lines * 64 * 2 / bandwidth
        res = {"touched_lines": int(lines), "touched_mb": round(lines * 64 / 2**20, 1),
               "copy_bandwidth_gb_s": round(bandwidth / 1e9, 2), "floor_ms": round(floor * 1e3, 2)}
        for threads in (1, 2):
            ms = median_ms([s for t, s in one if t == threads])
            res[f"scatter_ms_{threads}thread"] = round(ms, 2)
            res[f"x_floor_{threads}thread"] = round(ms / 1e3 / floor, 2)
        res["lora_fusion_ms (W += B@A, same params)"] = round(median_ms(lora), 1)
        res["lora_over_shira_scatter_1thread"] = round(median_ms(lora) / res["scatter_ms_1thread"], 1)
        return res


def executorch_numbers(export_dir: Path, adapters: list[Path], threads: int, repeats: int) -> dict:
    with Runtime(export_dir, threads=threads) as rt:
        ids = np.full((1, 32), 5, np.int64)
        t = time.perf_counter()
        rt.switch(adapters[0])
        cold = time.perf_counter() - t
        rt.plan(adapters[1])
        runs = {"base": [], "adapter": []}
        switch, scatter, reload = [], [], []
        for i in range(repeats):
            t = time.perf_counter()
            rt.switch(adapters[(i + 1) % 2])
            switch.append(time.perf_counter() - t)
            scatter.append(rt.last_switch["scatter_s"])
            reload.append(rt.last_switch["reload_s"])
            t = time.perf_counter()
            rt.run(ids)
            runs["adapter"].append(time.perf_counter() - t)
        rt.switch(None)
        for _ in range(repeats):
            t = time.perf_counter()
            rt.run(ids)
            runs["base"].append(time.perf_counter() - t)
        return {"first_switch_ms": round(cold * 1e3, 1), "switch_ms": round(median_ms(switch), 1),
                "scatter_ms": round(median_ms(scatter), 2), "reload_ms": round(median_ms(reload), 1),
                "prefill32_base_ms": round(median_ms(runs["base"]), 1),
                "prefill32_adapter_ms": round(median_ms(runs["adapter"]), 1)}


MEMORY_CHILD = r"""
import sys, time, gc, psutil, numpy as np
kind, d, adapters = sys.argv[1], sys.argv[2], sys.argv[3:]
import onnxruntime
from shira_edge.runtime import Runtime
proc = psutil.Process()
def mem():
    gc.collect(); m = proc.memory_full_info(); return m.rss, m.uss
r0, u0 = mem()
if kind == "plain":
    so = onnxruntime.SessionOptions()
    s = onnxruntime.InferenceSession(d + "/model.onnx", so, providers=["CPUExecutionProvider"])
    s.run(["logits"], {"input_ids": np.ones((1, 4), np.int64), "attention_mask": np.ones((1, 4), np.int64),
          "position_ids": np.arange(4)[None], **{i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
          for i in s.get_inputs()[3:]}})
else:
    rt = Runtime(d, policy=kind, in_place=False)
    for i in range(4):   # two adapters, switched back and forth: steady state, plans cached
        rt.switch(adapters[i % 2]); rt.wait_ready(); rt.run([[2, 3, 4, 5]])
r1, u1 = mem()
print(f"{(r1 - r0) / 2**20:.1f} {(u1 - u0) / 2**20:.1f}")
"""


def memory(export_dir: Path, adapters: list[Path]) -> dict:
    """USS (private memory) of a fresh process after loading: a plain session vs the runtime after 4 switches."""
    out = {}
    for kind in ("plain", "instant", "auto", "packed"):
        res = subprocess.run([sys.executable, "-c", MEMORY_CHILD, kind, str(export_dir), *map(str, adapters)],
                             capture_output=True, text=True, check=True)
        rss, uss = (float(x) for x in res.stdout.split())
        out[kind] = {"rss_mb": rss, "uss_mb": uss}
    base = out["plain"]["uss_mb"]
    for kind in ("instant", "auto", "packed"):
        out[kind]["extra_uss_mb_vs_plain"] = round(out[kind]["uss_mb"] - base, 1)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--onnx", type=Path, help="an ONNX export dir (shira-edge export)")
    ap.add_argument("--et", type=Path, help="an ExecuTorch export dir (shira-edge export --format executorch)")
    ap.add_argument("--density", type=float, default=0.01, help="adapter density (0.01 ~ r=4 on 768x768)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--skip", default="", help="comma list of sections to skip: latency,switch,floor,memory,et")
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    results = {"args": {k: str(v) for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory() as tmp:
        if args.onnx:
            manifest = json.loads((args.onnx / "manifest.json").read_text())
            adapters = [random_adapter(manifest, args.density, s, Path(tmp) / f"onnx{s}.shira") for s in (1, 2)]
            sections = {
                "latency": lambda: onnx_latency(args.onnx, manifest, adapters[0], args.threads, args.repeats),
                "switch": lambda: switch_times(args.onnx, adapters, args.threads, max(3, args.repeats // 2),
                                               ("instant", "auto", "packed")),
                "floor": lambda: scatter_floor(args.onnx, adapters[0], args.repeats),
                "memory": lambda: memory(args.onnx, adapters),
            }
            for name, fn in sections.items():
                if name not in skip:
                    results[f"onnx_{name}"] = fn()
                    print(json.dumps({f"onnx_{name}": results[f"onnx_{name}"]}, indent=1), flush=True)
        if args.et and "et" not in skip:
            manifest = json.loads((args.et / "manifest.json").read_text())
            adapters = [random_adapter(manifest, args.density, s, Path(tmp) / f"et{s}.shira") for s in (1, 2)]
            results["executorch"] = executorch_numbers(args.et, adapters, args.threads, max(3, args.repeats // 2))
            print(json.dumps({"executorch": results["executorch"]}, indent=1), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()

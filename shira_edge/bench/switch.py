"""Part (b): switch-to-ready on the exported model, SHiRA through `Runtime.switch` against LoRA fusion and against
loading a fully fused model from disk, per backend and per r.

Each sample switches from one adapter to another (the app case) and is timed until a run produces the new
adapter's output at full speed. Every round runs each mode once, in this order:

- shira_warm:   Runtime.switch(Y) from X's state, with Y already read and mapped (cached), then `wait_ready`, one
                decode step. On ONNX Runtime's packed-in-place path the switch writes into the packed weights, so
                wait_ready returns at once and the decode step is at full speed; on its rebuild path (fallback)
                wait_ready waits for the background rebuild. `live` = until switch() returned: from then on every
                run computes with Y.
- shira_cold:   back to X from Y, from a file the runtime has never seen (a fresh copy of X under a new name each
                sample; its cache entries are dropped afterwards, untimed, so memory stays flat).
- lora_fused:   X <-> Y alternately, W += [B_y, -B_x] @ [A_y; A_x] in the runtime backend's own buffers (`fuse`:
                the weight update, all a LoRA runtime without prepacking would wait for), then the backend
                rebuilds its prepacked session / reloads its method, and one decode step.
- naive_reload: load the fully fused Y model from disk as a new session / program, and one decode step.
- full_speed:   (shira_warm, lora_fused) until the runtime computes with the new weights at full speed, before the
                decode step both then run: for SHiRA packed-in-place that is when switch() returns.
- floor_copy:   a plain memory copy of as many bytes as the switch touches (every 64-byte cache line that holds a
                position of X or Y): the memory-bandwidth floor of any in-place switch.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from .adapters import patchable
from .engines import PlainModel, runtime_cache, token_ids
from .lora_fused import LoraFused
from .stats import interleave, paired_ratio, summarize

LINE_FLOATS = 16   # 64-byte cache lines of float32


def touched_lines(*position_arrays: np.ndarray) -> int:
    """Distinct 64-byte lines holding any of these flat float32 positions (buffers start line-aligned)."""
    return int(np.unique(np.concatenate([p // LINE_FLOATS for p in position_arrays])).size)


def run(export_dir: Path, manifest: dict, r: int, shira: tuple[Path, Path], lora: tuple[list, list],
        fused_dir: Path, cold_dir: Path, threads: int, samples: int, warmup: int, progress=None) -> dict:
    from ..runtime import Runtime

    backend = manifest["backend"]
    x_path, y_path = shira
    lora_x, lora_y = lora
    decode_ids = token_ids("decode", manifest["io"]["vocab_size"])
    cache = runtime_cache(manifest, "decode")

    started = time.perf_counter()
    rt = Runtime(export_dir, threads=threads, policy="auto", scatter_threads=threads)
    startup = {"runtime_s": time.perf_counter() - started, **rt.start_timings}
    switch_path = rt.switch_path
    lf = LoraFused(export_dir, manifest, threads)
    try:
        plan_x, plan_y = rt.plan(x_path), rt.plan(y_path)     # warm: both read, mapped and composed
        rt.switch(x_path)
        rt.wait_ready()
        lines = touched_lines(plan_x.positions, plan_y.positions)
        src, dst = np.ones(lines * LINE_FLOATS, np.float32), np.zeros(lines * LINE_FLOATS, np.float32)
        lora_plans = {"y": lf.plan(None, lora_x)}
        LoraFused.fuse(lora_plans["y"])                        # LoRA starts from X too
        lora_plans = {"y": lf.plan(lora_x, lora_y), "x": lf.plan(lora_y, lora_x)}
        state = {"lora": "y", "cold": 0, "naive": None}
        cold_dir.mkdir(parents=True, exist_ok=True)

        def timed_switch(target) -> dict:
            t0 = time.perf_counter()
            rt.switch(target)
            t1 = time.perf_counter()
            scatter = rt.last_switch.get("scatter_s", float("nan"))
            rt.wait_ready()
            t2 = time.perf_counter()
            rt.step(decode_ids, cache)
            return {"live": t1 - t0, "scatter": scatter, "full_speed": t2 - t0, "ready": time.perf_counter() - t0}


        def cold_setup():
            state["cold"] += 1
            state["cold_path"] = cold_dir / f"{x_path.stem}-cold{state['cold']}.shira"
            shutil.copyfile(x_path, state["cold_path"])

        def cold_teardown():
            # It stays live (the next warm switch leaves it), but is dropped from the caches: memory stays flat.
            rt.forget(state["cold_path"])
            state["cold_path"].unlink()

        def lora_fused():
            plan = lora_plans[state["lora"]]
            state["lora"] = "x" if state["lora"] == "y" else "y"
            t0 = time.perf_counter()
            LoraFused.fuse(plan)
            t1 = time.perf_counter()
            lf.rebuild()
            t2 = time.perf_counter()
            lf.step(decode_ids, cache)
            return {"fuse": t1 - t0, "full_speed": t2 - t0}

        def naive_reload():
            state["naive"] = None   # an app drops the old model, then loads the next one
            state["naive"] = PlainModel(backend, export_dir, manifest, threads, model_dir=fused_dir)
            state["naive"].call("decode")()

        modes = {"shira_warm": lambda: timed_switch(y_path), "shira_cold": lambda: timed_switch(state["cold_path"]),
                 "lora_fused": lora_fused, "naive_reload": naive_reload, "floor_copy": lambda: np.copyto(dst, src)}
        times = interleave(modes, samples, warmup, setup={"shira_cold": cold_setup},
                           teardown={"shira_cold": cold_teardown}, progress=progress)
    finally:
        rt.close()
        lf.close()

    warm_live, warm_ready = times["shira_warm.live"], times["shira_warm.ready"]
    result = {
        "backend": backend, "r": r, "nnz": int(plan_y.positions.size),
        "density": plan_y.positions.size / sum(w["shape"][0] * w["shape"][1] for w in patchable(manifest)),
        "touched_bytes": lines * LINE_FLOATS * 4, "policy": "auto", "switch_path": switch_path, "startup": startup,
        "modes": {k: summarize(v) for k, v in times.items()},
        "ratios": {
            # the weight update into the same buffers: live for SHiRA, fused for LoRA
            "lora_fuse_over_shira_live": paired_ratio(times["lora_fused.fuse"], warm_live),
            "lora_ready_over_shira_ready": paired_ratio(times["lora_fused"], warm_ready),
            # until the runtime computes the new weights at full speed, without the first call both then make
            "lora_full_speed_over_shira_full_speed": paired_ratio(times["lora_fused.full_speed"],
                                                                  times["shira_warm.full_speed"]),
            "naive_ready_over_shira_ready": paired_ratio(times["naive_reload"], warm_ready),
            "lora_ready_over_shira_live": paired_ratio(times["lora_fused"], warm_live),
            "naive_ready_over_shira_live": paired_ratio(times["naive_reload"], warm_live),
            "shira_cold_ready_over_warm_ready": paired_ratio(times["shira_cold.ready"], warm_ready),
            "shira_scatter_over_floor": paired_ratio(times["shira_warm.scatter"], times["floor_copy"]),
            "shira_live_over_floor": paired_ratio(warm_live, times["floor_copy"]),
        },
    }
    return result

"""Part (c): inference latency, decode (1 token after DECODE_PAST cached ones) and prefill (32 and 128 tokens).

Modes, interleaved per figure:
- base_all / base_extended (ONNX Runtime): a plain prepacked session at ORT_ENABLE_ALL and at the export's own level;
  base (ExecuTorch): the program as shipped. "base best" is whichever base mode has the lower median here.
- shira_steady: Runtime (policy "auto") with a SHiRA adapter live and `ready`.
- shira_after_switch: the first call right after a switch (the switch itself untimed, X and Y alternating). On ONNX
  Runtime's packed-in-place path and on ExecuTorch that is the same runtime. On ONNX Runtime's rebuild path the
  first calls are served by the direct (prepacking off) session until the background rebuild is in; that is
  measured on a second Runtime with policy "instant" (which only ever uses that session), so that no sample waits
  for a rebuild; on a machine with few cores the rebuild's own CPU use comes on top, for about a second per switch.
- lora_unfused (ONNX Runtime): LoRA A/B as extra graph inputs on side branches of every adapted MatMul, the way
  ONNX Runtime's multi-LoRA support runs adapters without fusing them.
"""

from __future__ import annotations

from pathlib import Path

from .engines import PlainModel, kinds, stepper
from .stats import interleave, paired_ratio, summarize


def run(export_dir: Path, manifest: dict, r: int, shira: tuple[Path, Path], lora_graph: Path | None,
        lora_feeds: dict | None, threads: int, samples: int, warmup: int, progress=None) -> dict:
    from ..runtime import Runtime

    backend = manifest["backend"]
    if backend == "onnxruntime":
        bases = {"base_all": PlainModel(backend, export_dir, manifest, threads, level="ORT_ENABLE_ALL"),
                 "base_extended": PlainModel(backend, export_dir, manifest, threads,
                                             level=manifest["files"].get("graph_optimization_level", "ORT_ENABLE_EXTENDED"))}
    else:
        bases = {"base": PlainModel(backend, export_dir, manifest, threads)}
    unfused = (PlainModel(backend, export_dir, manifest, threads, model_path=lora_graph, extra_feeds=lora_feeds)
               if lora_graph is not None else None)
    rt = Runtime(export_dir, threads=threads, policy="auto", scatter_threads=threads)
    x_path, y_path = shira
    rt.plan(x_path), rt.plan(y_path)
    rt.switch(x_path)
    rt.wait_ready()
    instant = None
    if backend == "onnxruntime" and rt.switch_path == "rebuild":
        instant = Runtime(export_dir, threads=threads, policy="instant", scatter_threads=threads)
        instant.switch(x_path)
    state = {"next": y_path}

    def switch_untimed():
        rt.switch(state["next"])
        state["next"] = x_path if state["next"] == y_path else y_path

    figures = {}
    try:
        for kind in kinds():
            modes = {name: b.call(kind) for name, b in bases.items()}
            modes["shira_steady"] = stepper(rt, manifest, kind)
            modes["shira_after_switch"] = stepper(instant or rt, manifest, kind)
            if unfused is not None:
                modes["lora_unfused"] = unfused.call(kind)
            setup = {} if instant else {"shira_after_switch": switch_untimed}
            times = interleave(modes, samples, warmup, setup=setup, progress=progress)
            best = min(bases, key=lambda n: summarize(times[n])["median"])
            figures[kind] = {
                "modes": {k: summarize(v) for k, v in times.items()}, "base_best": best,
                "over_base_best": {k: paired_ratio(v, times[best]) for k, v in times.items() if k != best},
            }
    finally:
        rt.close()
        if instant is not None:
            instant.close()
    return {"backend": backend, "r": r, "switch_path": rt.switch_path, "figures": figures}

"""Part (d): peak resident memory of each mode, each in a fresh Python process (a process never gives memory back
to the OS reliably, so measuring modes one after another in one process would be meaningless).

    python -m shira_edge.bench.memory '{"mode": "shira", "export_dir": "out/", "threads": 2, "shira": ["a.shira", "b.shira"]}'

prints one JSON line: peak RSS (VmHWM of /proc/self/status: the high-water mark of this process image; getrusage's
ru_maxrss would carry over the parent's size across fork+exec) and the RSS right after imports, before any model is loaded,
so the model's own share is peak - baseline. Every mode loads, switches (where it can) between two adapters and runs
a decode step and a 128-token prefill after each.

RSS alone misstates the packed-in-place runtime: its weights live in a tmpfs file, which RSS counts only where
mapped, and twice where ORT's mapping and the patch mapping both hold a page. So every mode is also measured as its
*footprint*: private and file-backed resident memory (VmRSS - RssShmem) plus the tmpfs bytes of the files this
process holds open or is writing (each counted once), sampled every few ms by `Footprint`: the peak (start-up
included) and the value at the end (steady state, after the switches, taken while the model is still open: closing
the runtime frees its cache, and an end read after it would flatter it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

MODES = ("base", "shira", "lora_fused", "lora_unfused", "naive_reload")


def measure(spec: dict) -> dict:
    import psutil

    from ..runtime.manifest import read_manifest
    from .engines import PlainModel, set_threads, stepper

    export_dir, mode, threads = Path(spec["export_dir"]), spec["mode"], int(spec["threads"])
    manifest = read_manifest(export_dir)
    backend = manifest["backend"]
    if backend == "executorch" or mode == "lora_fused":
        import torch  # noqa: F401  (loaded by every ExecuTorch mode; LoRA fusion uses it too)
    if backend == "executorch":
        from executorch.extension.pybindings import portable_lib  # noqa: F401
    if backend == "onnxruntime":
        import onnxruntime  # noqa: F401
    set_threads(threads)
    baseline = psutil.Process().memory_info().rss
    footprint = Footprint()
    kinds = ("decode", "prefill_128")

    steady = None   # (footprint, tmpfs) at the end, taken before anything is closed

    def run_all(obj, calls=None):
        for kind in kinds:
            (calls(kind) if calls else stepper(obj, manifest, kind))()

    if mode == "base":
        base = PlainModel(backend, export_dir, manifest, threads)
        run_all(None, base.call)
    elif mode == "shira":
        from ..runtime import Runtime

        with Runtime(export_dir, threads=threads, policy="auto", scatter_threads=threads) as rt:
            for path in spec["shira"]:
                rt.switch(path)
                rt.wait_ready()
                run_all(rt)
            steady = footprint.sample()   # while the runtime is open: closing it frees its cache
    elif mode == "lora_fused":
        from .adapters import patchable, random_lora
        from .lora_fused import LoraFused

        lf = LoraFused(export_dir, manifest, threads)
        weights = patchable(manifest)
        old = None
        for seed in (1, 2):
            new = random_lora(weights, spec["r"], seed)
            LoraFused.fuse(lf.plan(old, new))
            lf.rebuild()
            run_all(lf)
            old = new
        steady = footprint.sample()
        lf.close()
    elif mode == "lora_unfused":
        from .adapters import random_lora
        from .adapters import patchable
        from .ort_baseline import OrtBaseline

        side = OrtBaseline(export_dir, manifest, threads)
        feeds = side.lora_feeds(random_lora(patchable(manifest), spec["r"], 1))
        model = PlainModel(backend, export_dir, manifest, threads, model_path=Path(spec["lora_graph"]),
                           extra_feeds=feeds)
        run_all(None, model.call)
    elif mode == "naive_reload":
        model = None
        for _ in range(2):
            model = None
            model = PlainModel(backend, export_dir, manifest, threads, model_dir=Path(spec["fused_dir"]))
            run_all(None, model.call)
    else:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    peak = peak_rss()
    end, peak_footprint, tmpfs_end = footprint.stop()
    if steady is not None:
        end, tmpfs_end = steady
    return {"mode": mode, "backend": backend, "r": spec.get("r"), "peak_rss_bytes": peak,
            "baseline_rss_bytes": baseline, "model_rss_bytes": peak - baseline,
            "peak_footprint_bytes": peak_footprint, "end_footprint_bytes": end, "tmpfs_end_bytes": tmpfs_end}


class Footprint:
    """Samples (VmRSS - RssShmem) + tmpfs bytes of this process's files in a thread until `stop()`:
    returns (value now, peak, tmpfs bytes now). With record=True every sample is kept in `samples` as
    (time.perf_counter(), value), for a peak per phase (benchmarks/onnx_startup.py)."""

    def __init__(self, interval: float = 0.003, record: bool = False):
        self.peak, self._stop = 0, threading.Event()
        self.samples: list[tuple[float, int]] | None = [] if record else None
        self._thread = threading.Thread(target=self._loop, args=(interval,), daemon=True)
        self._thread.start()

    @staticmethod
    def tmpfs_bytes() -> int:
        from ..runtime.onnx_packed import PREFIX, pack_dir   # the pack cache's own directories, before unlinking

        seen, total = set(), 0
        try:
            paths = [f"/proc/self/fd/{fd}" for fd in os.listdir("/proc/self/fd")]
            root = pack_dir()
            paths += [str(f) for d in root.glob(f"{PREFIX}{os.getpid()}-*") for f in d.iterdir()]
        except Exception:   # no tmpfs here: nothing to count
            root = None
        for path in paths:
            try:
                st = os.stat(path)
                target = os.readlink(path) if path.startswith("/proc/") else path
            except OSError:
                continue
            on_tmpfs = target.startswith(("/dev/shm/", "/memfd:")) or (root is not None and target.startswith(str(root)))
            if on_tmpfs and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
        return total

    @staticmethod
    def resident() -> int:
        fields = {}
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":")[0]
                if key in ("VmRSS", "RssShmem"):
                    fields[key] = int(line.split()[1]) * 1024
        return fields.get("VmRSS", 0) - fields.get("RssShmem", 0)

    def sample(self) -> tuple[int, int]:
        tmpfs = self.tmpfs_bytes()
        value = self.resident() + tmpfs
        self.peak = max(self.peak, value)
        if self.samples is not None:
            self.samples.append((time.perf_counter(), value))
        return value, tmpfs

    def _loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.sample()

    def stop(self) -> tuple[int, int, int]:
        self._stop.set()
        self._thread.join()
        value, tmpfs = self.sample()
        return value, self.peak, tmpfs


def peak_rss() -> int:
    """Peak resident bytes of this process image (Linux VmHWM; elsewhere ru_maxrss, which may include a parent's)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    scale = 1 if sys.platform == "darwin" else 1024   # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def run_isolated(spec: dict, timeout: float = 900) -> dict:
    """Run `measure(spec)` in a fresh interpreter and return its result."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "shira_edge.bench.memory", json.dumps(spec)], capture_output=True,
                          text=True, env=env, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"memory measurement of mode {spec['mode']!r} failed (exit {proc.returncode}): {tail}")
    return json.loads(lines[-1])


def main(argv: list[str]) -> int:
    print(json.dumps(measure(json.loads(argv[0]))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

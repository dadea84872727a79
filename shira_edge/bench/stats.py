"""Timing method shared by every part: warm-up, interleaved rounds (A B A B ...), medians with min/max, paired ratios.

    >>> import time
    >>> samples = interleave({"a": lambda: None, "b": lambda: time.sleep(0.001)}, samples=5, warmup=1)
    >>> s = summarize(samples["b"]); s["n"], s["min"] <= s["median"] <= s["max"]
    (5, True)
    >>> paired_ratio(samples["b"], samples["a"])["median"] > 1
    True

Machines here are shared, so no figure is measured alone: modes that are compared run in the same loop, round by
round, and a ratio is computed within each round (where both sides saw the same machine state) before taking the
median of those per-round ratios.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Callable


def summarize(samples: list[float]) -> dict:
    """{"median", "min", "max", "p25", "p75", "n", "samples"}: every raw sample is kept so bench.json can be
    re-analysed; p25-p75 is the spread quoted beside a median."""
    if not samples:
        raise ValueError("no samples to summarize")
    p25, _, p75 = statistics.quantiles(samples, n=4) if len(samples) > 1 else (samples[0],) * 3
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "p25": p25, "p75": p75,
            "median_ci95": median_ci(samples), "n": len(samples), "samples": list(samples)}


def median_ci(samples: list[float], confidence: float = 0.95) -> list[float]:
    """Distribution-free confidence interval of the median: order statistics j and n-1-j, the narrowest pair that
    holds the median with at least `confidence` (binomial(n, 1/2)); the whole range when n is too small.

    >>> median_ci(list(range(25)))        # ranks 7 and 17 of 25 (coverage 0.957)
    [7, 17]
    """
    xs, n = sorted(samples), len(samples)
    for j in range(n // 2, -1, -1):
        if sum(math.comb(n, i) for i in range(j, n - j)) / 2 ** n >= confidence:
            return [xs[j], xs[n - 1 - j]]
    return [xs[0], xs[-1]]


def resummarize(obj):
    """A result read back from bench.json with every summary recomputed from its raw samples (new statistics for
    old runs, without measuring again)."""
    if isinstance(obj, dict):
        if "samples" in obj and "median" in obj:
            return summarize(obj["samples"])
        return {k: resummarize(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [resummarize(v) for v in obj]
    return obj


def paired_ratio(numerator: list[float], denominator: list[float]) -> dict:
    """Round-by-round ratios numerator[i] / denominator[i], summarized (median, min, max and every ratio)."""
    if len(numerator) != len(denominator):
        raise ValueError(f"paired samples differ in length: {len(numerator)} vs {len(denominator)}")
    return summarize([a / b for a, b in zip(numerator, denominator)])


def interleave(modes: dict[str, Callable[[], object]], samples: int, warmup: int = 1,
               setup: dict[str, Callable[[], object]] | None = None,
               teardown: dict[str, Callable[[], object]] | None = None,
               progress: Callable[[], object] | None = None) -> dict[str, list[float]]:
    """Time each mode `samples` times, one of each per round, after `warmup` untimed rounds.

    `setup[name]` / `teardown[name]` (optional) run untimed right before / after each call of that mode. A mode
    that returns a dict of named durations (seconds, measured inside the call) gets them recorded too, as
    "<mode>.<key>" lists beside "<mode>" (the whole call).
    """
    setup, teardown = setup or {}, teardown or {}
    times: dict[str, list[float]] = {name: [] for name in modes}
    for round_ in range(warmup + samples):
        for name, fn in modes.items():
            if name in setup:
                setup[name]()
            start = time.perf_counter()
            parts = fn()
            elapsed = time.perf_counter() - start
            if name in teardown:
                teardown[name]()
            if round_ >= warmup:
                times[name].append(elapsed)
                for key, value in (parts.items() if isinstance(parts, dict) else ()):
                    times.setdefault(f"{name}.{key}", []).append(float(value))
        if progress is not None:
            progress()
    return times


def machine_info() -> dict:
    """What the numbers were measured on: CPU, cores, memory, load, and the library versions."""
    from importlib.metadata import PackageNotFoundError, version

    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    versions = {}
    for pkg in ("shira-edge", "numpy", "torch", "onnxruntime", "executorch", "onnx", "transformers"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    return {
        "git_commit": _git_commit(),
        "cpu": cpu, "machine": platform.machine(), "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(), "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "versions": versions,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _git_commit() -> str | None:
    """The checkout's commit (with "+dirty" when files differ), so a result names the code that produced it."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("+dirty" if dirty else "")) if commit else None

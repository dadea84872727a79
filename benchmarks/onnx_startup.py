"""Start-up of the packed-in-place ONNX runtime, step by step: seconds and the memory footprint peak of each step,
against the footprint peak of a plain prepacked session that loads and runs a decode step and a 128-token prefill
(`shira-edge bench` part (d), mode "base"), each in a fresh process.

    python benchmarks/onnx_startup.py /tmp/exports/opt125m-onnx --threads 1

Footprint = resident memory without tmpfs pages + the tmpfs files the process holds (shira_edge/bench/memory.py,
the same measure as `shira-edge bench` part (d)), sampled every 3 ms by its `Footprint`; a step's peak is the largest
sample taken while it ran (`Runtime.start_timings` gives the steps). Prints one table (markdown) and, with
--json, the raw figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MIB = 2 ** 20


def runtime_steps(export_dir: str, threads: int) -> dict:
    """In this process: start a Runtime over export_dir while sampling the footprint; per-step seconds and peaks."""
    import onnxruntime  # noqa: F401  (imported before the baseline, as a plain session would)

    from shira_edge.bench.memory import Footprint
    from shira_edge.runtime import Runtime

    footprint = Footprint(record=True)
    with Runtime(export_dir, threads=threads) as rt:
        done = time.perf_counter()
        end, peak, _ = footprint.stop()
        timings, path = dict(rt.start_timings), rt.switch_path
    samples = footprint.samples
    if path != "packed-in-place":
        raise SystemExit(f"{export_dir}: the runtime fell back to {path!r}; nothing to measure")
    total = timings.pop("total")
    at, steps = done - total, []
    for step, seconds in timings.items():
        inside = [v for t, v in samples if at <= t < at + seconds]
        steps.append({"step": step, "seconds": seconds, "peak_bytes": max(inside, default=0)})
        at += seconds
    return {"steps": steps, "total_seconds": total, "end_bytes": end, "peak_bytes": peak}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export_dir")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="also write the raw figures here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(runtime_steps(args.export_dir, args.threads)))
        return 0

    from shira_edge.bench.memory import run_isolated

    plain = run_isolated({"mode": "base", "export_dir": args.export_dir, "threads": args.threads, "shira": []})
    child = subprocess.run([sys.executable, __file__, args.export_dir, "--threads", str(args.threads), "--child"],
                           capture_output=True, text=True, check=False)
    if child.returncode != 0:
        sys.stderr.write(child.stderr)
        return child.returncode
    ours = json.loads(child.stdout.strip().splitlines()[-1])
    base = plain["peak_footprint_bytes"]
    print(f"plain prepacked session: footprint peak {base / MIB:.0f} MiB\n")
    print("| step | seconds | footprint peak | vs plain session |\n|---|---|---|---|")
    for s in ours["steps"]:
        print(f"| {s['step']} | {s['seconds']:.2f} | {s['peak_bytes'] / MIB:.0f} MiB | {s['peak_bytes'] / base:.2f}x |")
    print(f"| **start-up** | {ours['total_seconds']:.2f} | {ours['peak_bytes'] / MIB:.0f} MiB | "
          f"**{ours['peak_bytes'] / base:.2f}x** |")
    print(f"| after start-up | | {ours['end_bytes'] / MIB:.0f} MiB | {ours['end_bytes'] / base:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"plain": plain, "runtime": ours}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

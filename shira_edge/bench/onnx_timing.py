"""Time an ONNX export on this CPU, the runtime's way (manifest settings: prepacking off, weights in our buffers)
against ORT's default (prepacking on, weights read from the data file): session creation, one 32-token prefill,
one decode step after it. Prepacking off is what makes in-place patching work; this says what it costs.

    python -m shira_edge.bench.onnx_timing /tmp/opt125m-onnx [--repeats 5]

Both configurations run interleaved, round after round, so load from other processes hits them alike; medians (ms)
and the ratio off/on are printed as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from shira_edge.exporters import onnx_verify
from shira_edge.runtime.manifest import read_manifest

KEYS = ("create", "first_prefill", "prefill", "decode")


def _default_session(export_dir: Path, model_file: str):
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, onnx_verify.OPT_LEVEL)
    return ort.InferenceSession(str(export_dir / model_file), so, providers=["CPUExecutionProvider"])


def measure(export_dir: Path, repeats: int = 5, prompt_len: int = 32) -> dict:
    manifest = read_manifest(export_dir)
    layers = manifest["io"]["cache"]["num_layers"]
    ids = (np.arange(prompt_len + 1, dtype=np.int64)[None] * 7919) % (manifest["io"]["vocab_size"] - 3) + 3
    mask = np.ones_like(ids)
    pos = np.arange(prompt_len + 1, dtype=np.int64)[None]
    makers = {
        "manifest (prepacking off, own buffers)": lambda: onnx_verify.open_session(export_dir, manifest["weights"]),
        "ort default (prepacking on)": lambda: _default_session(export_dir, manifest["files"]["model"]),
    }
    times = {name: {key: [] for key in KEYS} for name in makers}
    for _ in range(repeats):
        for name, make in makers.items():
            start = time.perf_counter()
            made = make()
            sess = getattr(made, "session", made)
            marks = [start, time.perf_counter()]
            for _ in range(2):  # the first prefill after creation pays one-off allocations; the second is steady
                _, past = onnx_verify.run(sess, layers, ids[:, :prompt_len], mask[:, :prompt_len],
                                          pos[:, :prompt_len])
                marks.append(time.perf_counter())
            onnx_verify.run(sess, layers, ids[:, prompt_len:], mask, pos[:, prompt_len:], past)
            marks.append(time.perf_counter())
            for key, a, b in zip(KEYS, marks, marks[1:]):
                times[name][key].append((b - a) * 1e3)
            del sess, made
    medians = {name: {k: round(statistics.median(v), 2) for k, v in d.items()} for name, d in times.items()}
    off, on = medians.values()
    return {"export_dir": str(export_dir), "prompt_len": prompt_len, "repeats": repeats, "median_ms": medians,
            "ratio_off_over_on": {k: round(off[k] / on[k], 3) for k in off}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt-len", type=int, default=32)
    args = parser.parse_args()
    print(json.dumps(measure(args.export_dir, args.repeats, args.prompt_len), indent=2))


if __name__ == "__main__":
    main()

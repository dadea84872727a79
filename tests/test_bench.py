"""`shira-edge bench --quick` on the tiny model, both backends: every part present with sane, self-consistent values.

Timings here prove nothing about speed (tiny model, shared CI cores); the goals are checked by the real benchmark
(docs/benchmarks.md). What is tested: the structure, that every figure has its samples, that summaries and paired
ratios are computed from those samples, and that bad input fails with a clear message.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import pytest
from click.testing import CliRunner

from shira_edge.bench.stats import interleave, paired_ratio, summarize
from shira_edge.cli import main

SAMPLES = 2


@pytest.fixture(scope="session")
def tiny_exports(tmp_path_factory):
    """Both tiny exports, made by the real CLI in two processes side by side (they are independent)."""
    root = tmp_path_factory.mktemp("bench-exports")
    cli = [sys.executable, "-m", "shira_edge.cli", "export", "--model", "tiny-opt", "--max-seq-len", "256"]
    procs = [subprocess.Popen([*cli, "--format", fmt, "-o", str(root / fmt)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
             for fmt in ("onnx", "executorch")]
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-2000:]
    return root


@pytest.fixture(scope="session")
def quick_bench(tiny_exports, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out"
    result = CliRunner().invoke(main, ["bench", "--model", "tiny-opt", "--backend", "all", "--r", "4", "--quick",
                                       "--samples", str(SAMPLES), "--threads", "1",
                                       "--export-dir", str(tiny_exports / "onnx"),
                                       "--export-dir", str(tiny_exports / "executorch"), "-o", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return out, json.loads((out / "bench.json").read_text()), result.output


def check_summary(s: dict, n: int = SAMPLES) -> None:
    assert s["n"] == len(s["samples"]) == n
    assert all(x > 0 for x in s["samples"])
    assert s["min"] == min(s["samples"]) <= s["median"] == statistics.median(s["samples"]) <= s["max"] == max(s["samples"])


def check_ratio(ratio: dict, num: dict, den: dict) -> None:
    check_summary(ratio)
    assert ratio["samples"] == pytest.approx([a / b for a, b in zip(num["samples"], den["samples"])])


def test_files_and_top_level(quick_bench):
    out, bench, output = quick_bench
    assert (out / "bench.md").read_text().startswith("# shira-edge bench: tiny-opt")
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "work").exists()           # fused copies and cold adapters are cleaned up
    assert set(bench["parts"]) == {"a_weight_update", "b_switch", "c_inference", "d_memory"}
    assert bench["settings"]["threads"] == 1 and bench["settings"]["samples"] == SAMPLES
    assert bench["machine"]["versions"]["onnxruntime"] and bench["machine"]["logical_cores"] >= 1
    assert "1 threads everywhere" in output and "bench.json" in output


def test_weight_update(quick_bench):
    rows = quick_bench[1]["parts"]["a_weight_update"]["rows"]
    assert [r["label"] for r in rows] == ["1024x1024", "2048x2048", "3072x3072", "4096x4096", "tiny-opt (12 weights)"]
    for row in rows:
        m, n = row["shapes"][0]
        assert row["nnz"] == sum(min(4 * (a + b), a * b) for a, b in row["shapes"])   # equal params: r(m+n)
        check_summary(row["shira_scatter"]), check_summary(row["lora_fusion"])
        check_ratio(row["speedup"], row["lora_fusion"], row["shira_scatter"])


@pytest.mark.parametrize("backend", ["onnxruntime", "executorch"])
def test_switch(quick_bench, backend):
    (b,) = [b for b in quick_bench[1]["parts"]["b_switch"] if b["backend"] == backend]
    modes = b["modes"]
    for key in ("shira_warm", "shira_warm.live", "shira_warm.ready", "shira_cold.live", "shira_cold.ready",
                "lora_fused", "lora_fused.fuse", "naive_reload", "floor_copy"):
        check_summary(modes[key])
    for live, ready in zip(modes["shira_warm.live"]["samples"], modes["shira_warm.ready"]["samples"]):
        assert live <= ready                      # ready includes the first full-speed run
    check_ratio(b["ratios"]["lora_fuse_over_shira_live"], modes["lora_fused.fuse"], modes["shira_warm.live"])
    check_ratio(b["ratios"]["naive_ready_over_shira_ready"], modes["naive_reload"], modes["shira_warm.ready"])
    assert 0 < b["touched_bytes"] and b["nnz"] == 4 * sum(a + c for a, c in [(32, 32)] * 8 + [(64, 32), (32, 64)] * 2)
    if backend == "onnxruntime":   # the runtime's own path, recorded so a result says which design it measured
        assert b["switch_path"] == "packed-in-place"


@pytest.mark.parametrize("backend", ["onnxruntime", "executorch"])
def test_inference(quick_bench, backend):
    (c,) = [c for c in quick_bench[1]["parts"]["c_inference"] if c["backend"] == backend]
    assert list(c["figures"]) == ["decode", "prefill_32", "prefill_128"]
    expected = {"shira_steady", "shira_after_switch"} | ({"base_all", "base_extended", "lora_unfused"}
                                                         if backend == "onnxruntime" else {"base"})
    for f in c["figures"].values():
        assert set(f["modes"]) == expected
        for s in f["modes"].values():
            check_summary(s)
        best = f["base_best"]
        assert f["modes"][best]["median"] == min(f["modes"][n]["median"] for n in expected if n.startswith("base"))
        for name, ratio in f["over_base_best"].items():
            check_ratio(ratio, f["modes"][name], f["modes"][best])


def test_memory(quick_bench):
    mem = quick_bench[1]["parts"]["d_memory"]
    got = {(d["backend"], d["mode"]) for d in mem}
    assert got == {("onnxruntime", m) for m in ("base", "naive_reload", "shira", "lora_fused", "lora_unfused")} | \
        {("executorch", m) for m in ("base", "naive_reload", "shira", "lora_fused")}
    for d in mem:
        assert d["peak_rss_bytes"] >= d["baseline_rss_bytes"] > 10 * 2**20
        assert d["peak_footprint_bytes"] >= d["end_footprint_bytes"] > 10 * 2**20
    (shira,) = [d for d in mem if d["backend"] == "onnxruntime" and d["mode"] == "shira"]
    assert shira["tmpfs_end_bytes"] > 0     # the packed-in-place cache is counted, not hidden in shared pages


def test_headline_goals_computed(quick_bench):
    goals = quick_bench[1]["headline"]["goals"]
    assert any(k.startswith("a_4096") for k in goals) and any(k.startswith("c_steady") for k in goals)
    for prefix in ("b_r4_ready", "b_floor", "c_after", "d_memory onnxruntime"):
        assert any(k.startswith(prefix) for k in goals), prefix
    assert all(isinstance(g["met"], bool) and g["measured"] for g in goals.values())


def test_stats_pairing_and_order():
    calls = []
    times = interleave({"a": lambda: calls.append("a"), "b": lambda: calls.append("b") or {"part": 1.0}},
                       samples=3, warmup=1)
    assert calls == ["a", "b"] * 4                   # warm-up round, then A B A B ...
    assert len(times["a"]) == len(times["b"]) == 3 and times["b.part"] == [1.0] * 3
    assert paired_ratio([2.0, 9.0], [1.0, 3.0])["samples"] == [2.0, 3.0]
    with pytest.raises(ValueError, match="differ in length"):
        paired_ratio([1.0], [1.0, 2.0])
    assert summarize([3.0, 1.0, 2.0])["median"] == 2.0


@pytest.mark.parametrize("args, message", [
    (["--r", "4,x"], "comma-separated positive integers"),
    (["--r", "0"], "comma-separated positive integers"),
    (["--backend", "tflite"], "'tflite' is not one of"),
], ids=["r-not-int", "r-zero", "bad-backend"])
def test_bad_flags(tmp_path, args, message):
    result = CliRunner().invoke(main, ["bench", "--model", "tiny-opt", *args, "-o", str(tmp_path / "b")])
    assert result.exit_code == 2 and message in result.output


def test_export_dir_of_another_model(tiny_exports, tmp_path):
    result = CliRunner().invoke(main, ["bench", "--model", "opt-125m", "--random-init", "--backend", "onnxruntime",
                                       "--export-dir", str(tiny_exports / "onnx"), "-o", str(tmp_path / "b")])
    assert result.exit_code == 1 and "--export-dir" in result.output and "not of 'opt-125m'" in result.output
    assert not (tmp_path / "b" / "bench.json").exists()


def test_onnx_timing_smoke(tiny_exports):
    """The prepacking-off/on timing script (shira_edge.bench.onnx_timing) runs on a tiny export: both configs, all
    keys, positive medians and ratios. Timings prove nothing here."""
    from shira_edge.bench.onnx_timing import KEYS, measure

    result = measure(tiny_exports / "onnx", repeats=1, prompt_len=4)
    assert len(result["median_ms"]) == 2
    for medians in result["median_ms"].values():
        assert set(medians) == set(KEYS) and all(v > 0 for v in medians.values())
    assert set(result["ratio_off_over_on"]) == set(KEYS) and all(v > 0 for v in result["ratio_off_over_on"].values())


def test_executorch_timing_smoke(tiny_exports):
    """The ExecuTorch prefill/decode/reload timing script runs on a tiny export (eager rows included)."""
    from shira_edge.bench.executorch_timing import measure

    result = measure(tiny_exports / "executorch", repeats=1, prompt_len=4, eager=True)
    keys = {"prefill_4", "decode_1", "reload_ptd_file_plus_decode", "reload_ptd_buffer_plus_decode",
            "eager_prefill_4", "eager_decode_1"}
    assert {f"{k}_median_s" for k in keys} <= set(result) and result["repeats"] == 1
    assert all(result[f"{k}_median_s"] > 0 for k in keys)

"""`shira-edge bench`: SHiRA switching against LoRA fusion on this CPU, side by side, in one run.

    from shira_edge.bench.runner import run_bench
    result = run_bench(model="tiny-opt", backends=["onnxruntime"], ranks=[4], threads=1, quick=True, out_dir="bench/")

Host-side speed and memory benchmarks (most scripts in benchmarks/ call in here; the adapter-quality study is
shira_edge.quality). Parts: weight_update (a, the paper's
Fig. 7), switch (b), inference (c), memory (d); report writes bench.json, bench.md and bench.png. The method
(warm-up, interleaving, paired ratios) is in stats.py; what a run kind is and the plain (no shira-edge) models
compared against are engines.py and ort_baseline.py. Export timings: onnx_timing.py, executorch_timing.py.
"""

"""Bytes per adapted parameter: .shira (fp32, fp16, bf16) beside PEFT's adapter_model.safetensors, same adapter.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/format_size.py            # opt-125m shapes, ~1% and ~8% density

The adapter is a PEFT SHiRA adapter (random mask, random values) on a random-init opt-125m, targeting
q/k/v/out_proj, fc1 and fc2 of all 12 layers. PEFT's r sets nnz = r*(out+in) per target, so over those shapes
density = r/512: r=5 gives 0.98% and r=41 gives 8.0%. Sizes do not depend on the weights, only on the mask.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def measure(r: int, dtypes: list[str], work: Path) -> list[dict]:
    import torch
    from peft import ShiraConfig, get_peft_model

    from shira_edge.pack import pack_adapter
    from shira_edge.models import load_model
    from shira_edge.runtime.shira_format import read_shira, read_shira_layout

    torch.manual_seed(0)
    model, _ = load_model("opt-125m", random_init=True, seed=0)
    peft_model = get_peft_model(model, ShiraConfig(r=r, target_modules=TARGETS, init_weights=False, random_seed=0))
    adapter_dir = work / f"r{r}"
    peft_model.save_pretrained(adapter_dir)
    del peft_model, model

    peft_bytes = (adapter_dir / "adapter_model.safetensors").stat().st_size
    rows = []
    for dtype in dtypes:
        out = work / f"r{r}-{dtype}.shira"
        summary = pack_adapter(adapter_dir, out, dtype=dtype, model="opt-125m", random_init=True, seed=0)
        _, layout = read_shira_layout(out)
        index_bytes = sum(lay.index_bytes for lay in layout.values())
        reads = []
        for _ in range(5):
            start = time.perf_counter()
            read_shira(out)  # memory map, check, and decode every index stream
            reads.append(time.perf_counter() - start)
        rows.append({"r": r, "nnz": summary["nnz"], "density": summary["density"], "dtype": dtype,
                     "shira_bytes": summary["bytes"], "shira_bpp": summary["bytes"] / summary["nnz"],
                     "index_bpp": index_bytes / summary["nnz"], "peft_bytes": peft_bytes,
                     "peft_bpp": peft_bytes / summary["nnz"], "read_ms": 1000 * statistics.median(reads)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--r", type=int, nargs="+", default=[5, 41], help="PEFT ShiraConfig r values")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "fp16", "bf16"])
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        rows = [row for r in args.r for row in measure(r, args.dtypes, Path(tmp))]
    print("| r | density | nnz | values | .shira bytes | .shira B/param | of which indices | "
          "PEFT safetensors bytes | PEFT B/param | PEFT / .shira | read_shira (median of 5) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for x in rows:
        print(f"| {x['r']} | {x['density']:.2%} | {x['nnz']:,} | {x['dtype']} | {x['shira_bytes']:,} | "
              f"{x['shira_bpp']:.3f} | {x['index_bpp']:.3f} | {x['peft_bytes']:,} | {x['peft_bpp']:.3f} | "
              f"{x['peft_bytes'] / x['shira_bytes']:.2f}x | {x['read_ms']:.1f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

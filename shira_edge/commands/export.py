"""`shira-edge export`: write a base model (optionally with an adapter fused in) to ONNX or ExecuTorch, plus the
manifest.json the runtime trusts (the CLI over shira_edge.export).

    shira-edge export --model opt-125m --random-init -o out/
    shira-edge export --model tiny-opt --format executorch --adapter adapter.shira -o out-et/
    shira-edge export --from GENAI_DIR --model smollm2-135m -o out/   # onnxruntime-genai builder output (-p fp32)

OUT_DIR is built in a temp dir beside it and renamed into place only after the parity check passed, so a failed
export leaves nothing behind. Stages (load, trace, lower, write, verify) print their time on stderr.
"""

from __future__ import annotations

from pathlib import Path

import click

from shira_edge.commands.checks import FiniteFloat
from shira_edge.export import FORMATS, run_export
from shira_edge.runtime.untrusted import printable


@click.command("export")
@click.option("--model", "model_name", required=True, help="Alias (opt-125m, tiny-opt), hub id, or save_pretrained dir.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="onnx", show_default=True)
@click.option("--adapter", type=click.Path(), default=None,
              help="Fuse this adapter first: a PEFT adapter dir or a .shira file.")
@click.option("--targets", default=None,
              help="Comma-separated Linear modules to keep patchable (default: every untied Linear).")
@click.option("--random-init", is_flag=True, help="Seeded random weights from the model's config (works offline).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --random-init.")
@click.option("--max-seq-len", type=click.IntRange(min=2), default=None,
              help="Longest sequence (prompt + generated) the export runs; ExecuTorch allocates its static KV cache "
                   "for it. Default: min(256, max_position_embeddings) for executorch, max_position_embeddings "
                   "for onnx; never above max_position_embeddings.")
@click.option("--atol", type=FiniteFloat(minimum=0), default=None,
              help="Parity tolerance: max abs logit difference vs PyTorch (fp32).  [default: 1e-4; 1e-3 with --from]")
@click.option("--fuse-qkv", is_flag=True,
              help="ONNX only: one MatMul per layer for q/k/v (qkv_proj, as onnxruntime-genai's builder does); each "
                   "weight stays patchable as a slice of it.")
@click.option("--from", "from_dir", type=click.Path(file_okay=False), default=None,
              help="Keep the graph of an onnxruntime-genai model builder folder (built with -p fp32) and write a "
                   "manifest for it, each weight found by content in --model's weights (default --atol 1e-3).")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists.")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(), help="Output directory (OUT_DIR).")
def export(model_name, fmt, adapter, targets, random_init, seed, max_seq_len, atol, fuse_qkv, from_dir, force,
           out_dir):
    """Export a model to ONNX (default) or ExecuTorch, with a manifest of every adaptable weight."""
    from shira_edge.exporters.common import ExportError, Stages

    try:
        manifest = run_export(model_name, fmt=fmt, adapter=adapter, targets=_split(targets), random_init=random_init,
                              seed=seed, max_seq_len=max_seq_len, atol=atol, force=force, out_dir=out_dir,
                              stages=Stages(), from_dir=from_dir, fuse_qkv=fuse_qkv)
    except ExportError as exc:   # may quote names from an adapter file: escaped for the terminal
        raise click.ClickException(printable(str(exc))) from None
    parity = manifest["export"].get("parity", {})
    patchable = sum(w["patchable"] for w in manifest["weights"])
    click.echo(f"wrote {Path(out_dir)} ({manifest['backend']}): {patchable} patchable weights, "
               f"fingerprint {manifest['fingerprint'][:19]}..., parity {_parity_text(parity)}")


def _split(targets: str | None) -> list[str]:
    return [t.strip() for t in targets.split(",") if t.strip()] if targets else []


def _parity_text(parity: dict) -> str:
    nums = {k: v for k, v in parity.items() if "diff" in k and isinstance(v, float)}
    return ", ".join(f"{k} {v:.2e}" for k, v in nums.items()) or "n/a"

"""`shira-edge bench`: SHiRA switching against LoRA fusion on this CPU, every part side by side in one run.

    shira-edge bench --model opt-125m --random-init -o bench/               # full run, both backends
    shira-edge bench --model opt-125m --random-init --quick --backend onnxruntime --export-dir out/ -o bench/

Writes BENCH_DIR/bench.json (every raw sample, machine, versions, settings), bench.md (tables) and bench.png. Exports
are made into BENCH_DIR/exports/<backend> (reused by later runs) unless --export-dir gives existing ones.
"""

from __future__ import annotations

import click


def _ranks(ctx, param, value: str) -> list[int]:
    try:
        ranks = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: give comma-separated positive integers, e.g. 4,32") from None
    if not ranks or min(ranks) < 1:
        raise click.BadParameter(f"{value!r}: give comma-separated positive integers, e.g. 4,32")
    return ranks


@click.command("bench")
@click.option("--model", "model_name", default="opt-125m", show_default=True,
              help="Alias (opt-125m, tiny-opt), hub id, or save_pretrained dir.")
@click.option("--random-init", is_flag=True, help="Seeded random weights from the model's config (works offline).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --random-init.")
@click.option("--backend", type=click.Choice(["onnxruntime", "executorch", "all"]), default="all", show_default=True)
@click.option("--r", "ranks", default="4,32", show_default=True, callback=_ranks,
              help="LoRA ranks; SHiRA adapters get as many parameters, nnz = r(m+n) per weight.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Threads for every pool (ORT, ExecuTorch, torch, scatter). Default: the usable cores.")
@click.option("--quick", is_flag=True, help="3 samples per figure, memory at the first r only (for `make demo`).")
@click.option("--samples", type=click.IntRange(min=1), default=None, help="Samples per figure (default 20, quick 3).")
@click.option("--export-dir", "export_dirs", multiple=True, type=click.Path(file_okay=False),
              help="Reuse this export (repeatable, one per backend) instead of exporting.")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False), help="BENCH_DIR.")
def bench(model_name, random_init, seed, backend, ranks, threads, quick, samples, export_dirs, out_dir):
    """Benchmark SHiRA switching vs LoRA fusion: weight update, switch-to-ready, inference latency, memory."""
    from shira_edge.bench.runner import BACKENDS, BenchError, default_threads, run_bench

    backends = list(BACKENDS) if backend == "all" else [backend]
    try:
        result = run_bench(model_name, backends=backends, ranks=ranks, threads=threads or default_threads(),
                           quick=quick, out_dir=out_dir, random_init=random_init, seed=seed,
                           export_dirs=export_dirs, samples=samples)
    except BenchError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"wrote {out_dir}/bench.json, bench.md, bench.png in {result['wall_seconds']:.0f} s")
    for g in result["headline"]["goals"].values():
        click.echo(f"  [{'met' if g['met'] else 'NOT met'}] {g['goal']}: {g['measured']}")

"""`shira-edge train`: a SHiRA (or LoRA baseline) adapter from a text file, as a PEFT adapter directory.

    shira-edge train --model tiny-opt --data notes.txt --mask snip --r 4 --steps 50 -o adapter/
    torchrun --nproc_per_node 2 -m shira_edge.cli train --model tiny-opt --data notes.txt -r 4 -o adapter/

Under torchrun, write `-r` (or put `--` before `train`): torchrun's argument parser sees every word of the command
line and refuses `--r` as an ambiguous abbreviation of its own --rdzv-*/--role/--run-path/--redirects options.
"""

from __future__ import annotations

import click

from shira_edge.commands.checks import FiniteFloat
from shira_edge.runtime.untrusted import printable
from shira_edge.tuner import DEFAULT_TARGETS, MASKS, METHODS


@click.command("train")
@click.option("--model", required=True, help="Base model: alias (opt-125m, tiny-opt), hub id or save_pretrained dir.")
@click.option("--data", required=True, help="Training text: .txt (one document per line) or .jsonl ('text' field).")
@click.option("--method", type=click.Choice(METHODS), default="shira", show_default=True,
              help="shira, or lora as the baseline with the same trainable parameters.")
@click.option("--mask", type=click.Choice(MASKS), default="rand", show_default=True,
              help="SHiRA mask: rand (PEFT's), wm |W|, grad |dL/dW|, snip |W dL/dW|, struct rows+cols+diagonal.")
@click.option("--r", "-r", "r", type=click.IntRange(min=1), default=32, show_default=True,
              help="Size: r(m+n) trainable entries per m x n weight (LoRA: rank r). Under torchrun write -r "
                   "(torchrun's own parser rejects --r as an ambiguous prefix).")
@click.option("--target-modules", default=",".join(DEFAULT_TARGETS), show_default=True,
              help="Comma-separated linear module names to adapt.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Optimizer steps (default: one epoch).")
@click.option("--epochs", type=FiniteFloat(minimum=0, open=True), default=None, help="Epochs over the training split (instead of --steps).")
@click.option("--lr", type=FiniteFloat(minimum=0, open=True), default=1e-3, show_default=True, help="AdamW learning rate.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Blocks per step per process.")
@click.option("--seq-len", type=click.IntRange(min=2), default=128, show_default=True, help="Tokens per block.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seeds the mask, data split and order, and a --random-init base.")
@click.option("--random-init", is_flag=True, help="Build the base from its config with seeded weights (offline).")
@click.option("-o", "--output", "out_dir", required=True, help="Adapter directory to write.")
@click.option("--force", is_flag=True, help="Replace the output directory if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train(model, data, method, mask, r, target_modules, steps, epochs, lr, batch_size, seq_len, seed, random_init,
          out_dir, force, quiet):
    """Train an adapter on --data and write a PEFT adapter directory (plus shira_edge.json) to -o.

    Runs unchanged under `torchrun --nproc_per_node N` and `accelerate launch` (only rank 0 writes).
    """
    from shira_edge.data import DataError
    from shira_edge.tuner.adapt import TunerInputError
    from shira_edge.tuner.train import train_adapter

    modules = [m.strip() for m in target_modules.split(",") if m.strip()]
    try:
        result = train_adapter(model, data, out_dir, method=method, mask=mask, r=r, target_modules=modules,
                               steps=steps, epochs=epochs, lr=lr, batch_size=batch_size, seq_len=seq_len, seed=seed,
                               random_init=random_init, force=force, progress=not quiet)
    except DataError as exc:   # may quote the data file: escaped for the terminal
        raise click.BadParameter(printable(str(exc)), param_hint="--data") from None
    except TunerInputError as exc:
        raise click.BadParameter(printable(str(exc)), param_hint=exc.flag) from None
    if result.world_size == 1 or _rank() == 0:
        click.echo(result.summary())


def _rank() -> int:
    import os
    return int(os.environ.get("RANK", "0"))

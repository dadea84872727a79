"""`shira-edge pack ADAPTER_DIR -o FILE.shira`: a PEFT SHiRA adapter dir -> one compact .shira file (CLI over
shira_edge.pack).

    shira-edge pack adapter/ -o adapter.shira --dtype fp16

The base model is needed for each target's shape and base digest (so a runtime can refuse an adapter made for
another model). It is --model if given, else the `shira_edge.json` sidecar that `shira-edge train` writes, else
adapter_config.json's base_model_name_or_path.
"""

from __future__ import annotations

from pathlib import Path

import click

from shira_edge.pack import PackError, pack_adapter
from shira_edge.runtime.shira_format import VALUE_DTYPES
from shira_edge.runtime.untrusted import printable


@click.command(name="pack")
@click.argument("adapter_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The .shira file to write (written to a temp file, then renamed).")
@click.option("--dtype", type=click.Choice(list(VALUE_DTYPES)), default="fp32", show_default=True,
              help="Storage type of the values.")
@click.option("--model", default=None, help="Base model (alias, hub id or dir). Default: the adapter's sidecar "
              "shira_edge.json, else adapter_config.json's base_model_name_or_path.")
@click.option("--random-init", is_flag=True, help="Build the base model from its config with seeded weights.")
@click.option("--seed", type=int, default=None, help="Seed for --random-init (default: the sidecar's, else 0).")
def pack(adapter_dir: Path, output: Path, dtype: str, model: str | None, random_init: bool, seed: int | None):
    """Pack a PEFT SHiRA adapter dir into a compact .shira file."""
    from shira_edge.exporters.common import sigterm_unwinds

    try:
        with sigterm_unwinds():   # SIGTERM mid-write removes the temp file, as Ctrl-C does
            s = pack_adapter(adapter_dir, output, dtype=dtype, model=model, random_init=random_init, seed=seed)
    except PackError as exc:   # already escaped for the terminal where it quotes file-derived text
        raise click.ClickException(str(exc)) from None
    click.echo(f"packed {s['targets']} targets, {s['nnz']:,} nnz ({s['density']:.2%} density), {s['dtype']}: "
               f"{s['bytes']:,} bytes, {s['bytes_per_param']:.2f} bytes/param "
               f"[base {printable(s['base'])}, {s['weights']}] -> {printable(s['path'])}")

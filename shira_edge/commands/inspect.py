"""`shira-edge inspect FILE [--json]`: what a .shira file holds. Reads it fully (every check runs); imports no torch.

    shira-edge inspect adapter.shira
    shira-edge inspect adapter.shira --json | python -c 'import json,sys; print(json.load(sys.stdin)["total"])'

Everything read from the file is untrusted: names and metadata are escaped before they reach the terminal, so a
name holding ANSI escapes or control characters prints as visible backslash escapes.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from shira_edge.runtime.shira_format import VALUE_DTYPES, VERSION, ShiraFormatError, read_shira_layout
from shira_edge.runtime.untrusted import printable


def describe(path: Path) -> dict:
    """The report as plain data: what --json prints and the table is made from."""
    adapter, layout = read_shira_layout(path)   # opens regular files only: a FIFO is refused, never waited on
    size = path.stat().st_size
    targets = []
    for name, t in adapter.targets.items():
        lay = layout[name]
        elements = t.shape[0] * t.shape[1]
        targets.append({
            "name": name, "shape": list(t.shape), "nnz": t.nnz, "density": t.nnz / elements, "dtype": adapter.dtype,
            "scale": t.scale, "index_width": lay.index_width, "index_bytes": lay.index_bytes,
            "values_bytes": lay.values_bytes,
            "index_bytes_per_nnz": lay.index_bytes / t.nnz if t.nnz else None,
        })
    nnz = sum(t["nnz"] for t in targets)
    elements = sum(t["shape"][0] * t["shape"][1] for t in targets)
    return {
        "file": str(path), "format_version": VERSION, "bytes": size, "dtype": adapter.dtype,
        "value_bytes_each": VALUE_DTYPES[adapter.dtype].itemsize, "base_model": adapter.base_model,
        "metadata": adapter.metadata, "targets": targets,
        "total": {"targets": len(targets), "nnz": nnz, "elements": elements,
                  "density": nnz / elements if elements else 0.0,
                  "bytes": size, "bytes_per_param": size / nnz if nnz else None},
    }


def render(report: dict) -> str:
    tot = report["total"]
    lines = [
        f"file:       {printable(report['file'])} ({report['bytes']:,} bytes)",
        f"format:     .shira version {report['format_version']}, values {report['dtype']}",
        f"base model: {printable(report['base_model']['name'])}  {printable(report['base_model']['fingerprint'])}",
    ]
    for key, value in sorted(report["metadata"].items()):
        # ASCII JSON cannot carry a control character: it needs no further escaping
        lines.append(f"  {printable(key)}: {json.dumps(value, ensure_ascii=True)}")
    rows = [(printable(t["name"]), f"{t['shape'][0]}x{t['shape'][1]}", f"{t['nnz']:,}", f"{t['density']:.2%}",
             t["dtype"], f"u{8 * t['index_width']}",
             f"{t['index_bytes_per_nnz']:.2f}" if t["index_bytes_per_nnz"] is not None else "-")
            for t in report["targets"]]
    head = ("target", "shape", "nnz", "density", "dtype", "index", "idx B/nnz")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for row in [head, *rows]:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    bpp = f"{tot['bytes_per_param']:.2f}" if tot["bytes_per_param"] is not None else "-"
    lines.append(f"total: {tot['targets']} targets, {tot['nnz']:,} nnz of {tot['elements']:,} weights "
                 f"({tot['density']:.2%}), {tot['bytes']:,} bytes, {bpp} bytes per adapted parameter")
    return "\n".join(lines)


@click.command(name="inspect")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one machine-readable JSON object.")
def inspect_cmd(file: Path, as_json: bool):
    """Show what a .shira file holds (header, targets, density, bytes)."""
    try:
        report = describe(file)
    except ShiraFormatError as exc:
        raise click.ClickException(printable(str(exc))) from None
    # ensure_ascii: names from the file leave as \\u escapes, never as raw control characters
    click.echo(json.dumps(report, indent=2, ensure_ascii=True) if as_json else render(report))

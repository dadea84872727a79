"""Adapter quality on real tasks: dictionary data (`dictd`, `tasks`), supervised adapter training and scoring
(`sft`), the delta geometry that explains fusion (`geometry`), the device path through the runtime (`device`) and
the study that ties them together (`study`, run by benchmarks/quality.py). Results and their reading: docs/quality.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METHODS = ("lora", "dora", "shira-rand", "shira-wm", "shira-grad", "shira-snip", "shira-struct")


def split_label(label: str) -> tuple[str, str | None]:
    """"shira-wm" -> ("shira", "wm"); "lora" / "dora" -> (label, None).

    >>> split_label("shira-snip"), split_label("dora")
    (('shira', 'snip'), ('dora', None))
    """
    if label in ("lora", "dora"):
        return label, None
    method, _, mask = label.partition("-")
    if method != "shira" or not mask:
        raise ValueError(f"unknown method {label!r}; choose from {', '.join(METHODS)}")
    return method, mask


def write_report(output: Path, results: dict[str, Any], table: str) -> None:
    """results as JSON at `output`, the markdown tables beside it (.md); each written to a temp file, then renamed."""
    for path, text in ((output, json.dumps(results, indent=2) + "\n"), (output.with_suffix(".md"), table)):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)

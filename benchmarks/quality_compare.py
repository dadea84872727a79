"""Two quality-study results, compared on everything they share: each adapter's val/test scores (matched by
method, task, lr and seed), the chosen lrs, and every fusion row (host scores, geometry, the runtime's answers).

    python benchmarks/quality_compare.py docs/quality-smollm2-full.json docs/quality-smollm2-hour.json

Exits 1 and prints each difference if any shared value differs: a cut that claims to change only the time (a
smaller lr grid, fewer runtime passes) must leave every shared number as it was.
"""

from __future__ import annotations

import json
import sys

FUSION_KEYS = ("best_scale", "val_exact_by_scale", "mask_overlap", "delta_norm_task1", "delta_norm_task2",
               "delta_cosine")


def compare(a: dict, b: dict) -> tuple[int, list[str]]:
    """(shared values found equal, descriptions of those that differ)."""
    equal, diffs = 0, []

    def check(what, x, y):
        nonlocal equal
        if x == y:
            equal += 1
        else:
            diffs.append(f"{what}: {x!r} != {y!r}")

    runs = {(r["label"], r["task"], r["lr"], r["seed"]): r for r in a["runs"]}
    for r in b["runs"]:
        key = (r["label"], r["task"], r["lr"], r["seed"])
        for part in ("val", "test"):
            if key in runs and part in r and part in runs[key]:
                check(f"run {key} {part}", runs[key][part], r[part])
    for label in set(a["best_lr"]) & set(b["best_lr"]):
        check(f"best_lr {label}", a["best_lr"][label], b["best_lr"][label])
    rows = {(r["label"], r["seed"]): r for r in a["fusion"]}
    for r in b["fusion"]:
        old = rows.get((r["label"], r["seed"]))
        if old is None:
            continue
        for k in FUSION_KEYS:
            check(f"fusion {r['label']} {r['seed']} {k}", old.get(k), r.get(k))
        for t in a["plan"]["tasks"]:
            for part in ("alone", "fused", "fused_best"):
                check(f"fusion {r['label']} {r['seed']} {t} {part}", old[t][part], r[t][part])
            for k in set(old[t].get("device", {})) & set(r[t].get("device", {})):
                check(f"fusion {r['label']} {r['seed']} {t} device {k}", old[t]["device"][k], r[t]["device"][k])
    return equal, diffs


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    a, b = (json.loads(open(p, encoding="utf-8").read()) for p in args)
    equal, diffs = compare(a, b)
    for d in diffs:
        print(d)
    print(f"{equal} shared values equal, {len(diffs)} differ")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())

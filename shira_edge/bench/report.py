"""bench.json (every raw sample), bench.md (tables) and bench.png (the plot) from one benchmark result.

Headline figures and goal checks are computed from the samples here, never typed in: `headline(result)`.
"""

from __future__ import annotations

import json
from pathlib import Path

PAPER = ("The paper (SHiRA, arXiv 2406.13175) reports, on a CPU: loading SHiRA 5-16x faster than LoRA fusion "
         "(13-16x per tensor at 4096x4096, 4.7x end to end on SDXL, 5.7x on LLaMA2-7B); unfused LoRA up to 30% "
         "extra latency; fused SHiRA none.")
GOALS = {
    "a_4096": "weight update at 4096x4096: SHiRA >= 16x faster than LoRA fusion",
    "b_r4_full_speed": "switch until the runtime computes the new weights at full speed, at the smallest r (r=4: "
                       "~1% density): SHiRA >= 20x faster than LoRA fusion + rebuild/reload",
    "b_r4_ready": "switch until the first full-speed output (one decode step included on both sides), at the "
                  "smallest r: SHiRA >= 20x faster than LoRA fusion + rebuild/reload",
    "b_floor": "warm SHiRA switch (scatter) within 2x of the memory-bandwidth floor",
    "c_after": "first prefill-32 and decode call right after a switch within 3% of the base model's best "
               "configuration",
    "c_steady": "SHiRA steady-state latency within 3% of the base model's best configuration",
    "d_memory": "runtime footprint (RSS without tmpfs pages + its tmpfs files) within 1.15x of the plain base "
                "session, at the end (steady) and at the peak (start-up included)",
}


def _m(summary: dict) -> float:
    return summary["median"]


def headline(result: dict) -> dict:
    parts = result["parts"]
    h: dict = {"a": {}, "b": {}, "c": {}, "d": {}, "goals": {}}
    for row in parts["a_weight_update"]["rows"]:
        h["a"][f"{row['label']} r={row['r']}"] = round(_m(row["speedup"]), 1)
    for b in parts["b_switch"]:
        key = f"{b['backend']} r={b['r']}"
        h["b"][key] = {k: round(_m(v), 2) for k, v in b["ratios"].items()}
        h["b"][key]["shira_warm_live_ms"] = round(_m(b["modes"]["shira_warm.live"]) * 1e3, 2)
        h["b"][key]["shira_warm_ready_ms"] = round(_m(b["modes"]["shira_warm.ready"]) * 1e3, 1)
        h["b"][key]["lora_fused_ready_ms"] = round(_m(b["modes"]["lora_fused"]) * 1e3, 1)
    for c in parts["c_inference"]:
        for kind, f in c["figures"].items():
            h["c"][f"{c['backend']} r={c['r']} {kind}"] = {k: round(_m(v), 3) for k, v in f["over_base_best"].items()}
    for d in parts["d_memory"]:
        h["d"][f"{d['backend']} {d['mode']}" + (f" r={d['r']}" if d["mode"] not in ("base", "naive_reload") else "")] = \
            round(d["peak_rss_bytes"] / 2**20)

    for row in (row for row in parts["a_weight_update"]["rows"] if row["label"] == "4096x4096"):
        v = _m(row["speedup"])
        h["goals"][f"a_4096 r={row['r']}"] = {"goal": GOALS["a_4096"], "met": v >= 16,
                                             "measured": f"{v:.1f}x at r={row['r']} ({row['density']:.2%} density)"}
    rmin = min((b["r"] for b in parts["b_switch"]), default=None)
    for b in (b for b in parts["b_switch"] if b["r"] == rmin):
        live = _m(b["ratios"]["lora_fuse_over_shira_live"])
        ready = _m(b["ratios"]["lora_ready_over_shira_ready"])
        if "lora_full_speed_over_shira_full_speed" in b["ratios"]:
            full = b["ratios"]["lora_full_speed_over_shira_full_speed"]
            h["goals"][f"b_r{rmin}_full_speed {b['backend']}"] = {
                "goal": GOALS["b_r4_full_speed"], "met": _m(full) >= 20,
                "measured": f"{b['backend']} r={rmin} ({b.get('switch_path', '?')}): {_m(full):.1f}x ({_spread(full)})"
                            f"; {_m(b['modes']['shira_warm.full_speed']) * 1e3:.1f} ms vs "
                            f"{_m(b['modes']['lora_fused.full_speed']) * 1e3:.0f} ms"}
        h["goals"][f"b_r{rmin}_ready {b['backend']}"] = {
            "goal": GOALS["b_r4_ready"], "met": ready >= 20,
            "measured": f"{b['backend']} r={rmin} ({b.get('switch_path', '?')}): {ready:.1f}x until the first "
                        f"full-speed output ({_spread(b['ratios']['lora_ready_over_shira_ready'])}), "
                        f"{live:.1f}x until live"}
        floor = _m(b["ratios"]["shira_scatter_over_floor"])
        h["goals"][f"b_floor {b['backend']} r={b['r']}"] = {
            "goal": GOALS["b_floor"], "met": floor <= 2,
            "measured": f"{b['backend']} r={b['r']}: scatter {floor:.2f}x the floor, whole switch() "
                        f"{_m(b['ratios']['shira_live_over_floor']):.2f}x"}
    for c in parts["c_inference"]:
        after = {k: f["over_base_best"]["shira_after_switch"] for k, f in c["figures"].items()
                 if k in ("decode", "prefill_32")}
        if after:
            worst_after = max(_m(v) for v in after.values())
            h["goals"][f"c_after {c['backend']} r={c['r']}"] = {
                "goal": GOALS["c_after"], "met": worst_after <= 1.03,
                "measured": f"{c['backend']} r={c['r']} ({c.get('switch_path', '?')}): " + ", ".join(
                    f"{k} {_m(v):.3f}x ({_spread(v)})" for k, v in after.items())}
        worst_kind, worst_ratio = max(((k, f["over_base_best"]["shira_steady"]) for k, f in c["figures"].items()),
                                      key=lambda kv: _m(kv[1]))
        worst = _m(worst_ratio)
        h["goals"][f"c_steady {c['backend']} r={c['r']}"] = {
            "goal": GOALS["c_steady"], "met": worst <= 1.03,
            "measured": f"{c['backend']} r={c['r']}: worst of decode/prefill {worst:.3f}x base best "
                        f"({worst_kind}: {_spread(worst_ratio)})"}


    for backend in {d["backend"] for d in parts["d_memory"]}:
        rows = {d["mode"]: d for d in parts["d_memory"] if d["backend"] == backend and d["mode"] in ("base", "shira")}
        if {"base", "shira"} <= set(rows) and "end_footprint_bytes" in rows["base"]:
            base, shira = rows["base"], rows["shira"]
            end = shira["end_footprint_bytes"] / base["end_footprint_bytes"]
            peak = shira["peak_footprint_bytes"] / base["peak_footprint_bytes"]
            h["goals"][f"d_memory {backend}"] = {
                "goal": GOALS["d_memory"], "met": end <= 1.15 and peak <= 1.15,
                "measured": f"{backend} r={shira['r']}: {end:.2f}x at the end ({shira['end_footprint_bytes'] / 2**20:.0f}"
                            f" MiB, of which tmpfs {shira['tmpfs_end_bytes'] / 2**20:.0f}), {peak:.2f}x at the peak"}
    return h


def _spread(s: dict) -> str:
    ci = s.get("median_ci95")
    return (f"p25-p75 {s.get('p25', s['min']):.3f}-{s.get('p75', s['max']):.3f}"
            + (f", median 95% CI {ci[0]:.3f}-{ci[1]:.3f}" if ci else "") + f", n={s['n']}")


def dump_json(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    tmp.replace(path)


def write_all(result: dict, out_dir: Path) -> None:
    dump_json(result, out_dir / "bench.json")
    md = markdown(result)
    tmp = out_dir / "bench.md.tmp"
    tmp.write_text(md)
    tmp.replace(out_dir / "bench.md")
    plot(result, out_dir / "bench.png")


def _ms(s: dict) -> str:
    return f"{s['median'] * 1e3:.3g} ({s['min'] * 1e3:.3g}-{s['max'] * 1e3:.3g})"


def _x(s: dict) -> str:
    return f"{s['median']:.3g}x ({s['min']:.3g}-{s['max']:.3g})"


def markdown(result: dict) -> str:
    s, m, parts = result["settings"], result["machine"], result["parts"]
    out = [f"# shira-edge bench: {s['model']}{' (random-init)' if s['random_init'] else ''}", "",
           f"{m['cpu']}, {m['usable_cores']} usable cores, {m['memory_gb']} GB, load average at start "
           f"{m['load_average_at_start']}; {s['threads']} threads; {s['samples']} samples after {s['warmup']} "
           f"warm-up rounds, modes interleaved, ratios paired per round; median (min-max). Wall time "
           f"{result['wall_seconds']:.0f} s. Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v),
           "", "## Goals", "", "| goal | measured | met |", "|---|---|---|"]
    for g in result["headline"]["goals"].values():
        out.append(f"| {g['goal']} | {g['measured']} | {'yes' if g['met'] else 'NO'} |")
    out += ["", "## (a) Weight update only (paper Fig. 7), ms", "",
            "| weights | r | nnz | density | SHiRA scatter | LoRA fusion | LoRA / SHiRA |", "|---|---|---|---|---|---|---|"]
    for row in parts["a_weight_update"]["rows"]:
        out.append(f"| {row['label']} | {row['r']} | {row['nnz']} | {row['density']:.2%} | {_ms(row['shira_scatter'])} "
                   f"| {_ms(row['lora_fusion'])} | {_x(row['speedup'])} |")
    out += ["", "## (b) Switch to ready on the exported model, ms", "",
            "live: switch() returned, runs compute with the new adapter; ready: plus the first full-speed decode "
            "step (ONNX Runtime packed-in-place: at once; on its rebuild fallback: after the prepacked session is "
            "rebuilt). LoRA fuse: the weight update alone; LoRA fused ready: plus the rebuild/reload and a decode "
            "step. Switch path: " + ", ".join(f"{b['backend']} {b.get('switch_path', '?')}" for b in parts["b_switch"])
            + ".", "",
            "| backend | r | density | SHiRA warm live | SHiRA warm ready | SHiRA cold live | SHiRA cold ready | "
            "LoRA fuse | LoRA fused ready | naive reload ready | copy floor |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for b in parts["b_switch"]:
        md = b["modes"]
        out.append(f"| {b['backend']} | {b['r']} | {b['density']:.2%} | {_ms(md['shira_warm.live'])} | "
                   f"{_ms(md['shira_warm.ready'])} | {_ms(md['shira_cold.live'])} | {_ms(md['shira_cold.ready'])} | "
                   f"{_ms(md['lora_fused.fuse'])} | {_ms(md['lora_fused'])} | {_ms(md['naive_reload'])} | "
                   f"{_ms(md['floor_copy'])} |")
    out += ["", "| backend | r | " + " | ".join(_RATIO_NAMES.values()) + " |", "|---|---|" + "---|" * len(_RATIO_NAMES)]
    for b in parts["b_switch"]:
        out.append(f"| {b['backend']} | {b['r']} | " + " | ".join(_x(b["ratios"][k]) for k in _RATIO_NAMES) + " |")
    out += ["", "## (c) Inference latency, ms (ratio to the base model's best configuration)", ""]
    for c in parts["c_inference"]:
        names = list(next(iter(c["figures"].values()))["modes"])
        out += [f"{c['backend']}, r={c['r']}:", "", "| call | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for kind, f in c["figures"].items():
            cells = []
            for n in names:
                ratio = f["over_base_best"].get(n)
                cells.append(_ms(f["modes"][n]) + (f"<br>{ratio['median']:.3f}x" if ratio else "<br>(best base)"))
            out.append(f"| {kind} | " + " | ".join(cells) + " |")
        out.append("")
    out += ["## (d) Resident memory, MiB (fresh process per mode; baseline = after imports)", "",
            "footprint = RSS without tmpfs pages + the tmpfs files the process holds (each page once); peak RSS "
            "(VmHWM) counts a tmpfs page once per mapping.", "",
            "| backend | mode | r | peak RSS | baseline | model share | footprint peak | footprint end | of which tmpfs |",
            "|---|---|---|---|---|---|---|---|---|"]
    for d in parts["d_memory"]:
        fp = [f"{d[k] / 2**20:.0f}" if k in d else "-" for k in ("peak_footprint_bytes", "end_footprint_bytes",
                                                                  "tmpfs_end_bytes")]
        out.append(f"| {d['backend']} | {d['mode']} | {d['r'] if d['mode'] not in ('base', 'naive_reload') else '-'} | "
                   f"{d['peak_rss_bytes'] / 2**20:.0f} | {d['baseline_rss_bytes'] / 2**20:.0f} | "
                   f"{d['model_rss_bytes'] / 2**20:.0f} | " + " | ".join(fp) + " |")
    out += ["", PAPER, ""]
    return "\n".join(out)


_RATIO_NAMES = {
    "lora_fuse_over_shira_live": "LoRA fuse / SHiRA live",
    "lora_full_speed_over_shira_full_speed": "LoRA / SHiRA until full speed",
    "lora_ready_over_shira_ready": "LoRA ready / SHiRA ready",
    "naive_ready_over_shira_ready": "naive / SHiRA ready",
    "shira_cold_ready_over_warm_ready": "SHiRA cold / warm ready",
    "shira_scatter_over_floor": "SHiRA scatter / floor",
    "shira_live_over_floor": "SHiRA switch() / floor",
}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = result["parts"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax = axes[0][0]
    rows = parts["a_weight_update"]["rows"]
    for r in sorted({row["r"] for row in rows}):
        rr = [row for row in rows if row["r"] == r]
        ax.bar([f"{row['label'].split(' ')[0]}\nr={r}" for row in rr], [row["speedup"]["median"] for row in rr],
               yerr=_err([row["speedup"] for row in rr]), capsize=3, label=f"r={r}")
    ax.axhline(16, color="k", ls="--", lw=1, label="goal 16x")
    ax.set_yscale("log"), ax.set_ylabel("LoRA fusion time / SHiRA scatter time")
    ax.set_title("(a) weight update: SHiRA speed-up over LoRA fusion"), ax.legend(fontsize=8)
    ax.tick_params(axis="x", labelsize=6, labelrotation=45)

    ax = axes[0][1]
    modes = [("shira_warm.live", "SHiRA live"), ("shira_warm.ready", "SHiRA ready"), ("shira_cold.ready", "SHiRA cold"),
             ("lora_fused.fuse", "LoRA fuse"), ("lora_fused", "LoRA ready"), ("naive_reload", "naive reload"),
             ("floor_copy", "copy floor")]
    width = 0.8 / max(1, len(parts["b_switch"]))
    for i, b in enumerate(parts["b_switch"]):
        xs = [j + i * width for j in range(len(modes))]
        ax.bar(xs, [b["modes"][k]["median"] * 1e3 for k, _ in modes], width,
               yerr=_err([b["modes"][k] for k, _ in modes], 1e3), capsize=2, label=f"{b['backend']} r={b['r']}")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(modes))], [n for _, n in modes], fontsize=8, rotation=20)
    ax.set_yscale("log"), ax.set_ylabel("ms"), ax.set_title("(b) switch to another adapter"), ax.legend(fontsize=7)

    ax = axes[1][0]
    groups, series = [], {}
    for c in parts["c_inference"]:
        for kind, f in c["figures"].items():
            groups.append(f"{c['backend'][:4]} r={c['r']}\n{kind}")
            for n, ratio in f["over_base_best"].items():
                if not n.startswith("base"):
                    series.setdefault(n, {})[len(groups) - 1] = ratio
    width = 0.8 / max(1, len(series))
    for i, (n, by_group) in enumerate(series.items()):
        xs = [g + i * width for g in by_group]
        ax.bar(xs, [s["median"] for s in by_group.values()], width, yerr=_err(list(by_group.values())), capsize=2,
               label=n)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups, fontsize=6, rotation=45)
    ax.axhline(1.0, color="k", lw=1), ax.axhline(1.03, color="g", ls="--", lw=1, label="goal: steady <= 1.03x")
    top = max((s["median"] for by_group in series.values() for s in by_group.values()), default=1.0)
    ax.set_ylim(0, max(1.2, 1.3 * top))   # whiskers of noisy samples may go off the top; medians stay in view
    ax.set_ylabel("latency / base best"), ax.set_title("(c) inference latency vs the base model")
    ax.legend(fontsize=7)

    ax = axes[1][1]
    mem = parts["d_memory"]
    ax.barh(range(len(mem)), [d["peak_rss_bytes"] / 2**20 for d in mem], label="peak RSS")
    ax.barh(range(len(mem)), [d["baseline_rss_bytes"] / 2**20 for d in mem], label="after imports")
    ax.set_yticks(range(len(mem)), [f"{d['backend'][:4]} {d['mode']}" + (f" r={d['r']}" if d["mode"] not in
                                    ("base", "naive_reload") else "") for d in mem], fontsize=7)
    ax.set_xlabel("MiB"), ax.set_title("(d) peak resident memory, fresh process per mode"), ax.legend(fontsize=7)

    s = result["settings"]
    fig.suptitle(f"shira-edge bench: {s['model']}, {s['threads']} threads, {s['samples']} samples/figure, "
                 f"{result['machine']['cpu']}", fontsize=10)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)


def _err(summaries: list[dict], scale: float = 1.0):
    return [[(s["median"] - s["min"]) * scale for s in summaries], [(s["max"] - s["median"]) * scale for s in summaries]]


def load(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def main(argv: list[str]) -> int:
    """python -m shira_edge.bench.report BENCH.json: the goal table again, every statistic recomputed from the raw
    samples (for runs made before a statistic existed)."""
    from .stats import resummarize

    result = resummarize(load(Path(argv[0])))
    for g in headline(result)["goals"].values():
        print(f"| {g['goal']} | {g['measured']} | {'yes' if g['met'] else 'NO'} |")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))

"""The real-model quality study: LoRA, DoRA and SHiRA (every mask) at equal trainable parameters on two dictionary
tasks, alone and fused, scored by greedy exact match; SHiRA's fused pairs also through the runtime.

    run_study(Plan(), work_dir)  ->  a JSON-able dict;  markdown(result)  ->  its tables

Per method: an lr sweep over its own grid (`LR_GRIDS`, or `Plan.lrs` for every method) on each task in
`sweep_tasks` (seed `seeds[0]`), the lr chosen on validation exact match (ties: lower validation loss) and reused for
the other tasks; test numbers only at the chosen lr. Every further
seed trains both tasks again at the chosen lrs. The adapter for task k uses seed + 100 k, so rand and struct masks
differ between the tasks (wm cannot: it depends on the base weights only; grad and snip on the task's data).
Fusion adds both adapters' dense deltas at scale 1.0, and at the scale of `fusion_scales` with the best mean
validation exact match over both tasks, reported on test.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from shira_edge.quality.geometry import delta_geometry, mask_overlap, shira_support
from shira_edge.quality import METHODS, split_label
from shira_edge.quality.tasks import DICTD_DIR, TASKS, encode_examples, load_task, split_pairs

TASK_SEED_OFFSET = 100
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Two points per method, where a grid of (1e-3, 3e-3, 1e-2) for every method found its optimum (docs/quality.md,
# "The full run"): masks that do not come from gradients train best at 3x LoRA's lr, grad and snip
# diverge there. In that run no method chose the point its pair leaves out, so the pairs choose as it did.
LR_GRIDS = {"lora": (1e-3, 3e-3), "dora": (1e-3, 3e-3), "shira-grad": (1e-3, 3e-3), "shira-snip": (1e-3, 3e-3),
            "shira-rand": (3e-3, 1e-2), "shira-wm": (3e-3, 1e-2), "shira-struct": (3e-3, 1e-2)}


@dataclass(frozen=True)
class Plan:
    model: str = "smollm2-135m"          # alias / dir for load_model, or "tiny" (the --quick base, tiny.py)
    export: str | None = None            # ONNX export of the same model; None: exported into the work dir
    data_dir: str = str(DICTD_DIR)
    tasks: tuple[str, ...] = ("translate", "acronym")
    methods: tuple[str, ...] = METHODS
    targets: tuple[str, ...] = ALL_TARGETS
    r: int = 4                           # SmolLM2-135M: 1.15 % of the targeted weights
    steps: int = 48
    batch: int = 8
    lrs: tuple[float, ...] | None = None  # one grid for every method; None: each method's LR_GRIDS pair
    sweep_tasks: tuple[str, ...] = ("translate",)
    seeds: tuple[int, ...] = (0, 1)
    n_val: int = 100
    n_test: int = 200
    split_seed: int = 0
    calib_batches: int = 4
    fusion_scales: tuple[float, ...] = (0.5, 0.75, 1.0)
    eval_batch: int = 32
    device: bool = True                  # SHiRA alone + fused through Runtime.switch / generate
    threads: int = 1
    reduced: str | None = None           # why this run is smaller than the full study (printed with the results)

    def lr_grid(self, label: str) -> tuple[float, ...]:
        return self.lrs if self.lrs is not None else LR_GRIDS[label]


FULL = Plan()
QUICK = Plan(model="tiny", data_dir=str(Path(__file__).resolve().parents[2] / "tests" / "data" / "quality"),
             r=2, steps=12, batch=4, lrs=(2e-2,), seeds=(0,), n_val=8, n_test=12, calib_batches=1,
             fusion_scales=(0.5, 1.0), reduced="--quick: tiny random Llama and the 60-entry test samples")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _base(plan: Plan, work: Path, texts):
    from transformers import AutoTokenizer

    from shira_edge.models import load_model

    if plan.model == "tiny":
        from shira_edge.quality.tiny import build_tiny_model

        base_dir = build_tiny_model(work / "tiny-model", texts)
        model, info = load_model(str(base_dir))
        info = dataclasses.replace(info, name="tiny Llama (quality --quick)", weights="random-init", seed=0)
    else:
        model, info = load_model(plan.model)
        base_dir = Path(info.source)
        if not base_dir.is_dir():
            raise RuntimeError(f"{plan.model}: weights came from {info.source}, not a local directory; the device "
                               f"path needs one (save_pretrained it and pass the directory as the model)")
    return model, info, base_dir, AutoTokenizer.from_pretrained(base_dir)


def _export(plan: Plan, base_dir: Path, work: Path, progress) -> Path:
    if plan.export:
        return Path(plan.export)
    from shira_edge.export import run_export
    from shira_edge.exporters.common import Stages

    out = work / "export-onnx"
    progress(f"exporting {base_dir} to ONNX for the device path ({out})")
    run_export(str(base_dir), out_dir=out, stages=Stages(quiet=True))
    return out


def run_study(plan: Plan, work: Path, progress: Callable[[str], None] = log) -> dict[str, Any]:
    import torch

    from shira_edge.quality.sft import Lab

    t0, c0 = time.perf_counter(), time.process_time()
    pairs = {task: split_pairs(load_task(task, plan.data_dir), plan.split_seed, plan.n_val, plan.n_test)
             for task in plan.tasks}
    texts = [TASKS[t][2].format(p.source) + " " + p.target for t in plan.tasks for part in pairs[t].values()
             for p in part]
    model, info, base_dir, tokenizer = _base(plan, work, texts)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    data = {t: {part: encode_examples(ps, t, tokenizer) for part, ps in pairs[t].items()} for t in plan.tasks}
    lab = Lab(model, plan.targets, pad_id)
    progress(f"{info.name} ({info.weights}), {lab.targeted:,} targeted weights; " + ", ".join(
        f"{t}: {len(d['train'])}/{len(d['val'])}/{len(d['test'])} train/val/test" for t, d in data.items()))

    base = {t: {part: lab.score(data[t][part], batch_size=plan.eval_batch).to_json() for part in ("val", "test")}
            for t in plan.tasks}
    progress("un-adapted: " + ", ".join(f"{t} test exact {b['test']['exact']:.1%} loss {b['test']['loss']:.3f}"
                                        for t, b in base.items()))
    device = None
    if plan.device:
        from shira_edge.quality.device import DeviceScorer

        device = DeviceScorer(_export(plan, base_dir, work, progress), threads=plan.threads)
        for t in plan.tasks:
            device.check_prompts(t, pairs[t]["test"], data[t]["test"])
        base_device = {t: _rate(device.exact(data[t]["test"])[0]) for t in plan.tasks}
        progress("un-adapted through the runtime: " + ", ".join(f"{t} {v:.1%}" for t, v in base_device.items()))
    else:
        base_device = None

    runs: list[dict[str, Any]] = []
    startup_s = time.perf_counter() - t0

    def fit(label: str, task: str, lr: float, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
        start = time.perf_counter()
        trained = lab.train(label, data[task]["train"], r=plan.r, steps=plan.steps, batch_size=plan.batch, lr=lr,
                            seed=seed, calib_batches=plan.calib_batches)
        keep: dict[str, Any] = {"support": None, "adapter_dir": None}
        if split_label(label)[0] == "shira":
            keep["support"] = shira_support(trained.peft_model)
            if device is not None:
                from shira_edge.tuner.train import save_adapter

                keep["adapter_dir"] = work / "adapters" / f"{label}-{task}-lr{lr:g}-seed{seed}"
                save_adapter(trained.peft_model, _sidecar(info, label, plan, trained.steps), keep["adapter_dir"],
                             force=True)
        keep["deltas"] = lab.release(trained)
        scoring = time.perf_counter()
        val = lab.score(data[task]["val"], [keep["deltas"]], batch_size=plan.eval_batch)
        val_s = time.perf_counter() - scoring
        row = {"task": task, "label": label, "lr": lr, "seed": seed, "val": val.to_json(),
               "trainable": trained.trainable, "density": trained.trainable / trained.targeted,
               "steps": trained.steps, "batch": plan.batch, "train_s": trained.train_s,
               "train_cpu_s": trained.train_cpu_s, "val_s": val_s, "step_s_median": statistics.median(trained.step_s),
               "wall_s": time.perf_counter() - start}
        runs.append(row)
        progress(f"[{len(runs)}] {task:<9} {label:<12} lr {lr:g} seed {seed}: val exact {val.exact:.1%} loss "
                 f"{val.loss:.3f} | {trained.trainable:,} params, {row['step_s_median']:.2f}s/step, "
                 f"{row['wall_s']:.0f}s")
        return row, keep

    def better(a: dict[str, Any], b: dict[str, Any] | None) -> bool:
        return b is None or (a["val"]["exact"], -a["val"]["loss"]) > (b["val"]["exact"], -b["val"]["loss"])

    best_lr: dict[str, dict[str, float]] = {}
    fusion: list[dict[str, Any]] = []
    for label in plan.methods:
        best_lr[label] = {}
        for seed in plan.seeds:
            kept = {}
            # the sweep tasks first: the others reuse the lr chosen there
            for k, task in sorted(enumerate(plan.tasks), key=lambda kt: kt[1] not in plan.sweep_tasks):
                task_seed = seed + TASK_SEED_OFFSET * k
                if seed == plan.seeds[0] and task in plan.sweep_tasks:
                    best = None
                    for lr in plan.lr_grid(label):
                        row, keep = fit(label, task, lr, task_seed)
                        if better(row, best):
                            best, kept[task] = row, (row, keep)
                    best_lr[label][task] = best["lr"]
                else:
                    lr = best_lr[label].get(task) or best_lr[label][plan.sweep_tasks[0]]
                    best_lr[label][task] = lr
                    kept[task] = fit(label, task, lr, task_seed)
                row = kept[task][0]
                row["chosen"] = True
                row["test"] = lab.score(data[task]["test"], [kept[task][1]["deltas"]],
                                        batch_size=plan.eval_batch).to_json()
            fusion.append(_fuse(plan, lab, data, label, seed, kept, device, base_dir, work, progress))
            del kept
    if device is not None:
        device.close()
    return {
        "plan": dataclasses.asdict(plan),
        "model": info.to_json(),
        "threads": torch.get_num_threads(),
        "targeted_weights": lab.targeted,
        "data": {t: {part: len(v) for part, v in d.items()} for t, d in data.items()},
        "base": base,
        "base_device": base_device,
        "best_lr": best_lr,
        "lr_grid": {label: plan.lr_grid(label) for label in plan.methods},
        "runs": runs,
        "fusion": fusion,
        "startup_s": startup_s,
        "wall_s": time.perf_counter() - t0,
        "cpu_s": time.process_time() - c0,
    }


def _sidecar(info, label: str, plan: Plan, steps: int) -> dict[str, Any]:
    method, mask = split_label(label)
    return {"base_model": info.to_json(), "method": method, "mask": mask, "r": plan.r,
            "target_modules": list(plan.targets), "tokenizer": f"hf:{info.source}", "steps": steps}


def _rate(correct: list[bool]) -> float:
    return sum(correct) / max(len(correct), 1)


def _fuse(plan, lab, data, label, seed, kept, device, base_dir, work, progress) -> dict[str, Any]:
    """Alone vs fused (scale 1.0 and the best of the grid on val) for one method and seed."""
    start, pack_s = time.perf_counter(), 0.0
    t1, t2 = plan.tasks[:2]
    d1, d2 = kept[t1][1]["deltas"], kept[t2][1]["deltas"]
    row: dict[str, Any] = {"label": label, "seed": seed, "lr": {t: kept[t][0]["lr"] for t in (t1, t2)},
                           **delta_geometry(d1, d2)}
    s1, s2 = kept[t1][1]["support"], kept[t2][1]["support"]
    row["mask_overlap"] = mask_overlap(s1, s2) if s1 is not None else None
    val_means = {}
    for s in plan.fusion_scales:
        val_means[s] = statistics.mean(lab.score(data[t]["val"], [d1, d2], [s, s], plan.eval_batch).exact
                                       for t in (t1, t2))
    best = max(plan.fusion_scales, key=lambda s: (val_means[s], s == 1.0))
    row["val_exact_by_scale"] = {str(s): v for s, v in val_means.items()}
    row["best_scale"] = best
    host_fused = {}
    for t in (t1, t2):
        alone = kept[t][0]["test"]
        fused = lab.score(data[t]["test"], [d1, d2], batch_size=plan.eval_batch)
        fused_best = fused if best == 1.0 else lab.score(data[t]["test"], [d1, d2], [best, best], plan.eval_batch)
        row[t] = {"alone": alone, "fused": fused.to_json(), "fused_best": fused_best.to_json()}
        host_fused[t] = fused
    if device is not None and kept[t1][1]["adapter_dir"] is not None:
        from shira_edge.pack import pack_adapter

        shira = {}
        packing = time.perf_counter()
        for t in (t1, t2):
            shira[t] = work / "adapters" / f"{label}-{t}-seed{seed}.shira"
            pack_adapter(kept[t][1]["adapter_dir"], shira[t], model=str(base_dir))
        pack_s = time.perf_counter() - packing
        # The fused pair at scale 1.0 only. One adapter and other scales go through the same switch (the
        # runtime tests check it bit for bit against a fresh export of the same weights); answering them too made
        # SHiRA's fusion rows 21 min of the 3-point grid run instead of 11, and agreed with the host on every entry
        # (docs/quality.md).
        for t in (t1, t2):
            fused = device.exact(data[t]["test"], [str(shira[t1]), str(shira[t2])], [1.0, 1.0])
            row[t]["device"] = {
                "fused": _rate(fused[0]),
                # per example, the runtime's greedy answers against the host's teacher-forced ones: right/wrong
                # alike, and the same first token
                "agreement_fused": _agree(fused[0], host_fused[t].correct),
                "first_token_agreement": _agree(fused[1], host_fused[t].first)}
    row["wall_s"], row["pack_s"] = time.perf_counter() - start, pack_s
    progress(f"  fused {label:<12} seed {seed}: " + "; ".join(
        f"{t} {row[t]['alone']['exact']:.1%} -> {row[t]['fused']['exact']:.1%} (x{best:g}: "
        f"{row[t]['fused_best']['exact']:.1%})" + (f", runtime {row[t]['device']['fused']:.1%}"
                                                   if "device" in row[t] else "") for t in (t1, t2)))
    return row


def _agree(a: list[bool], b: list[bool]) -> float:
    return sum(x == y for x, y in zip(a, b)) / max(len(a), 1)


# ---------------------------------------------------------------- report


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _mean_spread(xs: list[float]) -> str:
    if len(xs) == 1:
        return _pct(xs[0])
    return f"{_pct(statistics.mean(xs))} ({_pct(min(xs))}-{_pct(max(xs))})"


def drop(alone: float, fused: float) -> float | None:
    """Relative accuracy drop in percent, as the paper's Table 4 (None when alone is 0)."""
    return None if alone == 0 else 100.0 * (alone - fused) / alone


def markdown(res: dict[str, Any]) -> str:
    plan, tasks = res["plan"], res["plan"]["tasks"]
    labels = list(res["best_lr"])
    grids = res.get("lr_grid") or {name: plan["lrs"] for name in labels}   # results from before per-method grids
    lrs = sorted({lr for name in labels for lr in grids[name]})
    out = []
    if plan["reduced"]:
        out += [f"**Reduced run**: {plan['reduced']}.", ""]
    out += [f"Model {res['model']['name']} ({res['model']['weights']}); r = {plan['r']} on "
            f"{', '.join(plan['targets'])}; {plan['steps']} steps x batch {plan['batch']}; lr grid "
            f"{_grids(grids)} (chosen on {', '.join(plan['sweep_tasks'])} val); seeds "
            f"{', '.join(map(str, plan['seeds']))}; {res['threads']} thread(s); wall {res['wall_s']:.0f} s, CPU "
            f"{res['cpu_s']:.0f} s.", "",
            "Exact match in %: greedy answer equals the reference, end of turn included.", "",
            "### Un-adapted model (test)", "", "| task | exact % | answer loss | exact % through the runtime |",
            "|---|---|---|---|"]
    for t in tasks:
        dev = res["base_device"][t] if res["base_device"] else None
        out.append(f"| {t} | {_pct(res['base'][t]['test']['exact'])} | {res['base'][t]['test']['loss']:.3f} | "
                   f"{_pct(dev)} |")

    sweep = [r for r in res["runs"] if r["seed"] % TASK_SEED_OFFSET == plan["seeds"][0]
             and r["task"] in plan["sweep_tasks"]]
    if len(lrs) > 1:
        out += ["", "### Learning-rate sweep (validation exact % / answer loss; - : not in the method's grid)", "",
                "| task | method | trainable | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | chosen |",
                "|---|---|---|" + "---|" * len(lrs) + "---|"]
        for t in plan["sweep_tasks"]:
            for name in labels:
                cells = []
                for lr in lrs:
                    r = next((r for r in sweep if r["task"] == t and r["label"] == name and r["lr"] == lr), None)
                    cells.append("-" if r is None else f"{_pct(r['val']['exact'])} / {r['val']['loss']:.3f}")
                trainable = next(r["trainable"] for r in res["runs"] if r["label"] == name)
                out.append(f"| {t} | {name} | {trainable:,} | " + " | ".join(cells) +
                           f" | {res['best_lr'][name][t]:g} |")

    out += ["", "### Test accuracy at the chosen lr, one adapter (mean over seeds, min-max)", "",
            "| method | trainable | density | " + " | ".join(f"{t} exact %" for t in tasks) + " | " +
            " | ".join(f"{t} loss" for t in tasks) + " |", "|---|---|---|" + "---|" * (2 * len(tasks))]
    for name in labels:
        chosen = [r for r in res["runs"] if r["label"] == name and r.get("chosen")]
        ex = [_mean_spread([r["test"]["exact"] for r in chosen if r["task"] == t]) for t in tasks]
        ls = [f"{statistics.mean(r['test']['loss'] for r in chosen if r['task'] == t):.3f}" for t in tasks]
        out.append(f"| {name} | {chosen[0]['trainable']:,} | {chosen[0]['density']:.2%} | " + " | ".join(ex) +
                   " | " + " | ".join(ls) + " |")

    t1, t2 = tasks[:2]
    out += ["", "### Fusion: both adapters added (test exact %, paper Table 4 style)", "",
            "Drop = (alone - fused) / alone, in % of the alone accuracy. Scale s: both adapters at s, s chosen on "
            "validation. Runtime: SHiRA's pair switched in the ONNX export (scale 1.0) and answered through generate; "
            "runtime = host: the lower over both tasks of the share of test examples where the runtime's verdict "
            "(right/wrong) / first token equals the host's.", "",
            f"| method | seed | {t1} alone | {t1} fused | {t2} alone | {t2} fused | mean drop % | best s | "
            f"{t1} fused@s | {t2} fused@s | mean drop@s % | runtime {t1} / {t2} fused | runtime = host |",
            "|---" * 13 + "|"]
    for r in res["fusion"]:
        a1, a2 = r[t1]["alone"]["exact"], r[t2]["alone"]["exact"]
        f1, f2 = r[t1]["fused"]["exact"], r[t2]["fused"]["exact"]
        b1, b2 = r[t1]["fused_best"]["exact"], r[t2]["fused_best"]["exact"]
        dev = r[t1].get("device")
        runtime = f"{_pct(dev['fused'])} / {_pct(r[t2]['device']['fused'])}" if dev else "-"
        agree = (f"{min(dev['agreement_fused'], r[t2]['device']['agreement_fused']):.0%} / "
                 f"{min(dev['first_token_agreement'], r[t2]['device']['first_token_agreement']):.0%}" if dev else "-")
        out.append(f"| {r['label']} | {r['seed']} | {_pct(a1)} | {_pct(f1)} | {_pct(a2)} | {_pct(f2)} | "
                   f"{_mean_drop(a1, f1, a2, f2)} | {r['best_scale']:g} | {_pct(b1)} | {_pct(b2)} | "
                   f"{_mean_drop(a1, b1, a2, b2)} | {runtime} | {agree} |")

    out += ["", "### What explains the interference", "",
            "‖ΔW‖: Frobenius norm of an adapter's dense delta over all adapted layers; cos: cosine between the two "
            "tasks' deltas; overlap: shared SHiRA mask entries.", "",
            f"| method | seed | lr {t1} / {t2} | ‖ΔW {t1}‖ | ‖ΔW {t2}‖ | cos | mask overlap |", "|---" * 7 + "|"]
    for r in res["fusion"]:
        overlap = "-" if r["mask_overlap"] is None else f"{r['mask_overlap']:.1%}"
        out.append(f"| {r['label']} | {r['seed']} | {r['lr'][t1]:g} / {r['lr'][t2]:g} | {r['delta_norm_task1']:.3f} | "
                   f"{r['delta_norm_task2']:.3f} | {r['delta_cosine']:.3f} | {overlap} |")
    steps = [r["step_s_median"] for r in res["runs"]]
    out += ["", f"Median seconds per training step over all runs: {statistics.median(steps):.2f} "
            f"(min {min(steps):.2f}, max {max(steps):.2f})."]
    return "\n".join(out) + "\n"


def _grids(grids: dict[str, Any]) -> str:
    """{"lora": (1e-3, 3e-3), "dora": (1e-3, 3e-3), ...} -> "0.001, 0.003 (lora, dora); ..."."""
    by_grid: dict[tuple, list[str]] = {}
    for name, grid in grids.items():
        by_grid.setdefault(tuple(grid), []).append(name)
    if len(by_grid) == 1:
        return ", ".join(f"{lr:g}" for lr in next(iter(by_grid)))
    return "; ".join(f"{', '.join(f'{lr:g}' for lr in g)} ({', '.join(names)})" for g, names in by_grid.items())


def _mean_drop(a1: float, f1: float, a2: float, f2: float) -> str:
    drops = [d for d in (drop(a1, f1), drop(a2, f2)) if d is not None]
    return f"{statistics.mean(drops):.1f}" if drops else "-"


def estimate_seconds(res: dict[str, Any], plan: Plan) -> dict[str, float]:
    """How long `plan` would take, from this run's measured times: per-step seconds per method, the per-run overhead
    (merge, calibration, saving; validation scaled by its size), each fusion's evaluation (scaled by the
    val + test size; packing not) and the start-up (model, base scores, runtime)."""
    done = res["plan"]
    per_step = {name: statistics.median(r["step_s_median"] for r in res["runs"] if r["label"] == name)
                for name in res["best_lr"]}
    fallback = max(per_step.values())   # a method this run did not measure costs the dearest measured one
    overhead = statistics.median(r["wall_s"] - r["train_s"] - r["val_s"] + r["val_s"] * plan.n_val / done["n_val"]
                                 for r in res["runs"])
    def runs(method: str) -> int:
        return len(plan.sweep_tasks) * len(plan.lr_grid(method)) + (len(plan.tasks) - len(plan.sweep_tasks)) + \
            len(plan.tasks) * (len(plan.seeds) - 1)

    train = sum(runs(m) * (plan.steps * per_step.get(m, fallback) + overhead) for m in plan.methods)
    scale = (plan.n_test + plan.n_val) / (done["n_test"] + done["n_val"])
    fusion_by_kind = {}
    for r in res["fusion"]:
        fusion_by_kind.setdefault(r["label"].startswith("shira-"), []).append((r["wall_s"] - r["pack_s"]) * scale
                                                                             + r["pack_s"])
    dearest = max(statistics.mean(v) for v in fusion_by_kind.values())
    fusion = sum(statistics.mean(fusion_by_kind.get(m.startswith("shira-"), [dearest])) for m in plan.methods) * \
        len(plan.seeds)
    startup = res["startup_s"] * (1 + scale) / 2   # about half of it is scoring the base on val + test
    return {"train_s": train, "fusion_and_eval_s": fusion + startup, "total_s": train + fusion + startup}

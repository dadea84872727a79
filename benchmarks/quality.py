"""Adapter quality on SmolLM2-135M-Instruct and two real dictionary tasks: LoRA, DoRA and SHiRA (rand, wm, grad,
snip, struct) at equal trainable parameters, alone and fused, by greedy exact match; SHiRA fused through the runtime.

    apt-get install dict-freedict-eng-fra dict-vera      # the data (nothing is installed for you)
    nice .venv/bin/python benchmarks/quality.py --export /tmp/smollm2/onnx -o quality.json      # the full study
    nice .venv/bin/python benchmarks/quality.py --methods lora shira-wm --seeds 0 -o r.json       # reduced, labelled
    .venv/bin/python benchmarks/quality.py --quick -o /tmp/q.json      # tiny model + test samples, under a minute

--export names an ONNX export of the same model (`shira-edge export --model smollm2-135m -o DIR`); without it the
study exports one into its work directory first. Any flag that makes the run smaller than the full study labels the
results "reduced" with what was cut. Progress goes to stderr, the tables to stdout and to the .md beside the JSON,
together with the full study's time estimated from this run's measured step times. The study itself lives in
shira_edge/quality/ (study.py); the reading is in docs/quality.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from shira_edge.quality import METHODS, write_report  # noqa: E402  (torch-free imports only: --help stays fast)
from shira_edge.quality.study import FULL, QUICK, Plan  # noqa: E402
from shira_edge.quality.tasks import TASKS, TaskDataMissing, load_task  # noqa: E402


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--output", required=True, type=Path,
                   help="results JSON (tables also go to the .md beside it)")
    p.add_argument("--quick", action="store_true", help="tiny random Llama on the shipped 60-entry samples (tests)")
    p.add_argument("--model", help=f"base model alias or directory (default {FULL.model})")
    p.add_argument("--export", help="ONNX export dir of the same model, reused read-only (default: export one)")
    p.add_argument("--data-dir", help=f"where the dictd files are (default {FULL.data_dir})")
    p.add_argument("--methods", nargs="+", choices=METHODS, help="subset of methods (default: all)")
    p.add_argument("--seeds", type=int, nargs="+", help=f"adapter seeds (default {' '.join(map(str, FULL.seeds))})")
    p.add_argument("--lrs", type=float, nargs="+",
                   help="one learning-rate grid for every method (default: each method's own two points, "
                        "LR_GRIDS in shira_edge/quality/study.py; the 3-point grid run was --lrs 1e-3 3e-3 1e-2)")
    p.add_argument("--steps", type=int, help=f"optimizer steps per adapter (default {FULL.steps})")
    p.add_argument("--batch", type=int, help=f"examples per step (default {FULL.batch})")
    p.add_argument("--n-val", type=int, help=f"validation entries per task (default {FULL.n_val})")
    p.add_argument("--n-test", type=int, help=f"test entries per task (default {FULL.n_test})")
    p.add_argument("--sweep-tasks", nargs="+", choices=list(TASKS), help="tasks the lr is chosen on")
    p.add_argument("--no-device", action="store_true", help="skip the runtime path (no export needed)")
    p.add_argument("--threads", type=int, default=1, help="torch and runtime threads (default 1: shared machine)")
    args = p.parse_args(argv)
    if args.output.suffix != ".json":
        p.error(f"-o {args.output}: the results file must end in .json")
    if not args.output.parent.is_dir():
        p.error(f"-o {args.output}: directory {args.output.parent} does not exist")
    for flag in ("steps", "batch", "n_val", "n_test", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if args.lrs and not all(lr > 0 for lr in args.lrs):
        p.error(f"--lrs must all be positive, got {args.lrs}")
    if args.export and not (Path(args.export) / "manifest.json").is_file():
        p.error(f"--export {args.export}: no manifest.json there; give a `shira-edge export` output directory")
    return p, args


def make_plan(args) -> Plan:
    plan = QUICK if args.quick else FULL
    changes = {"model": args.model, "export": args.export, "data_dir": args.data_dir, "steps": args.steps,
               "batch": args.batch, "n_val": args.n_val, "n_test": args.n_test,
               "methods": tuple(args.methods) if args.methods else None,
               "seeds": tuple(args.seeds) if args.seeds else None, "lrs": tuple(args.lrs) if args.lrs else None,
               "sweep_tasks": tuple(args.sweep_tasks) if args.sweep_tasks else None,
               "device": False if args.no_device else None, "threads": args.threads}
    plan = dataclasses.replace(plan, **{k: v for k, v in changes.items() if v is not None})
    if not args.quick:
        def full(name):
            return "each method's LR_GRIDS pair" if name == "lrs" else repr(getattr(FULL, name))

        cut = [f"{f.name} {getattr(plan, f.name)!r} (full: {full(f.name)})"
               for f in dataclasses.fields(Plan) if f.name not in ("export", "data_dir", "threads", "reduced")
               and getattr(plan, f.name) != getattr(FULL, f.name)]
        plan = dataclasses.replace(plan, reduced="; ".join(cut) if cut else None)
    return plan


def main(argv=None) -> int:
    parser, args = parse(argv)
    plan = make_plan(args)
    try:
        for task in plan.tasks:   # before any model loads: missing data is the first thing a user hears about
            load_task(task, plan.data_dir)
    except TaskDataMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    import torch
    from transformers.utils import logging as hf_logging

    from shira_edge.quality.study import estimate_seconds, markdown, run_study

    warnings.filterwarnings("ignore")  # transformers/peft deprecation chatter would bury the progress lines
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(plan.threads)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="shira-quality-") as tmp:
        res = run_study(plan, Path(tmp))
    res["command"] = " ".join(["benchmarks/quality.py", *(argv if argv is not None else sys.argv[1:])])
    res["total_wall_s"] = time.perf_counter() - start
    res["total_cpu_s"] = time.process_time()
    res["load_average"] = os.getloadavg()
    if not args.quick:
        res["full_study_estimate"] = estimate_seconds(res, FULL)
    table = markdown(res)
    if "full_study_estimate" in res:
        est = res["full_study_estimate"]
        table += (f"\nFull study estimated from this run's step times: {est['total_s'] / 60:.0f} min "
                  f"(training {est['train_s'] / 60:.0f} min, fusion and evaluation {est['fusion_and_eval_s'] / 60:.0f} "
                  f"min) at {plan.threads} thread(s).\n")
    write_report(args.output, res, table)
    print(table)
    print(f"total wall {res['total_wall_s']:.0f} s, CPU {res['total_cpu_s']:.0f} s, {plan.threads} thread(s), "
          f"load average {res['load_average'][0]:.1f}; wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

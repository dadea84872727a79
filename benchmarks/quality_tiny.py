"""The earlier tiny-model quality check (superseded by benchmarks/quality.py on SmolLM2-135M and real tasks):
LoRA vs SHiRA (every mask) at equal trainable parameters on a 0.6M-parameter OPT, and the cost of fusing two adapters.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/quality_tiny.py -o quality.json        # ~5 min CPU, 9-12 min shared
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/quality_tiny.py --fusion-lr 0.003 -o q.json   # one common lr
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/quality_tiny.py --quick -o /tmp/q.json   # ~1 min

Results and their reading: docs/quality.md, "Earlier study: tiny model".

1. A small OPT (byte-level tokenizer, shira_edge.data.ByteTokenizer) is pre-trained from scratch on Python
   standard-library SOURCE code (the stdlib .py files, with docstrings and comments stripped via ast.unparse).
2. It is adapted to `task1`: the stdlib's DOCSTRINGS (module/class/function docstrings, one document per file),
   with LoRA and with SHiRA under each mask (rand, wm, grad, snip, struct), all through `train_adapter` with the same
   r, target modules, steps, batch and learning-rate grid. nnz = r(m+n) per weight, so the trainable counts match.
   The learning rate is picked per method on a validation split; the loss reported is on a separate test split.
   Every split is by document, with a fixed seed.
3. Multi-adapter interference: each method also trains an adapter on `task2` (the Python language reference
   text shipped in pydoc_data.topics, one document per topic) at its chosen learning rate (or --fusion-lr).
   The two adapters' weight deltas are added to the base at scale 1.0 each (SHiRA: both sparse deltas; LoRA: both
   B@A deltas), and each task's test loss with its own adapter alone is compared with its loss under the fused pair.

Only the adapter seed (mask, LoRA init, data order) changes across --seeds; the pre-trained base is the same.
The task-2 adapter uses seed + 100, so rand and struct masks differ between the two tasks (wm cannot: it depends
on the base weights only). The script prints progress to stderr and the tables to stdout, and writes JSON (-o) and
a markdown copy of the tables (same path, .md).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import math
import os
import random
import sys
import sysconfig
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout
from shira_edge.quality import write_report  # noqa: E402
from shira_edge.quality.geometry import delta_geometry, mask_overlap, shira_support  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

METHODS = [("lora", None)] + [("shira", m) for m in ("rand", "wm", "grad", "snip", "struct")]
TASK2_SEED_OFFSET = 100
# Tests, vendored packages, the reference text (task 2) and generated codec tables are not the code we want.
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "pydoc_data", "encodings"}


@dataclass(frozen=True)
class Size:
    hidden: int = 128
    ffn: int = 256
    layers: int = 4
    heads: int = 4
    seq_len: int = 64
    pretrain_steps: int = 300
    pretrain_batch: int = 16
    pretrain_lr: float = 3e-3
    steps: int = 80                  # adapter optimizer steps, the same for every method
    batch: int = 8
    r: int = 4
    lrs: tuple[float, ...] = (3e-3, 1e-2, 3e-2)
    seeds: tuple[int, ...] = (0, 1)
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
    eval_blocks: int = 128           # per split (val, test), seq_len tokens each
    code_chars: int = 1_500_000      # caps on the extracted corpora
    doc_chars: int = 600_000
    calib_batches: int = 4           # grad/snip calibration batches (train_adapter's default)
    fusion_lr: float | None = None   # one lr for every method's further seeds and fusion (default: each its best)


FULL = Size()
QUICK = Size(hidden=64, ffn=256, layers=2, pretrain_steps=60, steps=25, lrs=(3e-3, 1e-2, 3e-2), seeds=(0,),
             eval_blocks=32, code_chars=200_000, doc_chars=150_000)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- corpora


def stdlib_files(stdlib: Path) -> list[Path]:
    files = [p for p in stdlib.rglob("*.py") if not SKIP_DIRS.intersection(p.relative_to(stdlib).parts[:-1])]
    return sorted(files, key=lambda p: p.relative_to(stdlib).as_posix())


def _is_docstring(node: ast.stmt) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


def code_and_docstrings(source: str) -> tuple[str, list[str]]:
    """(the code with docstrings and comments removed, the docstrings); raises SyntaxError/ValueError."""
    tree = ast.parse(source)
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                docs.append(doc)
            if node.body and _is_docstring(node.body[0]):
                node.body = node.body[1:] or [ast.Pass()]
    return ast.unparse(tree), docs


def build_corpora(code_chars: int, doc_chars: int, seed: int = 0) -> dict[str, list[str]]:
    """Documents of the three corpora, from the running Python's standard library (no network, no imports of
    stdlib modules): code (one document per file), task1 docstrings (one per file), task2 reference topics."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files(stdlib)
    random.Random(seed).shuffle(files)  # a seeded spread over packages instead of an alphabetical prefix
    code, docs, n_code, n_docs = [], [], 0, 0
    for path in files:
        if n_code >= code_chars and n_docs >= doc_chars:
            break
        try:
            text, file_docs = code_and_docstrings(path.read_text(encoding="utf-8"))
        except (SyntaxError, ValueError, UnicodeDecodeError, RecursionError):
            continue  # e.g. lib2to3 fixtures in Python 2 syntax
        if n_code < code_chars and text.strip():
            code.append(text)
            n_code += len(text)
        if n_docs < doc_chars and file_docs:
            doc = "\n\n".join(file_docs)
            docs.append(doc)
            n_docs += len(doc)
    from pydoc_data.topics import topics

    reference = [topics[k] for k in sorted(topics) if topics[k].strip()]
    if not code or not docs:
        raise RuntimeError(f"no Python source or docstrings found under {stdlib}")
    return {"code": code, "task1": docs, "task2": reference}


def split_documents(docs: list[str], seed: int, fraction: float = 0.1) -> dict[str, list[str]]:
    """train / val / test by document: `fraction` of the documents each for val and test (at least one)."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n = max(1, round(len(docs) * fraction))
    if len(docs) < 2 * n + 1:
        raise ValueError(f"{len(docs)} documents are too few for train/val/test splits")
    pick = lambda idx: [docs[i] for i in sorted(idx)]  # noqa: E731
    return {"val": pick(order[:n]), "test": pick(order[n:2 * n]), "train": pick(order[2 * n:])}


def eval_blocks(docs: list[str], seq_len: int, limit: int):
    from shira_edge.data import ByteTokenizer, make_blocks

    blocks = make_blocks(docs, ByteTokenizer().encode, seq_len)
    if len(blocks) == 0:
        raise ValueError(f"held-out documents give no block of {seq_len} tokens")
    step = max(1, len(blocks) // limit)  # spread over all held-out documents, not just the first ones
    return blocks[::step][:limit]


def write_jsonl(docs: list[str], path: Path) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


# ---------------------------------------------------------------- base model


def opt_config(size: Size):
    from transformers import OPTConfig

    from shira_edge.data import ByteTokenizer

    return OPTConfig(vocab_size=ByteTokenizer.vocab_needed, hidden_size=size.hidden, word_embed_proj_dim=size.hidden,
                     ffn_dim=size.ffn, num_hidden_layers=size.layers, num_attention_heads=size.heads,
                     max_position_embeddings=max(256, size.seq_len), dropout=0.0, attention_dropout=0.0,
                     activation_dropout=0.0, layerdrop=0.0, do_layer_norm_before=True, enable_bias=True,
                     pad_token_id=1, bos_token_id=2, eos_token_id=2)


def pretrain(size: Size, train_blocks, val_blocks, seed: int = 0, progress: Callable[[str], None] = log):
    """Full-parameter training from scratch: AdamW, 10% linear warm-up, cosine decay to 10%."""
    import torch
    from transformers import OPTForCausalLM

    from shira_edge.tuner.train import BatchStream, Dist, evaluate_loss

    torch.manual_seed(seed)
    model = OPTForCausalLM(opt_config(size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=size.pretrain_lr, weight_decay=0.01)
    warm = max(1, size.pretrain_steps // 10)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warm) / max(1, size.pretrain_steps - warm)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    stream = BatchStream(train_blocks, size.pretrain_batch, Dist(), seed)
    model.train()
    start = time.perf_counter()
    for step in range(size.pretrain_steps):
        ids = stream.batch(step)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % max(1, size.pretrain_steps // 10) == 0 or step == size.pretrain_steps - 1:
            progress(f"  pretrain step {step + 1}/{size.pretrain_steps}  loss {loss.item():.3f}  "
                f"{time.perf_counter() - start:.0f}s")
    model.eval()
    return model, evaluate_loss(model, val_blocks, batch_size=32)


# ---------------------------------------------------------------- adapters


def adapter_deltas(peft_model) -> dict[str, Any]:
    """Module name -> dense weight delta (scaling included) of every adapted layer: exactly what fusing adds."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    deltas = {}
    for name, module in peft_model.base_model.model.named_modules():
        if isinstance(module, BaseTunerLayer):
            delta = module.get_delta_weight("default")
            deltas[name] = (delta.to_dense() if delta.is_sparse else delta).detach().clone()
    return deltas


class Scorer:
    """Held-out loss of the base model with weight deltas added (scale 1.0 each); weights restored after."""

    def __init__(self, base_dir: Path):
        from shira_edge.models import load_model

        self.model, _ = load_model(str(base_dir))

    def loss(self, deltas: list[dict[str, Any]], blocks) -> float:
        import torch

        from shira_edge.tuner.train import evaluate_loss

        originals = {}
        with torch.no_grad():
            for delta in deltas:
                for name, d in delta.items():
                    weight = self.model.get_submodule(name).weight
                    originals.setdefault(name, weight.clone())
                    weight += d
        try:
            return evaluate_loss(self.model, blocks, batch_size=32)
        finally:
            with torch.no_grad():
                for name, weight in originals.items():
                    self.model.get_submodule(name).weight.copy_(weight)


def train_one(base_dir: Path, data: Path, size: Size, method: str, mask: str | None, lr: float, seed: int):
    from shira_edge.tuner.train import train_adapter

    result = train_adapter(str(base_dir), data, None, method=method, mask=mask or "rand", r=size.r,
                           target_modules=list(size.targets), steps=size.steps, lr=lr, batch_size=size.batch,
                           seq_len=size.seq_len, seed=seed, eval_fraction=0.01, calib_batches=size.calib_batches,
                           progress=False)
    if result.sidecar["tokenizer"] != "byte-level":  # our held-out blocks are byte-level ids
        raise RuntimeError(f"train_adapter used tokenizer {result.sidecar['tokenizer']}, expected byte-level")
    return result


def label(method: str, mask: str | None) -> str:
    return "lora" if method == "lora" else f"shira-{mask}"


# ---------------------------------------------------------------- the measurement


def run_quality(size: Size, corpora: dict[str, list[str]], work: Path,
                progress: Callable[[str], None] = log) -> dict[str, Any]:
    """Pre-train, sweep, fuse; returns everything measured (see main for the tables)."""
    t0 = time.perf_counter()
    splits = {name: split_documents(docs, seed=0) for name, docs in corpora.items()}
    from shira_edge.data import ByteTokenizer, make_blocks

    code_train = make_blocks(splits["code"]["train"], ByteTokenizer().encode, size.seq_len)
    held = {task: {part: eval_blocks(splits[task][part], size.seq_len, size.eval_blocks) for part in ("val", "test")}
            for task in ("code", "task1", "task2")}
    data = {task: write_jsonl(splits[task]["train"], work / f"{task}-train.jsonl") for task in ("task1", "task2")}

    progress(f"pre-training: {len(code_train)} blocks of {size.seq_len} byte tokens, {size.pretrain_steps} steps")
    base, code_val = pretrain(size, code_train, held["code"]["val"], progress=progress)
    base_dir = work / "base"
    base.save_pretrained(base_dir)
    del base
    pretrain_s = time.perf_counter() - t0
    scorer = Scorer(base_dir)
    base_loss = {task: {part: scorer.loss([], held[task][part]) for part in ("val", "test")}
                 for task in ("task1", "task2")}
    base_loss["code"] = {"val": code_val}
    progress(f"base: code val {code_val:.3f} | task1 test {base_loss['task1']['test']:.3f} | "
             f"task2 test {base_loss['task2']['test']:.3f} (un-adapted) | {pretrain_s:.0f}s")

    sweep, kept = [], {}
    total = len(METHODS) * (len(size.lrs) + 2 * len(size.seeds) - (size.fusion_lr in (None, *size.lrs)))
    done = 0

    def record(task: str, method: str, mask: str | None, lr: float, seed: int) -> dict[str, Any]:
        nonlocal done
        start = time.perf_counter()
        result = train_one(base_dir, data[task], size, method, mask, lr, seed)
        deltas = adapter_deltas(result.model)
        row = {"task": task, "method": method, "mask": mask, "label": label(method, mask), "lr": lr, "seed": seed,
               "val_loss": scorer.loss([deltas], held[task]["val"]),
               "test_loss": scorer.loss([deltas], held[task]["test"]),
               "trainable": result.trainable, "density": result.density, "steps": result.steps,
               "wall_s": time.perf_counter() - start}
        done += 1
        progress(f"[{done}/{total}] {task} {row['label']:<12} lr {lr:g} seed {seed}: val {row['val_loss']:.4f} "
                 f"test {row['test_loss']:.4f} ({row['trainable']:,} params, {row['wall_s']:.1f}s)")
        sweep.append(row)
        kept[(task, row["label"], lr, seed)] = (deltas, shira_support(result.model))
        return row

    # Learning-rate sweep on task 1, first seed; pick per method on val.
    first = size.seeds[0]
    best_lr = {}
    for method, mask in METHODS:
        rows = [record("task1", method, mask, lr, first) for lr in size.lrs]
        best_lr[label(method, mask)] = min(rows, key=lambda r: r["val_loss"])["lr"]
    seed_lr = {name: size.fusion_lr or lr for name, lr in best_lr.items()}
    for key in [k for k in kept if k[2] != seed_lr[k[1]]]:
        del kept[key]  # only the adapters at the fusion lr are needed

    # Further seeds at the fusion lr (each method's chosen one by default), and the task-2 adapters for fusion.
    fusion = []
    for seed in size.seeds:
        for method, mask in METHODS:
            name = label(method, mask)
            lr = seed_lr[name]
            if ("task1", name, lr, seed) not in kept:
                record("task1", method, mask, lr, seed)
            record("task2", method, mask, lr, seed + TASK2_SEED_OFFSET)
            d1, s1 = kept.pop(("task1", name, lr, seed))
            d2, s2 = kept.pop(("task2", name, lr, seed + TASK2_SEED_OFFSET))
            row = {"label": name, "method": method, "mask": mask, "lr": lr, "seed": seed,
                   "mask_overlap": mask_overlap(s1, s2) if method == "shira" else None, **delta_geometry(d1, d2)}
            for task, own in (("task1", d1), ("task2", d2)):
                row[f"{task}_alone"] = scorer.loss([own], held[task]["test"])
                row[f"{task}_fused"] = scorer.loss([d1, d2], held[task]["test"])
            fusion.append(row)
            overlap = "" if row["mask_overlap"] is None else f", mask overlap {row['mask_overlap']:.1%}"
            progress(f"  fused {name:<12} seed {seed}: task1 {row['task1_alone']:.4f} -> {row['task1_fused']:.4f}, "
                     f"task2 {row['task2_alone']:.4f} -> {row['task2_fused']:.4f}{overlap}")

    return {
        "size": dataclasses.asdict(size),
        "corpora": {task: {part: {"documents": len(docs), "chars": sum(map(len, docs))}
                           for part, docs in parts.items()} for task, parts in splits.items()},
        "eval_tokens_per_split": {task: int(held[task]["test"].numel()) for task in held},
        "base_loss": base_loss,
        "pretrain_s": pretrain_s,
        "best_lr": best_lr,
        "seed_lr": seed_lr,
        "sweep": sweep,
        "fusion": fusion,
        "wall_s": time.perf_counter() - t0,
    }


# ---------------------------------------------------------------- report


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def markdown(res: dict[str, Any]) -> str:
    size, base = res["size"], res["base_loss"]
    seeds = size["seeds"]
    rows1 = [r for r in res["sweep"] if r["task"] == "task1"]
    labels = list(res["best_lr"])
    out = [f"Un-adapted base: task1 test loss {base['task1']['test']:.4f}, task2 test loss "
           f"{base['task2']['test']:.4f} (nats/byte token).", ""]

    out += ["### Learning-rate sweep (task 1, seed %d): val / test loss" % seeds[0], "",
            "| method | trainable | " + " | ".join(f"lr {lr:g}" for lr in size["lrs"]) + " | chosen lr |",
            "|---|---|" + "---|" * len(size["lrs"]) + "---|"]
    for name in labels:
        cells = []
        for lr in size["lrs"]:
            r = next(r for r in rows1 if r["label"] == name and r["lr"] == lr and r["seed"] == seeds[0])
            cells.append(f"{r['val_loss']:.4f} / {r['test_loss']:.4f}")
        trainable = next(r["trainable"] for r in rows1 if r["label"] == name)
        out.append(f"| {name} | {trainable:,} | " + " | ".join(cells) + f" | {res['best_lr'][name]:g} |")

    same = "the chosen lr" if res["size"]["fusion_lr"] is None else f"lr {res['size']['fusion_lr']:g} (--fusion-lr)"
    out += ["", f"### Held-out test loss at {same} (task 1)", "",
            "| method | lr | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | vs un-adapted |",
            "|---|---|" + "---|" * len(seeds) + "---|---|"]
    for name in labels:
        lr = res["seed_lr"][name]
        losses = [next(r["test_loss"] for r in rows1 if r["label"] == name and r["lr"] == lr and r["seed"] == s)
                  for s in seeds]
        out.append(f"| {name} | {lr:g} | " + " | ".join(f"{x:.4f}" for x in losses) +
                   f" | {_mean(losses):.4f} | {_mean(losses) - base['task1']['test']:+.4f} |")

    out += ["", f"### Fusion at {same}: test loss with the task's own adapter alone -> with both adapters added "
            "(scale 1.0 each)", "",
            "| method | seed | task1 alone | task1 fused | Δ task1 | task2 alone | task2 fused | Δ task2 | "
            "mean Δ | mask overlap | ‖ΔW1‖ | ‖ΔW2‖ | cos(ΔW1, ΔW2) |", "|---" * 13 + "|"]
    for r in res["fusion"]:
        d1, d2 = r["task1_fused"] - r["task1_alone"], r["task2_fused"] - r["task2_alone"]
        overlap = "-" if r["mask_overlap"] is None else f"{r['mask_overlap']:.1%}"
        out.append(f"| {r['label']} | {r['seed']} | {r['task1_alone']:.4f} | {r['task1_fused']:.4f} | {d1:+.4f} | "
                   f"{r['task2_alone']:.4f} | {r['task2_fused']:.4f} | {d2:+.4f} | {(d1 + d2) / 2:+.4f} | {overlap} | "
                   f"{r['delta_norm_task1']:.2f} | {r['delta_norm_task2']:.2f} | {r['delta_cosine']:.3f} |")
    if len(seeds) > 1:
        out += ["", "Mean over seeds:", "", "| method | Δ task1 | Δ task2 | mean Δ |", "|---|---|---|---|"]
        for name in labels:
            rs = [r for r in res["fusion"] if r["label"] == name]
            d1 = _mean([r["task1_fused"] - r["task1_alone"] for r in rs])
            d2 = _mean([r["task2_fused"] - r["task2_alone"] for r in rs])
            out.append(f"| {name} | {d1:+.4f} | {d2:+.4f} | {(d1 + d2) / 2:+.4f} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-o", "--output", required=True, type=Path,
                        help="JSON results (the tables also go to the .md beside it)")
    parser.add_argument("--quick", action="store_true", help="smaller model and corpora, one seed (~1 min)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    parser.add_argument("--seeds", type=int, nargs="+", help="adapter seeds (default: 0 1, --quick: 0)")
    parser.add_argument("--fusion-lr", type=float,
                        help="train the further seeds and the fused pairs of every method at this lr instead of "
                             "each method's best (separates the method from the size of its chosen step)")
    args = parser.parse_args(argv)
    if args.output.suffix != ".json":
        parser.error(f"-o {args.output}: the results file must end in .json")
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    if not args.output.parent.is_dir():
        parser.error(f"-o {args.output}: directory {args.output.parent} does not exist")

    import torch

    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore")  # transformers/peft deprecation chatter would bury the progress lines
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    size = QUICK if args.quick else FULL
    if args.seeds:
        size = dataclasses.replace(size, seeds=tuple(args.seeds))
    if args.fusion_lr is not None:
        if not args.fusion_lr > 0:
            parser.error(f"--fusion-lr must be positive, got {args.fusion_lr}")
        size = dataclasses.replace(size, fusion_lr=args.fusion_lr)
    start = time.perf_counter()
    corpora = build_corpora(size.code_chars, size.doc_chars)
    log(f"corpora: " + ", ".join(f"{k} {len(v)} docs / {sum(map(len, v)):,} chars" for k, v in corpora.items()) +
        f" ({time.perf_counter() - start:.0f}s)")
    with tempfile.TemporaryDirectory() as tmp:
        res = run_quality(size, corpora, Path(tmp))
    res["threads"] = args.threads
    res["command"] = " ".join(["benchmarks/quality_tiny.py", *(argv if argv is not None else sys.argv[1:])])
    res["total_wall_s"] = time.perf_counter() - start
    res["total_cpu_s"] = time.process_time()  # wall time on a shared machine says more about the others
    table = markdown(res)
    write_report(args.output, res, table)
    print(table)
    print(f"total wall time {res['total_wall_s']:.0f}s, CPU time {res['total_cpu_s']:.0f}s, {args.threads} thread(s); "
          f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

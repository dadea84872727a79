"""Training memory and step time: PEFT's SHiRA vs shira-edge's copy-free SHiRA vs LoRA, equal trainable parameters.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/train_memory.py                       # opt-125m, random-init, CPU
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/train_memory.py --model tiny-opt --reps 3 --batch-size 2 --seq-len 32

Peak memory: each method runs in a fresh subprocess. After the base model is loaded, the process's RSS high-water
mark is reset (Linux /proc/self/clear_refs "5"; CUDA: reset_peak_memory_stats) and the current RSS taken as the
baseline; then the adapter is attached and `--mem-steps` optimizer steps run. Reported: high-water mark - baseline,
so the adapter's own state (values, indices, optimizer moments) counts, and the base weights do not.

Step time: one process holds all three models and times single steps round-robin (the order rotates every
round), so the machine's load hits every method alike; medians of `--reps` rounds after one warm-up round.
A step is forward + backward + AdamW step on the same random token batch. Both the wall time and the process CPU
time of each step are recorded: on a machine shared with other jobs the wall time swings with their load, while the
CPU time of a single-threaded step (`--threads 1`, the default) measures the work the method itself does.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

METHODS = ("peft-shira", "shira-edge", "lora")


def build(method: str, args):
    """The adapted model for one method, on a freshly loaded seeded random-init base."""
    from shira_edge.models import load_model

    base, _ = load_model(args.model, random_init=True, seed=0)
    base.to(args.device)
    return attach(method, base, args)


def attach(method: str, base, args):
    from shira_edge.tuner.adapt import adapt

    kind = "lora" if method == "lora" else "shira"
    return adapt(base, method=kind, r=args.r, target_modules=args.targets, mask="rand", mask_seed=0,
                 efficient=method == "shira-edge")


def make_batch(model, args):
    import torch

    vocab = model.get_base_model().config.vocab_size
    gen = torch.Generator().manual_seed(0)
    return torch.randint(4, vocab, (args.batch_size, args.seq_len), generator=gen).to(args.device)


def step(model, optimizer, ids) -> None:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def optimizer_for(model, lr=1e-4):
    import torch

    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)


def _status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child_memory(method: str, args) -> dict:
    """Runs in its own process: peak memory of attaching `method` and training `mem_steps` steps."""
    import torch

    from shira_edge.models import load_model

    torch.manual_seed(0)
    base, _ = load_model(args.model, random_init=True, seed=0)
    base.to(args.device)
    warm_up_autograd(base, args.device)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
            f.write("5")
        baseline = _status_kib("VmRSS") * 1024
    model = attach(method, base, args)
    model.train()
    optimizer = optimizer_for(model)
    ids = make_batch(model, args)
    for _ in range(args.mem_steps):
        step(model, optimizer, ids)
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _status_kib("VmHWM") * 1024
    trainable = model.get_nb_trainable_parameters()[0]
    return {"method": method, "peak_bytes": peak - baseline, "trainable": trainable,
            "kind": "cuda allocated" if cuda else "RSS"}


def warm_up_autograd(base, device: str) -> None:
    """One tiny backward before the baseline, so that autograd's one-time set-up (threads, kernels, the optimizer
    import) is not charged to whichever method happens to run first."""
    import torch
    import torch.optim  # noqa: F401

    flags = [p.requires_grad for p in base.parameters()]
    base.requires_grad_(False)
    ids = torch.full((1, 8), 4, device=device)
    embeds = base.get_input_embeddings()(ids).detach().requires_grad_(True)  # backward through every layer
    base(inputs_embeds=embeds).logits.sum().backward()
    for p, flag in zip(base.parameters(), flags):
        p.requires_grad_(flag)


def measure_memory(args) -> dict[str, dict]:
    results = {}
    for method in METHODS:
        cmd = [sys.executable, __file__, "--child", method, *forwarded(args)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"memory run for {method} failed:\n{out.stderr[-3000:]}")
        results[method] = json.loads(out.stdout.strip().splitlines()[-1])
    return results


def measure_time(args) -> dict[str, dict[str, list[float]]]:
    import torch

    runs = {}
    for method in METHODS:
        torch.manual_seed(0)
        model = build(method, args)
        model.train()
        runs[method] = (model, optimizer_for(model), make_batch(model, args))
    times = {m: {"wall": [], "cpu": []} for m in METHODS}
    for round_ in range(args.reps + 1):
        order = METHODS[round_ % 3:] + METHODS[:round_ % 3]
        for method in order:
            model, optimizer, ids = runs[method]
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start, start_cpu = time.perf_counter(), time.process_time()
            step(model, optimizer, ids)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            if round_ > 0:  # round 0 warms up allocator and kernels
                times[method]["wall"].append(time.perf_counter() - start)
                times[method]["cpu"].append(time.process_time() - start_cpu)
    return times


def forwarded(args) -> list[str]:
    return ["--model", args.model, "--r", str(args.r), "--targets", ",".join(args.targets),
            "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--mem-steps", str(args.mem_steps),
            "--device", args.device, "--threads", str(args.threads)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="opt-125m")
    parser.add_argument("--r", type=int, default=32)
    parser.add_argument("--targets", default="q_proj,v_proj")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5, help="timed rounds (after one warm-up round)")
    parser.add_argument("--mem-steps", type=int, default=2, help="optimizer steps in each memory run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier CPU-time comparisons)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.targets = [t for t in args.targets.split(",") if t]
    import torch

    torch.set_num_threads(args.threads)

    if args.child:
        print(json.dumps(child_memory(args.child, args)))
        return

    memory = measure_memory(args)
    times = measure_time(args)

    lora_mem = memory["lora"]["peak_bytes"]
    lora_wall, lora_cpu = (statistics.median(times["lora"][k]) for k in ("wall", "cpu"))
    rows = []
    for method in METHODS:
        wall, cpu = (statistics.median(times[method][k]) for k in ("wall", "cpu"))
        rows.append({"method": method, "trainable": memory[method]["trainable"],
                     "peak_mib": memory[method]["peak_bytes"] / 2**20,
                     "peak_vs_lora": memory[method]["peak_bytes"] / lora_mem,
                     "cpu_s_median": cpu, "cpu_vs_lora": cpu / lora_cpu,
                     "wall_s_median": wall, "wall_vs_lora": wall / lora_wall,
                     "cpu_s_all": [round(t, 4) for t in times[method]["cpu"]],
                     "wall_s_all": [round(t, 4) for t in times[method]["wall"]]})
    setup = (f"{args.model} random-init, {args.device}, targets {','.join(args.targets)}, r={args.r}, "
             f"batch {args.batch_size} x {args.seq_len} tokens, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads; memory: {memory['lora']['kind']} high-water mark above the "
             f"loaded base model over {args.mem_steps} steps, fresh process per method; time: median of "
             f"{args.reps} interleaved steps")
    setup = setup.replace(f"{torch.get_num_threads()} threads", f"{args.threads} thread(s)")
    print(setup)
    print("| method | trainable params | peak memory (MiB) | vs LoRA | step CPU time (s) | vs LoRA "
          "| step wall time (s) | vs LoRA |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['method']} | {row['trainable']:,} | {row['peak_mib']:.1f} | {row['peak_vs_lora']:.2f}x "
              f"| {row['cpu_s_median']:.3f} | {row['cpu_vs_lora']:.2f}x "
              f"| {row['wall_s_median']:.3f} | {row['wall_vs_lora']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"setup": setup, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()

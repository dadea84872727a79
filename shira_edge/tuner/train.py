"""Train a SHiRA (or LoRA baseline) adapter on a text file and write a PEFT adapter directory.

    >>> from shira_edge.tuner.train import train_adapter
    >>> result = train_adapter("tiny-opt", "notes.txt", "adapter/", mask="snip", r=4, steps=20)  # doctest: +SKIP
    >>> result.eval_loss, result.trainable, result.out_dir                                     # doctest: +SKIP

The same call runs unchanged under `torchrun --nproc_per_node N` or `accelerate launch`: each process trains on
its share of every batch, gradients are averaged by DistributedDataParallel (gloo on CPU, nccl on GPU), and only
rank 0 writes. The adapter directory is PEFT's own (`PeftModel.from_pretrained` loads it) plus `shira_edge.json`,
the sidecar that `shira-edge pack` reads to rebuild the base model.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from shira_edge.data import load_blocks, load_tokenizer, read_texts
from shira_edge.models import ModelInfo, ModelNotAvailable, load_model
from shira_edge.pack import SIDECAR

from .layer import EfficientShiraLinear, to_peft
from .masks import NEEDS_GRADIENTS, gradient_scores
from .adapt import DEFAULT_TARGETS, TunerInputError, adapt, check_rank, check_request, find_targets


@dataclass
class TrainResult:
    out_dir: Path | None        # None when out_dir=None was passed (nothing written)
    sidecar: dict[str, Any]     # what shira_edge.json holds
    eval_loss: float            # mean token loss on the held-out blocks
    trainable: int              # trainable adapter parameters
    density: float              # trainable / entries of the targeted weights
    peak_memory_bytes: int      # max over ranks: RSS high-water mark on CPU, max_memory_allocated on GPU
    peak_memory_kind: str       # "RSS" or "cuda allocated"
    tokens_per_s: float         # training tokens per second, all ranks together
    steps: int
    world_size: int
    model: Any = field(default=None, repr=False)   # the trained PeftModel, in PEFT's own layer state

    def summary(self) -> str:
        where = f" | wrote {self.out_dir}" if self.out_dir else ""
        ranks = f", max over {self.world_size} ranks" if self.world_size > 1 else ""
        return (f"eval loss {self.eval_loss:.4f} (held out) | trainable {self.trainable:,} params | "
                f"density {self.density:.2%} of targeted weights | peak memory "
                f"{self.peak_memory_bytes / 2**20:.1f} MiB ({self.peak_memory_kind}{ranks}){where}")


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    started_here: bool = False

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist
            dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
        return tensor

    def broadcast(self, tensor: torch.Tensor) -> None:
        if self.world > 1:
            import torch.distributed as dist
            dist.broadcast(tensor, src=0)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier()


def init_distributed(device: str | None = None) -> Dist:
    """Join the process group that torchrun / accelerate launch describe in the environment (if any)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    dev = torch.device(f"cuda:{local_rank}" if cuda and world > 1 else ("cuda" if cuda else "cpu"))
    if cuda:
        torch.cuda.set_device(dev)
    started = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
        started = True
    return Dist(rank, world, dev, started)


class BatchStream:
    """Step s, rank k gets rows [s*B*W + k*B, ... + B) of an endless sequence of seeded permutations of the
    training blocks, so every rank sees a different share and an epoch is n_blocks / (B*W) steps."""

    def __init__(self, blocks: torch.Tensor, batch_size: int, dist: Dist, seed: int):
        self.blocks, self.batch_size, self.dist, self.seed = blocks, batch_size, dist, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(len(self.blocks),
                                                 generator=torch.Generator().manual_seed(self.seed + epoch))}
        return self._perms[epoch]

    def batch(self, step: int) -> torch.Tensor:
        start = (step * self.dist.world + self.dist.rank) * self.batch_size
        rows = [self._perm(p // len(self.blocks))[p % len(self.blocks)]
                for p in range(start, start + self.batch_size)]
        return self.blocks[torch.stack(rows)].to(self.dist.device)


def peak_memory(dist: Dist) -> tuple[int, str]:
    if dist.device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(dist.device), "cuda allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "RSS"  # Linux: KiB
    return int(dist.all_reduce(torch.tensor([peak], dtype=torch.float64), "max").item()), kind


@torch.no_grad()
def evaluate_loss(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8, dist: Dist | None = None) -> float:
    """Mean token loss of a causal LM over `blocks` (equal-length rows); sharded over ranks when distributed."""
    dist = dist or Dist(device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    mine = blocks[dist.rank::dist.world]
    for start in range(0, len(mine), batch_size):
        ids = mine[start:start + batch_size].to(dist.device)
        loss = model(input_ids=ids, labels=ids).loss
        total += torch.tensor([loss.item() * len(ids), len(ids)], dtype=torch.float64)
    model.train(was_training)
    total = dist.all_reduce(total)
    return float(total[0] / total[1])


def _fail_early(out_dir, force, steps, epochs, lr, batch_size, seq_len) -> None:
    if steps is not None and epochs is not None:
        raise TunerInputError("--steps", "give --steps or --epochs, not both")
    for flag, value in (("--steps", steps), ("--epochs", epochs), ("--batch-size", batch_size)):
        if value is not None and value <= 0:
            raise TunerInputError(flag, f"{flag} must be positive, got {value}")
    if not lr > 0:
        raise TunerInputError("--lr", f"--lr must be positive, got {lr}")
    if seq_len < 2:
        raise TunerInputError("--seq-len", f"--seq-len must be at least 2, got {seq_len}")
    if out_dir is not None and Path(out_dir).exists() and not force:
        raise TunerInputError("-o", f"output directory {out_dir} already exists; pass --force to replace it")


def train_adapter(model: str, data: str | Path, out_dir: str | Path | None, *, method: str = "shira",
                  mask: str = "rand", r: int = 32, target_modules: Sequence[str] = DEFAULT_TARGETS,
                  steps: int | None = None, epochs: float | None = None, lr: float = 1e-3, batch_size: int = 8,
                  seq_len: int = 128, seed: int = 0, random_init: bool = False, eval_fraction: float = 0.1,
                  calib_batches: int = 4, lora_alpha: float | None = None, efficient: bool = True,
                  force: bool = False, progress: bool = True, device: str | None = None) -> TrainResult:
    """Train one adapter and (rank 0) write it to `out_dir`. Without steps or epochs: one epoch.

    Bad input raises shira_edge.data.DataError or TunerInputError (with the CLI `.flag`) before training.
    `seed` seeds the mask, the data split and order, and a random-init base model. `efficient=False` trains
    with PEFT's own SHiRA forward (for comparisons).
    """
    _fail_early(out_dir, force, steps, epochs, lr, batch_size, seq_len)
    check_request(method, mask)
    texts = read_texts(data)
    try:
        base, info = load_model(model, random_init=random_init, seed=seed)
    except ModelNotAvailable as exc:
        raise TunerInputError("--model", str(exc)) from None
    max_pos = getattr(base.config, "max_position_embeddings", None)
    if max_pos is not None and seq_len > max_pos:
        raise TunerInputError("--seq-len", f"--seq-len {seq_len} exceeds the model's {max_pos} positions")
    tokenizer = load_tokenizer(info.source, base.config.vocab_size)
    train_blocks, eval_blocks = load_blocks(data, tokenizer, seq_len, eval_fraction, seed, texts=texts)
    targets = find_targets(base, target_modules)
    if method == "shira":
        check_rank(targets, r)

    dist = init_distributed(device)
    try:
        return _train(base, info, tokenizer.name, train_blocks, eval_blocks, targets, dist, out_dir=out_dir,
                      method=method, mask=mask, r=r, target_modules=list(target_modules), steps=steps,
                      epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, calib_batches=calib_batches,
                      lora_alpha=lora_alpha, efficient=efficient, force=force, progress=progress)
    finally:
        if dist.started_here:
            import torch.distributed as torch_dist
            torch_dist.destroy_process_group()


def _train(base, info: ModelInfo, tokenizer_name, train_blocks, eval_blocks, targets, dist: Dist, *, out_dir,
           method, mask, r, target_modules, steps, epochs, lr, batch_size, seed, calib_batches, lora_alpha,
           efficient, force, progress) -> TrainResult:
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    base.to(dist.device)
    stream = BatchStream(train_blocks, batch_size, dist, seed)
    if steps is None:
        steps = math.ceil((epochs or 1) * len(train_blocks) / (batch_size * dist.world))

    grads = None
    if method == "shira" and mask in NEEDS_GRADIENTS:
        grads = gradient_scores(base, targets, (stream.batch(i) for i in range(calib_batches)),
                                all_reduce=dist.all_reduce)
    peft_model = adapt(base, method=method, r=r, target_modules=target_modules, mask=mask, mask_seed=seed,
                       grads=grads, lora_alpha=lora_alpha, efficient=efficient)
    del grads
    _same_indices_everywhere(peft_model, dist)
    trainable, _ = peft_model.get_nb_trainable_parameters()
    targeted = sum(layer.weight.numel() for layer in targets.values())

    net = peft_model
    if dist.world > 1:
        net = nn.parallel.DistributedDataParallel(
            peft_model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    net.train()
    tokens_per_step = batch_size * dist.world * train_blocks.shape[1]
    bar = tqdm(total=steps, desc=f"train {method}" + (f"/{mask}" if method == "shira" else ""), unit="step",
               disable=not progress or dist.rank != 0, file=sys.stderr, dynamic_ncols=True)
    start = time.perf_counter()
    for step in range(steps):
        ids = stream.batch(step)
        loss = net(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tokens_per_step * (step + 1) / elapsed:,.0f}")
        bar.update()
    bar.close()
    tokens_per_s = tokens_per_step * steps / (time.perf_counter() - start)

    eval_loss = evaluate_loss(peft_model, eval_blocks, batch_size, dist)
    peak, peak_kind = peak_memory(dist)
    to_peft(peft_model)
    sidecar = {
        "base_model": info.to_json(),
        "method": method,
        "mask": mask if method == "shira" else None,
        "mask_seed": seed,
        "r": r,
        "target_modules": target_modules,
        "tokenizer": tokenizer_name,
        "steps": steps,
        "eval_loss": eval_loss,
    }
    written = None
    if out_dir is not None:
        if dist.rank == 0:
            written = save_adapter(peft_model, sidecar, out_dir, force=force)
        dist.barrier()
        written = Path(out_dir).expanduser().resolve()
    return TrainResult(written, sidecar, eval_loss, trainable, trainable / targeted, peak, peak_kind,
                       tokens_per_s, steps, dist.world, peft_model)


def _same_indices_everywhere(peft_model: nn.Module, dist: Dist) -> None:
    # Masks are built on every rank from the same data, but DDP only syncs parameters: make rank 0's
    # indices the indices, so float noise in gradient scores can never split the ranks.
    for module in peft_model.modules():
        if isinstance(module, EfficientShiraLinear):
            for crow, col in module.shira_pattern.values():
                dist.broadcast(crow)
                dist.broadcast(col)
        elif hasattr(module, "shira_indices"):
            for indices in module.shira_indices.values():
                dist.broadcast(indices)


def save_adapter(peft_model, sidecar: dict[str, Any], out_dir: str | Path, force: bool = False) -> Path:
    """PEFT's save_pretrained plus shira_edge.json, written to a temp dir beside `out_dir` and renamed."""
    from shira_edge.exporters.common import ExportError, staged_output_dir

    to_peft(peft_model)
    peft_model.peft_config["default"].base_model_name_or_path = sidecar["base_model"]["name"]
    try:
        with staged_output_dir(out_dir, force=force) as tmp:
            peft_model.save_pretrained(tmp, save_embedding_layers=False)  # only adapter weights
            (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n")
    except ExportError as exc:
        raise TunerInputError("-o", str(exc)) from None
    return Path(out_dir).expanduser().resolve()

"""Adapters trained on prompt -> answer examples (loss on the answer only), and greedy exact-match scoring.

Exact match here is what greedy decoding would produce: an example is correct when, fed the prompt and the answer
so far, the model's argmax at every answer position is the next answer token, the end-of-turn token included.
That is the same as "greedy generation from the prompt yields exactly the answer and stops", computed in one
teacher-forced pass instead of a decode loop (the device path in `device` checks it through `generate`).

One base model object serves every run: `Lab` keeps the pristine target weights, trains an adapter on the model,
merges it to read its dense delta, and puts the pristine weights back.
"""

from __future__ import annotations

import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from shira_edge.quality import split_label
from shira_edge.tuner.layer import to_peft
from shira_edge.tuner.masks import NEEDS_GRADIENTS, gradient_scores
from shira_edge.tuner.adapt import adapt, adapter_config, find_targets

IGNORE = -100


def collate(examples, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask, labels = the answer tokens (IGNORE elsewhere)."""
    width = max(len(e.prompt) + len(e.answer) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(examples):
        n, full = len(e.prompt), list(e.prompt) + list(e.answer)
        ids[i, :len(full)] = torch.tensor(full)
        labels[i, n:len(full)] = torch.tensor(e.answer)
        mask[i, :len(full)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def shared_prefix(input_ids: torch.Tensor, first_answer: int) -> int:
    """How many leading tokens every row of the batch has in common, short of the last prompt token before the
    earliest answer (whose logit predicts that answer's first token, so it must be computed per row)."""
    head = input_ids[:, :max(first_answer - 1, 0)]
    differs = (head != head[:1]).any(0)
    return int(differs.int().argmax()) if bool(differs.any()) else head.shape[1]


def answer_logits(model, batch, share_prefix: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, targets) at the positions that predict answer tokens. Two savings, both exact in arithmetic:
    - the LM head runs only from the shortest prompt's last token on (the head is a fifth of a small model's
      compute, and most of every sequence is prompt);
    - the prefix every row shares (the chat template's system turn and the task's instruction: 29 of SmolLM2's
      ~41 tokens) runs once, batch 1, and its keys and values are repeated for the rows. Gradients flow through
      it as through the full batch, so training and scoring compute the same function with a third of the tokens.
    """
    labels, ids, mask = batch["labels"], batch["input_ids"], batch["attention_mask"]
    width = labels.shape[1]
    first = int((labels != IGNORE).int().argmax(1).min())       # earliest answer position in the batch
    keep = width - first + 1
    shared = shared_prefix(ids, first) if share_prefix and ids.shape[0] > 1 else 0
    if shared:
        cache = model(input_ids=ids[:1, :shared], use_cache=True).cache
        cache.batch_repeat_interleave(ids.shape[0])
        logits = model(input_ids=ids[:, shared:], attention_mask=mask, cache=cache, use_cache=True,
                       logits_to_keep=keep).logits
    else:
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
    targets = torch.cat([labels[:, width - keep + 1:], torch.full_like(labels[:, :1], IGNORE)], dim=1)
    return logits, targets


@dataclass
class Score:
    loss: float                      # mean cross-entropy per answer token (nats)
    exact: float                     # fraction of examples the model answers exactly (greedy)
    correct: list[bool] = field(repr=False)
    first: list[int] = field(repr=False)   # per example: the greedy first answer token (argmax after the prompt)

    def to_json(self) -> dict[str, Any]:
        return {"loss": self.loss, "exact": self.exact, "n": len(self.correct)}


@torch.no_grad()
def score(model, examples, pad_id: int, batch_size: int = 32) -> Score:
    """Answer loss and greedy exact match of `model` on `examples` (batched by length, order kept)."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt) + len(examples[i].answer))
    correct, first = [False] * len(examples), [0] * len(examples)
    total, count = 0.0, 0
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        logits, targets = answer_logits(model, collate([examples[i] for i in rows], pad_id))
        answer = targets != IGNORE
        total += float(F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                                       reduction="sum"))
        count += int(answer.sum())
        pred = logits.argmax(-1)
        hit = ((pred == targets) | ~answer).all(1)
        starts = answer.int().argmax(1)
        for j, i in enumerate(rows):
            correct[i], first[i] = bool(hit[j]), int(pred[j, starts[j]])
    model.train(was_training)
    return Score(total / max(count, 1), sum(correct) / max(len(correct), 1), correct, first)


@dataclass
class Trained:
    label: str
    peft_model: Any            # PEFT's own layer state (SHiRA: to_peft done), ready for save_pretrained
    trainable: int
    targeted: int              # entries of the targeted weights
    steps: int
    train_s: float             # wall seconds of the optimizer loop (without mask calibration)
    train_cpu_s: float
    step_s: list[float]        # wall seconds per step


class Lab:
    """A base model, its pristine target weights, and adapters trained and evaluated on it one after another."""

    def __init__(self, model, targets: Sequence[str], pad_id: int):
        self.model, self.pad_id = model, pad_id
        self.target_names = list(targets)
        self.layers = find_targets(model, targets)
        self.pristine = {name: layer.weight.detach().clone() for name, layer in self.layers.items()}
        self.targeted = sum(w.numel() for w in self.pristine.values())

    def batches(self, examples, batch_size: int, seed: int):
        """Endless seeded epochs of `examples`, batch_size at a time."""
        rng, epoch = random.Random(seed), []
        while True:
            if len(epoch) < batch_size:
                order = list(range(len(examples)))
                rng.shuffle(order)
                epoch += order
            rows, epoch = epoch[:batch_size], epoch[batch_size:]
            yield collate([examples[i] for i in rows], self.pad_id)

    def train(self, label: str, examples, *, r: int, steps: int, batch_size: int, lr: float, seed: int,
              calib_batches: int = 4) -> Trained:
        method, mask = split_label(label)
        torch.manual_seed(seed)
        stream = self.batches(examples, batch_size, seed)
        if method == "dora":
            from peft import get_peft_model

            config = adapter_config("lora", r=r, target_modules=self.target_names)
            config.use_dora = True
            peft_model = get_peft_model(self.model, config)
        else:
            grads = None
            if mask in NEEDS_GRADIENTS:   # answer-loss gradients of the task's own data, as training sees it
                grads = gradient_scores(self.model, self.layers, [next(stream) for _ in range(calib_batches)])
            peft_model = adapt(self.model, method=method, r=r, target_modules=self.target_names,
                               mask=mask or "rand", mask_seed=seed, grads=grads)
        trainable, _ = peft_model.get_nb_trainable_parameters()
        optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr,
                                      weight_decay=0.0)
        peft_model.train()
        step_s = []
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            t = time.perf_counter()
            logits, targets = answer_logits(peft_model, next(stream))
            F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step_s.append(time.perf_counter() - t)
        train_s, train_cpu = time.perf_counter() - start, time.process_time() - cpu
        peft_model.eval()
        to_peft(peft_model)
        return Trained(label, peft_model, trainable, self.targeted, steps, train_s, train_cpu, step_s)

    def release(self, trained: Trained) -> dict[str, torch.Tensor]:
        """Merge the adapter to read its dense delta (what fusing adds), then give the base back untouched."""
        merged = trained.peft_model.merge_and_unload()
        if merged is not self.model:
            raise RuntimeError("PEFT returned a different model object from merge_and_unload")
        with torch.no_grad():
            deltas = {name: self.layers[name].weight.detach() - w for name, w in self.pristine.items()}
            deltas = {name: d.clone() for name, d in deltas.items()}
            self.restore()
        self.layers = find_targets(self.model, self.target_names)
        return deltas

    @torch.no_grad()
    def restore(self) -> None:
        for name, weight in self.pristine.items():
            self.model.get_submodule(name).weight.copy_(weight)

    @contextmanager
    def applied(self, deltas: Sequence[dict[str, torch.Tensor]], scales: Sequence[float]):
        """The base with the deltas added at their scales (fusion), restored afterwards."""
        with torch.no_grad():
            for delta, s in zip(deltas, scales):
                for name, d in delta.items():
                    self.model.get_submodule(name).weight.add_(d, alpha=s)
        try:
            yield self.model
        finally:
            self.restore()

    def score(self, examples, deltas=(), scales=None, batch_size: int = 32) -> Score:
        scales = [1.0] * len(deltas) if scales is None else scales
        with self.applied(deltas, scales) as model:
            return score(model, examples, self.pad_id, batch_size)

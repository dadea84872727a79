"""The quality study's shared-prefix forward (shira_edge/quality/sft.py `answer_logits`) against the full-batch
forward on SmolLM2-135M: seconds per training step and per 100 scored validation entries, and the validation loss
each gives, alternating the two modes.

    nice .venv/bin/python benchmarks/quality_shared_prefix.py --threads 2      # needs dict-freedict-eng-fra
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run as a script from a checkout
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=8, help="training steps per adapter and mode (default 8)")
    p.add_argument("--rounds", type=int, default=2, help="alternations of the two modes (default 2)")
    args = p.parse_args()

    import torch
    from transformers import AutoTokenizer

    from shira_edge.models import load_model
    from shira_edge.quality import sft
    from shira_edge.quality.study import ALL_TARGETS
    from shira_edge.quality.tasks import encode_examples, load_task, split_pairs

    torch.set_num_threads(args.threads)
    model, info = load_model("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(info.source)
    pairs = split_pairs(load_task("translate"), 0, 100, 200)
    train, val = encode_examples(pairs["train"][:400], "translate", tok), encode_examples(pairs["val"], "translate", tok)
    lab = sft.Lab(model, ALL_TARGETS, tok.eos_token_id)
    full = sft.answer_logits
    for _ in range(args.rounds):
        for share in (True, False):
            sft.answer_logits = lambda m, b, share_prefix=share: full(m, b, share_prefix)
            for label in ("lora", "shira-wm"):
                trained = lab.train(label, train, r=4, steps=args.steps, batch_size=8, lr=1e-3, seed=0)
                deltas = lab.release(trained)
                t = time.perf_counter()
                score = lab.score(val, [deltas], batch_size=32)
                print(f"shared prefix {'on ' if share else 'off'} {label:<9} step median "
                      f"{statistics.median(trained.step_s[1:]):.3f} s, 100 val entries scored in "
                      f"{time.perf_counter() - t:.1f} s, val loss {score.loss:.4f}", flush=True)
    sft.answer_logits = full
    return 0


if __name__ == "__main__":
    sys.exit(main())

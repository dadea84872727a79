"""The device side of the study: SHiRA adapters (saved as PEFT dirs and packed by `pack_adapter`, as a user would)
switched in an export with `Runtime.switch([a, b], scales)`, and scored by exact match through `generate`.

Prompts are encoded by the export's own tokenizer and chat template (as `generate_text` does), and must equal the
ids the host trained on; a mismatch is an error, not a silent change of task.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from shira_edge.quality.tasks import TASKS, Example, Pair


class DeviceScorer:
    """Exact match through the runtime: switch, then greedy `generate` from each prompt."""

    def __init__(self, export_dir: str | Path, threads: int = 1):
        from shira_edge.runtime import Runtime

        self.runtime = Runtime(export_dir, threads=threads)
        tok = self.runtime.tokenizer
        eos = self.runtime.manifest["io"].get("eos_token_id")   # validated by the manifest boundary
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if tok.eos_token_id is not None and tok.eos_token_id not in eos:
            eos.append(tok.eos_token_id)   # as generate_text stops
        self.eos = eos

    def check_prompts(self, task: str, pairs: Sequence[Pair], examples: Sequence[Example]) -> None:
        """The export's tokenizer and chat template give the same prompt ids as the host's tokenizer."""
        tok = self.runtime.tokenizer
        for pair, example in zip(pairs, examples):
            text = tok.apply_chat_template([{"role": "user", "content": TASKS[task][2].format(pair.source)}],
                                           add_generation_prompt=True)
            ids = tuple(tok.encode(text, add_special_tokens=False))
            if ids != example.prompt:
                raise RuntimeError(f"{self.runtime.dir}: the export's tokenizer encodes the prompt for "
                                   f"{pair.source!r} differently from the model's ({len(ids)} vs "
                                   f"{len(example.prompt)} ids); export the model the study trains on")

    def exact(self, examples: Sequence[Example], adapters=None, scales=None) -> tuple[list[bool], list[int]]:
        """Per example: does greedy generation with `adapters` live give exactly the answer, then stop? And the
        first generated token (compared with the host's, it checks the device path even where nothing is right)."""
        import numpy as np

        self.runtime.switch(adapters, scales)
        by_length: dict[int, list[int]] = {}
        for i, e in enumerate(examples):
            by_length.setdefault(len(e.prompt), []).append(i)
        correct, first = [False] * len(examples), [0] * len(examples)
        for length, rows in by_length.items():   # equal-length prompts batch without padding
            new = max(len(examples[i].answer) for i in rows)
            out = self.runtime.generate(np.array([examples[i].prompt for i in rows]), max_new_tokens=new,
                                        eos_token_id=self.eos)
            for row, i in zip(out, rows):
                answer = examples[i].answer
                correct[i] = tuple(int(t) for t in row[length:length + len(answer)]) == answer
                first[i] = int(row[length])
        return correct, first

    def close(self) -> None:
        self.runtime.switch(None)
        self.runtime.close()

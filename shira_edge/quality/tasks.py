"""The two tasks of the quality study, from Debian's dictionary packages, as chat-format examples.

- translate: "Translate to French: X" -> the first French translation of X (dict-freedict-eng-fra, GPL-2+);
- acronym: "Expand the acronym: X" -> X's expansion (dict-vera, GFDL-1.1+), only acronyms with one expansion, so
  that the answer is well defined.

Nothing is installed here: missing data raises TaskDataMissing naming the package to install.

    >>> from shira_edge.quality.dictd import Entry
    >>> translation_pairs([Entry("ace", "ace /eis/\\n1. as, atout\\n2. champion\\n")])
    [Pair(source='ace', target='as')]
    >>> acronym_pairs([Entry("dns", "DNS\\n       Domain Name System (Internet, RFC 1034/1035, DNS)\\n")])
    [Pair(source='DNS', target='Domain Name System')]
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from shira_edge.quality.dictd import read_dictd

DICTD_DIR = Path("/usr/share/dictd")
# task -> (dictd name, Debian package, prompt)
TASKS = {
    "translate": ("freedict-eng-fra", "dict-freedict-eng-fra", "Translate to French: {}"),
    "acronym": ("vera", "dict-vera", "Expand the acronym: {}"),
}


class TaskDataMissing(FileNotFoundError):
    """A task's dictionary is not installed; the message says which package provides it."""


@dataclass(frozen=True)
class Pair:
    source: str
    target: str


@dataclass(frozen=True)
class Example:
    """One chat-format example as token ids: the prompt (chat template up to the assistant's turn) and the answer
    the model should produce greedily, ending in the end-of-turn token."""

    prompt: tuple[int, ...]
    answer: tuple[int, ...]


def _first_item(text: str) -> str:
    return re.split(r"[,;]", text, maxsplit=1)[0].strip()


def translation_pairs(entries) -> list[Pair]:
    """English headword (as written in the entry, without its pronunciation) -> its first French translation."""
    pairs, seen = [], set()
    for entry in entries:
        lines = [line.strip() for line in entry.body.splitlines() if line.strip()]
        if len(lines) < 2:
            continue
        source = re.sub(r"\s*/[^/]*/\s*$", "", lines[0]).strip()
        target = _first_item(re.sub(r"^\d+\.\s*", "", lines[1]))
        if source and target and source.lower() not in seen:
            seen.add(source.lower())
            pairs.append(Pair(source, target))
    return pairs


def acronym_pairs(entries) -> list[Pair]:
    """Acronym -> expansion, without V.E.R.A.'s "[vendor]" prefix or its trailing "(context)", "[topic]" or
    ', "alternative spelling"'."""
    found: dict[str, list[str]] = {}
    for entry in entries:
        lines = [line.strip() for line in entry.body.splitlines()]
        if not lines or not lines[0]:
            continue
        text = re.sub(r"^\[[^\]]*\]\s*", "", " ".join(line for line in lines[1:] if line))  # "[Dolby] ..."
        expansion = re.split(r" \(| \[|, \"", text, maxsplit=1)[0].strip().rstrip(".,;")
        if expansion:
            found.setdefault(lines[0], []).append(expansion)
    return [Pair(acronym, expansions[0]) for acronym, expansions in found.items() if len(set(expansions)) == 1]


def load_task(task: str, data_dir: str | Path = DICTD_DIR) -> list[Pair]:
    """The task's (source, target) pairs from the dictd files in `data_dir`."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    name, package, _ = TASKS[task]
    index = Path(data_dir) / f"{name}.index"
    if not index.is_file():
        raise TaskDataMissing(f"task {task!r} needs {index}, which is not there: install it with "
                              f"`apt-get install {package}` (nothing is installed for you), or point --data-dir "
                              f"at a directory holding {name}.index and {name}.dict(.dz)")
    entries = read_dictd(index)
    return translation_pairs(entries) if task == "translate" else acronym_pairs(entries)


def split_pairs(pairs: list[Pair], seed: int, n_val: int, n_test: int) -> dict[str, list[Pair]]:
    """train / val / test by entry: a seeded shuffle, the first n_val for val, the next n_test for test."""
    if len(pairs) < n_val + n_test + 1:
        raise ValueError(f"{len(pairs)} entries are too few for {n_val} val + {n_test} test + at least 1 train")
    order = list(pairs)
    random.Random(seed).shuffle(order)
    return {"val": order[:n_val], "test": order[n_val:n_val + n_test], "train": order[n_val + n_test:]}


def encode_examples(pairs: list[Pair], task: str, tokenizer) -> list[Example]:
    """Pairs as chat-format token ids through the model's own chat template (a transformers tokenizer)."""
    prompt = TASKS[task][2]
    eos = tokenizer.eos_token_id
    out = []
    for pair in pairs:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt.format(pair.source)}],
                                             add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        answer = tokenizer(pair.target, add_special_tokens=False)["input_ids"] + [eos]
        out.append(Example(tuple(ids), tuple(answer)))
    return out

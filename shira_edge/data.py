"""Training text: read a .txt (one document per line) or .jsonl (a "text" field per line) file, tokenize it, and
cut it into equal blocks of token ids with a held-out split.

Tokenization uses the model's own tokenizer when one can be loaded (from the model directory or the local
Hugging Face cache). Otherwise, e.g. a random-init model offline, it falls back to a byte-level tokenizer:

    id = byte + 4 for every UTF-8 byte of the text; each document is wrapped as <bos> ... <eos>,
    with OPT's special ids kept: pad = 1, bos = 2, eos = 2 (ids 0 and 3 are unused). Needs vocab_size >= 260.

The name of the tokenizer used ("byte-level" or "hf:<name or path>") is returned so that adapters record it.

    >>> from shira_edge.data import ByteTokenizer
    >>> ByteTokenizer().encode("hi")
    [2, 108, 109, 2]
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

SUFFIXES = (".txt", ".jsonl")


class DataError(ValueError):
    """Bad training data; the message names the file (and line) and says what to do."""


def read_texts(path: str | Path) -> list[str]:
    """The documents of a .txt or .jsonl file; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist (or is not a file)")
    if path.suffix not in SUFFIXES:
        raise DataError(f"data file {path} must end in .txt (one document per line) or .jsonl (a 'text' field)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"data file {path} is not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    texts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f"{path}:{number}: expected an object with a string 'text' field")
            line = record["text"]
            if not line.strip():
                continue
        texts.append(line)
    if not texts:
        raise DataError(f"data file {path} is empty: it has no non-blank documents")
    return texts


class ByteTokenizer:
    """UTF-8 bytes shifted past OPT's special ids (see the module docstring)."""

    name = "byte-level"
    offset, pad_id, bos_id, eos_id = 4, 1, 2, 2
    vocab_needed = 256 + 4

    def encode(self, text: str) -> list[int]:
        return [self.bos_id, *(b + self.offset for b in text.encode("utf-8")), self.eos_id]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i - self.offset for i in ids if self.offset <= i < self.offset + 256).decode("utf-8", "replace")


@dataclass
class Tokenizer:
    name: str                               # "byte-level" or "hf:<name or path>"
    encode: Callable[[str], list[int]]      # one document -> ids, with bos/eos


def load_tokenizer(source: str | None, vocab_size: int) -> Tokenizer:
    """The model's tokenizer from `source` (directory or hub id, local files only), else the byte-level one."""
    if source:
        try:
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(source, local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError):
            hf = None
        if hf is not None and not hf("a", add_special_tokens=False)["input_ids"]:
            hf = None  # transformers 5 builds an empty tokenizer for a model dir without tokenizer files
        if hf is not None:
            def encode(text: str) -> list[int]:
                ids = hf(text)["input_ids"]
                return ids + [hf.eos_token_id] if hf.eos_token_id is not None and ids[-1:] != [hf.eos_token_id] else ids
            return Tokenizer(f"hf:{source}", encode)
    byte = ByteTokenizer()
    if vocab_size < byte.vocab_needed:
        raise DataError(f"no tokenizer found for the model and its vocabulary ({vocab_size}) is too small for "
                        f"the byte-level fallback (needs {byte.vocab_needed}); use a model directory with a tokenizer")
    return Tokenizer(byte.name, byte.encode)


def make_blocks(texts: Sequence[str], encode: Callable[[str], list[int]], seq_len: int) -> torch.Tensor:
    """Concatenate the tokenized documents and cut the stream into (num_blocks, seq_len); the tail is dropped."""
    ids = [i for text in texts for i in encode(text)]
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def split_blocks(blocks: torch.Tensor, eval_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle blocks with `seed`; the last max(1, fraction) of them are the held-out split."""
    if len(blocks) < 2:
        raise DataError(f"the data makes {len(blocks)} block(s) of --seq-len tokens; at least 2 are needed "
                        f"(one to train on, one held out): lower --seq-len or add text")
    n_eval = min(len(blocks) - 1, max(1, round(len(blocks) * eval_fraction)))
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))
    return blocks[order[:-n_eval]], blocks[order[-n_eval:]]


def load_blocks(path: str | Path, tokenizer: Tokenizer, seq_len: int, eval_fraction: float = 0.1,
                seed: int = 0, texts: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) blocks of token ids from a data file (`texts`: its documents, if already read);
    errors name the file."""
    if seq_len < 2:
        raise DataError(f"--seq-len must be at least 2, got {seq_len}")
    blocks = make_blocks(read_texts(path) if texts is None else texts, tokenizer.encode, seq_len)
    try:
        return split_blocks(blocks, eval_fraction, seed)
    except DataError as exc:
        raise DataError(f"data file {path}: {exc}") from None

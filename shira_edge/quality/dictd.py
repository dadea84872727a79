"""Read a dictd dictionary: the `NAME.index` / `NAME.dict(.dz)` pair that Debian's dict-* packages install under
/usr/share/dictd.

Each index line is `headword TAB offset TAB length`, offset and length in dictd's base64 digits (A-Z a-z 0-9 + /,
most significant first) into the uncompressed .dict text. A .dict.dz is dictzip, which is gzip with an extra
header field, so Python's gzip reads it. Headwords starting with "00database" / "00-database" are metadata.

    >>> b64_number("BVBC"), b64_number("c/")
    (348226, 1855)
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_VALUE = {c: i for i, c in enumerate(DIGITS)}
MAX_DICT_BYTES = 64 << 20   # the largest Debian dictd text is a few MB; refuse anything absurd


class DictdError(ValueError):
    """A malformed dictd file; the message names the file and line."""


@dataclass(frozen=True)
class Entry:
    headword: str    # as the index has it (dictd lower-cases most)
    body: str        # the definition text, its first line usually the headword as written


def b64_number(digits: str) -> int:
    value = 0
    for c in digits:
        if c not in _VALUE:
            raise ValueError(f"{digits!r} is not a dictd base64 number")
        value = value * 64 + _VALUE[c]
    return value


def dict_file(index: Path) -> Path:
    """The text file beside an index: NAME.dict.dz, else NAME.dict."""
    stem = index.with_suffix("")
    for candidate in (stem.with_suffix(".dict.dz"), stem.with_suffix(".dict")):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{index}: no {stem.name}.dict.dz or {stem.name}.dict beside it")


def read_dictd(index: str | Path) -> list[Entry]:
    """Every non-metadata entry of a dictd dictionary, in index order."""
    index = Path(index)
    path = dict_file(index)
    opener = gzip.open if path.suffix == ".dz" else open
    with opener(path, "rb") as f:
        data = f.read(MAX_DICT_BYTES + 1)
    if len(data) > MAX_DICT_BYTES:
        raise DictdError(f"{path}: more than {MAX_DICT_BYTES >> 20} MiB of text; not a dictd dictionary")
    entries = []
    for number, line in enumerate(index.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        try:
            headword, offset, length = parts[0], b64_number(parts[1]), b64_number(parts[2])
        except (IndexError, ValueError):
            raise DictdError(f"{index}:{number}: expected 'headword<TAB>offset<TAB>length' in base64") from None
        if headword.startswith(("00database", "00-database")):
            continue
        if offset + length > len(data):
            raise DictdError(f"{index}:{number}: entry {headword!r} points past the end of {path}")
        entries.append(Entry(headword, data[offset:offset + length].decode("utf-8", "replace")))
    return entries

"""Pieces every exporter shares: timed stages on the console and an output directory that appears whole or not at all."""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path


class ExportError(RuntimeError):
    """An export failed; the message says what and what to do. OUT_DIR is left as it was."""


class Stages:
    """Prints one line per stage with the time it took: `[trace] 3.21 s`. Timings are kept for the manifest."""

    def __init__(self, stream=None, quiet: bool = False):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str, what: str = ""):
        if not self.quiet:
            print(f"[{name}] {what}".rstrip() + " ...", file=self.stream, flush=True)
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 3)
        if not self.quiet:
            print(f"[{name}] done in {self.seconds[name]:.2f} s", file=self.stream, flush=True)


@contextmanager
def staged_output_dir(out_dir: str | Path, force: bool = False):
    """Yield a temp dir beside `out_dir`; on success it replaces `out_dir`, on any error it is removed.

    Building beside the target (same filesystem) makes the final rename atomic, so a failed or interrupted export
    never leaves a partial OUT_DIR.
    """
    out_dir = Path(out_dir).expanduser().resolve()
    if out_dir.exists() and not force:
        raise ExportError(f"{out_dir} already exists; pass --force to replace it")
    parent = out_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=parent))
    except OSError as exc:
        raise ExportError(f"cannot write to {parent}: {exc.strerror or exc}; choose a writable -o path") from None
    try:
        yield tmp
        if out_dir.exists():
            old = parent / f".{out_dir.name}.old-{int(time.time())}"
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

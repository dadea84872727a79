"""Pieces every exporter shares: timed stages on the console and an output directory that appears whole or not at all."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from ..runtime.orphans import remove_orphans, temp_prefix


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


def usual_permissions(path: Path) -> None:
    """chmod a file or dir to what a plain open()/mkdir() would have given it under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


@contextmanager
def sigterm_unwinds():
    """While inside, SIGTERM (`timeout`, docker stop, a cancelled job) raises SystemExit(143) in the main thread, as
    Ctrl-C raises KeyboardInterrupt, so every `finally` and `except BaseException` clean-up runs before the process
    ends. A second SIGTERM during that clean-up is ignored. Off the main thread, or where the program installed
    its own SIGTERM handler, nothing changes."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def unwind(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, unwind)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextmanager
def staged_output_dir(out_dir: str | Path, force: bool = False):
    """Yield a temp dir beside `out_dir`; on success it replaces `out_dir`, on any error it is removed.

    Building beside the target (same filesystem) makes the final rename atomic, so a failed or interrupted export
    never leaves a partial OUT_DIR. Interrupts unwind through here: Ctrl-C, and SIGTERM (sigterm_unwinds). SIGKILL
    cannot be caught; the temp dir it leaves carries the pid that made it and is removed by the next export to the
    same OUT_DIR once that process is gone (runtime/orphans.py).
    """
    out_dir = Path(out_dir).expanduser().resolve()
    if out_dir.exists() and not force:
        raise ExportError(f"{out_dir} already exists; pass --force to replace it")
    parent = out_dir.parent
    with sigterm_unwinds():
        try:
            parent.mkdir(parents=True, exist_ok=True)
            remove_orphans(parent, out_dir.name)
            tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out_dir.name), dir=parent))
            usual_permissions(tmp)  # mkdtemp makes it private (0700); OUT_DIR should get what mkdir would give
        except OSError as exc:
            raise ExportError(f"cannot write to {parent}: {exc.strerror or exc}; choose a writable -o path") from None
        try:
            yield tmp
            if out_dir.exists():
                old = Path(tempfile.mkdtemp(prefix=temp_prefix(out_dir.name, "old"), dir=parent))
                out_dir.rename(old / "out")
                try:
                    tmp.rename(out_dir)
                except BaseException:
                    (old / "out").rename(out_dir)   # put the old OUT_DIR back before reporting the failure
                    old.rmdir()
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def manifest_head(backend: str, info, weights: list[dict]) -> dict:
    """The manifest keys every exporter writes first: format, backend, model record, weights and their fingerprint."""
    from ..runtime.fingerprint import base_fingerprint
    from ..runtime.manifest import FORMAT_VERSION

    return {"format_version": FORMAT_VERSION, "backend": backend, "model": info.to_json(),
            "fingerprint": base_fingerprint({w["name"]: (w["shape"], w["digest"]) for w in weights}),
            "weights": weights}


def tied_weights(model) -> dict[str, str]:
    """Parameter name -> the earlier name it shares storage with (lm_head.weight -> ...embed_tokens.weight when the
    model ties them). The one tied-weight rule every exporter and the adapter fusion use."""
    first, tied = {}, {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owner = first.setdefault(param.data_ptr(), name)
        if owner != name:
            tied[name] = owner
    return tied


def resolve_targets(model, targets) -> list[str]:
    """`--targets`: module paths or weight names -> PyTorch weight names. Each must be an untied nn.Linear, because
    only those are kept as one plain, patchable tensor by every exporter; anything else is refused by name."""
    from torch import nn

    modules = dict(model.named_modules())
    tied = tied_weights(model)
    owners = {}
    for name, owner in tied.items():
        owners.setdefault(owner, []).append(name)
    resolved = []
    for target in targets:
        path = target[: -len(".weight")] if target.endswith(".weight") else target
        module = modules.get(path)
        if module is None:
            raise ExportError(f"--targets {target!r}: no such module in the model; Linear modules are e.g. "
                              f"{next(n for n, m in modules.items() if isinstance(m, nn.Linear))}")
        if not isinstance(module, nn.Linear):
            raise ExportError(f"--targets {target!r}: is a {type(module).__name__}, not an nn.Linear; SHiRA adapters "
                              f"patch Linear weights only (attention projections, MLP projections)")
        name = f"{path}.weight"
        others = [tied[name]] if name in tied else owners.get(name, [])
        if others:
            raise ExportError(f"--targets {target!r}: its weight is tied to {others[0]}; patching it would change "
                              f"both, so it is not patchable")
        resolved.append(name)
    return resolved


def apply_targets(weights: list[dict], targets, backend: str) -> None:
    """`--targets` (weight names from resolve_targets) on one backend's weight map: each must have come out
    patchable in this backend (e.g. not stored once with identical bytes), then the others are marked not."""
    if not targets:
        return
    by_name = {w["name"]: w for w in weights}
    for t in targets:
        w = by_name.get(t) or by_name.get(f"{t}.weight")
        if w is None:
            raise ExportError(f"--targets {t!r}: not an nn.Linear weight of this model; Linear weights are e.g. "
                              f"{weights[0]['name']}")
        if not w["patchable"]:
            raise ExportError(f"--targets {t!r}: not patchable in the {backend} export ({w['note']})")
    restrict_patchable(weights, [t if t in by_name else f"{t}.weight" for t in targets])


def restrict_patchable(weights: list[dict], targets: list[str]) -> None:
    """Keep manifest entries named in `targets` patchable and mark the others not (the runtime refuses them)."""
    chosen = set(targets)
    for entry in weights:
        if entry["patchable"] and entry["name"] not in chosen:
            entry["patchable"], entry["note"] = False, "not in --targets at export"

"""Small native libraries built on first use from the project's own sources in native/, cached per user.

A library is named by a hash of its source, its build command and whatever else it depends on (`key`), so a changed
source or another executorch builds anew. It lives under $SHIRA_EDGE_CACHE (default $XDG_CACHE_HOME/shira-edge,
else ~/.cache/shira-edge) in native/. The build holds a file lock and writes a temporary file that is renamed into
place, so concurrent first uses (pytest workers, two apps) build once and never load a half-written library.

    >>> path = library_path(NATIVE_DIR / "scatter.c", "libshira_scatter", lambda out: ["gcc", "-o", str(out)])
    >>> path.parent.name, path.name.startswith("libshira_scatter-")
    ('native', True)
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
from pathlib import Path
from typing import Callable

NATIVE_DIR = Path(__file__).resolve().parent.parent / "native"


class NativeUnavailable(RuntimeError):
    """A native library cannot be built or loaded here; the message says why and what to do."""


def cache_dir() -> Path:
    root = os.environ.get("SHIRA_EDGE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") \
        / "shira-edge"
    return Path(root) / "native"


def library_path(source: Path, stem: str, command: Callable[[Path], list[str]], key: str = "") -> Path:
    """Where the library built from `source` by `command(out)` lives (built or not)."""
    if not source.is_file():
        raise NativeUnavailable(f"{source}: native source missing (an install without native/?); install shira-edge "
                                f"from its source tree")
    digest = hashlib.sha256(source.read_bytes())
    digest.update(key.encode())
    digest.update(" ".join(command(Path("OUT"))).encode())
    return cache_dir() / f"{stem}-{digest.hexdigest()[:16]}.so"


def build(path: Path, source: Path, command: Callable[[Path], list[str]]) -> Path:
    """Build the library at `path` unless it is there; one builder at a time, atomically."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock_file = open(path.with_suffix(".lock"), "w")
    except OSError as exc:   # e.g. an unwritable cache directory
        raise NativeUnavailable(f"{path.parent}: cannot build {source.name} there ({exc}); set SHIRA_EDGE_CACHE to "
                                f"a writable directory") from None
    with lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        if path.is_file():
            return path
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        cmd = command(tmp)
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise NativeUnavailable(f"building {source.name} failed: {exc}; install {cmd[0]} (apt-get install "
                                    f"{'g++' if cmd[0] == 'g++' else 'gcc'})") from None
        if done.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise NativeUnavailable(f"building {source.name} with {cmd[0]} failed:\n{done.stderr[-2000:]}")
        os.replace(tmp, path)
    return path

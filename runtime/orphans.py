"""Temp outputs that a killed process leaves behind, and how the next writer removes them.

Every atomic writer (a .shira, an export dir, an adapter dir) builds beside its target under a name that says who
made it, `.NAME.tmp-PID-XXXX` (and `.NAME.old-PID-XXXX` for an OUT_DIR being replaced). SIGKILL or a power loss
cannot be caught, so such a name can outlive its process; the next write to the same target removes every one
whose PID no longer runs. An orphaned "old" entry is removed only once the target exists again: without the
target it may hold the only copy. PIDs are this host's: a directory shared by several hosts keeps their temps.

    >>> temp_prefix("out.shira").startswith(".out.shira.tmp-")
    True
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def temp_prefix(name: str, kind: str = "tmp") -> str:
    return f".{name}.{kind}-{os.getpid()}-"


def remove_orphans(parent: Path, name: str) -> None:
    """Remove `.NAME.tmp-PID-*` / `.NAME.old-PID-*` entries of `parent` whose process is gone."""
    try:
        entries = list(Path(parent).iterdir())
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(f".{name}."):
            continue
        kind, _, rest = entry.name[len(name) + 2:].partition("-")
        pid = rest.partition("-")[0]
        if kind not in ("tmp", "old") or not pid.isdigit() or _alive(int(pid)):
            continue
        if kind == "old" and not (Path(parent) / name).exists():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's process
        return True
    return True

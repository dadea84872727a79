"""Where the packed-in-place caches live: on a tmpfs (a disk-backed file would make every switch pay write-back,
150-190 ms measured on opt-125m, and write weights to disk). $SHIRA_EDGE_PACK_DIR names one; else /dev/shm.

    >>> line = "36 25 0:32 / /dev/shm rw,relatime shared:7 - tmpfs tmpfs rw,size=4096k,huge=within_size"
    >>> mount_of(Path("/dev/shm/x"), [line])
    ('tmpfs', {'rw': '', 'size': '4096k', 'huge': 'within_size'})

The mount's options matter beyond its type: a tmpfs mounted `huge=always` backs its files' mappings with 2 MiB
pages, which changed ExecuTorch decode speed by -10% to +19% depending on the model (docs/runtime.md); a memfd
follows the kernel-wide /sys/kernel/mm/transparent_hugepage/shmem_enabled instead.
"""

from __future__ import annotations

import os
from pathlib import Path

PACK_DIR_ENV = "SHIRA_EDGE_PACK_DIR"   # a tmpfs directory to use instead of /dev/shm
TMPFS = ("tmpfs", "ramfs")


class NoTmpfs(RuntimeError):
    """No writable tmpfs directory for a pack cache."""


def mount_of(path: Path, mountinfo=None) -> tuple[str | None, dict]:
    """(file system type, super-block options) of the mount holding `path`, from /proc/self/mountinfo lines."""
    best, found = "", (None, {})
    try:
        if mountinfo is None:
            with open("/proc/self/mountinfo") as f:
                mountinfo = f.read().splitlines()
        for line in mountinfo:
            parts = line.split()
            sep = parts.index("-")
            mount, fstype, options = parts[4], parts[sep + 1], parts[sep + 3] if len(parts) > sep + 3 else ""
            if (str(path) + "/").startswith(mount.rstrip("/") + "/") and len(mount) >= len(best):
                opts = dict((o.split("=", 1) + [""])[:2] for o in options.split(",") if o)
                best, found = mount, (fstype, opts)
    except (OSError, ValueError, IndexError):
        return None, {}
    return found


def pack_dir(default: str | None = "/dev/shm") -> Path | None:
    """A writable tmpfs directory for a pack cache: $SHIRA_EDGE_PACK_DIR, else `default`; anything else is refused.
    None when neither is given."""
    if not os.environ.get(PACK_DIR_ENV) and default is None:
        return None
    for candidate in (os.environ.get(PACK_DIR_ENV), default):
        if not candidate:
            continue
        path = Path(candidate)
        if path.is_dir() and os.access(path, os.W_OK) and mount_of(path.resolve())[0] in TMPFS:
            return path
    raise NoTmpfs(f"no writable tmpfs for the pack cache (/dev/shm, or set {PACK_DIR_ENV} to a tmpfs directory)")

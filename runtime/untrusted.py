"""Two habits for input that comes from outside (files, export dirs, adapters): open only regular files, without
ever blocking, and escape every piece of text from a file before it reaches a terminal.

    >>> printable("evil\\x1b[2J\\r\\u202ename")
    'evil\\\\x1b[2J\\\\x0d\\\\u202ename'
    >>> read_regular("/dev/zero", "adapter")        # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    NotRegularFile: adapter /dev/zero: not a regular file (a character device); pass a file

`open()` on a FIFO blocks until a writer appears, and a device file can be endless; both are refused here before a
byte is read: the file is opened with O_NONBLOCK (which never blocks, whatever the file is) and fstat'ed.
"""

from __future__ import annotations

import os
import stat

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


class NotRegularFile(OSError):
    """The path exists but is not a regular file (a FIFO, device, socket or directory)."""


def printable(text) -> str:
    """`text` with every non-printable character (controls, ESC, bidi overrides) and backslash escaped."""
    out = []
    for ch in str(text):
        if ch == "\\":
            out.append("\\\\")
        elif ch.isprintable():
            out.append(ch)
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out)


def open_regular(path, what: str = "file") -> int:
    """An O_RDONLY fd of `path`, which must be a regular file; never blocks. The caller closes the fd.

    Raises FileNotFoundError / PermissionError (OSError) as open() does, NotRegularFile for anything else."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _KINDS if test(mode)), "not a plain file")
            raise NotRegularFile(f"{what} {printable(os.fspath(path))}: not a regular file ({kind}); pass a file")
        # Reads of a regular file never return EAGAIN, but clear the flag so later users see an ordinary fd.
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path, what: str = "file", limit: int | None = None) -> bytes:
    """The whole content of a regular file (see open_regular); ValueError if it is over `limit` bytes."""
    fd = open_regular(path, what)
    try:
        size = os.fstat(fd).st_size
        if limit is not None and size > limit:
            raise ValueError(f"{what} {printable(os.fspath(path))}: {size} bytes, over the {limit}-byte limit")
        chunks, total = [], 0
        while True:   # to the real end: the size may have changed since fstat
            chunk = os.read(fd, max(size - total, 1 << 16))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if limit is not None and total > limit:
                raise ValueError(f"{what} {printable(os.fspath(path))}: over the {limit}-byte limit")
        return b"".join(chunks)
    finally:
        os.close(fd)

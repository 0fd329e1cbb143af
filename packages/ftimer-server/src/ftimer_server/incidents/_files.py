"""Opening a file the daemon is only willing to read or lock if it is a regular file:
never waiting on a FIFO put at its path, never following a symlink unless told to, and
saying what is there instead."""

from __future__ import annotations

import os
import stat
from typing import Tuple

__all__ = [
    "O_CLOEXEC",
    "O_DIRECTORY",
    "O_NOFOLLOW",
    "NotARegularFile",
    "file_kind",
    "open_regular",
]

#: Open flags, 0 where the platform has none.
O_CLOEXEC: int = getattr(os, "O_CLOEXEC", 0)
O_NOFOLLOW: int = getattr(os, "O_NOFOLLOW", 0)
O_DIRECTORY: int = getattr(os, "O_DIRECTORY", 0)


class NotARegularFile(Exception):
    """Something other than a regular file is at a path.

    Attributes:
        kind: what is there, for a message ("a directory", "a FIFO", ...).
    """

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


def file_kind(mode: int) -> str:
    """What a file of ``st_mode`` ``mode`` is, for a message: "a directory", "a FIFO", ..."""
    kinds = (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISLNK, "a symlink"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    )
    return next((kind for test, kind in kinds if test(mode)), "not a regular file")


def open_regular(
    path: str, flags: int = os.O_RDONLY, *, follow: bool = False, mode: int = 0o600
) -> Tuple[int, os.stat_result]:
    """Open ``path`` with ``flags`` (and ``mode``, if they create it) and return the
    descriptor and its ``fstat()``, if it is a regular file.

    It is opened non-blocking (a FIFO there would wait for a writer: it is refused
    instead), close-on-exec, and, unless ``follow``, without following a symlink.

    Raises:
        NotARegularFile: something else is there.
        OSError: it cannot be opened (``ELOOP``: a symlink, not followed).
        ValueError: ``path`` holds a NUL byte.
    """
    flags |= os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    fd = os.open(path, flags, mode)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotARegularFile(file_kind(st.st_mode))
    except BaseException:
        os.close(fd)
        raise
    return fd, st

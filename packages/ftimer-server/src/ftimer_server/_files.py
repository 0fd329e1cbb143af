"""Files the server, the daemon and the incidents share the care of: opening a file it
is only willing to read or lock if it is a regular file (never waiting on a FIFO put at
its path, never following a symlink unless told to, and saying what is there instead);
a directory only if it is this user's and nobody else may write it (the FIFO's, the
incidents'); telling whether a path still names a file; replacing a file atomically;
setting an unusable one aside; reading a kernel tunable (``/proc/sys``)."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import tempfile
import time
from typing import Iterable, List, Optional, Tuple, Union

__all__ = [
    "O_CLOEXEC",
    "O_DIRECTORY",
    "O_NOFOLLOW",
    "NotAPrivateDirectory",
    "NotARegularFile",
    "aside_path",
    "directories_above",
    "file_kind",
    "open_private_dir",
    "open_regular",
    "read_sysctl",
    "remove_leftovers",
    "still_at",
    "unsafe_above",
    "write_atomically",
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


class NotAPrivateDirectory(Exception):
    """A path is not a directory of this user's that nobody else may write.

    Attributes:
        kind: what is there instead of a directory ("a symlink", "not a directory"), or
            "" where a directory is.
        owner: the uid of the directory's owner if that is not this user, else None.
        mode: the directory's permission bits (0 where ``kind`` is given).
        errno: the open's (``ELOOP``, ``ENOTDIR``) where ``kind`` is given, else ``EPERM``.
    """

    def __init__(
        self, kind: str = "", owner: Optional[int] = None, mode: int = 0, error: int = errno.EPERM
    ) -> None:
        if kind:
            why = f"is {kind}"
        elif owner is not None:
            why = f"is owned by uid {owner}, not by this server's user ({os.geteuid()})"
        else:
            why = f"is writable by others (mode {mode:04o}); make it 0700 (chmod go-w)"
        super().__init__(why)  # what the path is, as a predicate: "is a symlink"
        self.kind = kind
        self.owner = owner
        self.mode = mode
        self.errno = error


def open_private_dir(path: str) -> Tuple[int, os.stat_result]:
    """Open the directory ``path``, never through a symlink, and return its descriptor
    and ``fstat()``, if this user owns it and nobody else may write it. It is judged on
    the descriptor, so the directory judged is the one opened.

    Raises:
        NotAPrivateDirectory: it is not a directory, or another user's, or writable by
            its group or by others.
        OSError: it cannot be opened.
    """
    try:
        fd = os.open(path, os.O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            kind = "a symlink" if os.path.islink(path) else "not a directory"
            raise NotAPrivateDirectory(kind, error=e.errno) from None
        raise
    try:
        st = os.fstat(fd)
        owner = st.st_uid if st.st_uid != os.geteuid() else None
        if owner is not None or st.st_mode & 0o022:
            raise NotAPrivateDirectory(owner=owner, mode=stat.S_IMODE(st.st_mode))
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def directories_above(directory: str) -> List[str]:
    """The directories above ``directory``, as written and as resolved (a symlink on
    the way is judged where it lies and where it leads)."""
    out: List[str] = []
    for start in (directory, os.path.realpath(directory)):
        current = start
        while (parent := os.path.dirname(current)) != current:
            if parent not in out:
                out.append(parent)
            current = parent
    return out


def unsafe_above(directory: str) -> Optional[str]:
    """Which directory above ``directory`` (as written, or where it leads) lets a user
    other than root and this one rename what is in it, and so swap ``directory`` for
    another (a symlink to anywhere), and why: ``"<parent> <why>"``; or None. Safe: owned
    by root or this user, and writable by nobody else, or sticky (as /tmp: only an
    entry's owner renames it)."""
    for parent in directories_above(directory):
        try:
            st = os.stat(parent)
        except OSError:
            continue  # cannot be looked at: the directory below it was just opened
        mode = stat.S_IMODE(st.st_mode)
        if st.st_uid not in (0, os.geteuid()):
            return f"{parent} is owned by uid {st.st_uid}, who may rename"
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            return f"{parent} (mode {mode:04o}) lets users other than its owner rename"
    return None


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


def is_same_file(path: str, st: os.stat_result) -> bool:
    """Whether ``path`` is still the file ``st`` describes (False if it is gone)."""
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


def still_at(path: str, st: os.stat_result) -> bool:
    """Whether ``path`` still names the file ``st`` describes: False if it was removed, or
    replaced by another file, its directory too, or cannot be looked up (``ENOTDIR``,
    ``EACCES``, ``ELOOP``, a dead network mount). Never raises."""
    try:
        return is_same_file(path, st)
    except OSError:
        return False


def unlink_if_same(path: str, st: os.stat_result) -> None:
    """Remove ``path`` if it is still the file ``st`` describes: never what another
    process put in its place. Errors are ignored (it is cleanup)."""
    with contextlib.suppress(OSError):
        if is_same_file(path, st):
            os.unlink(path)


def aside_path(path: str) -> str:
    """Where to set an unusable ``path`` aside: ``<path>.corrupt-<unix time>``, with
    ``.<n>`` after it if that is taken (one set aside in the same second is kept too)."""
    aside = base = f"{path}.corrupt-{int(time.time())}"
    n = 0
    while os.path.lexists(aside):
        n += 1
        aside = f"{base}.{n}"
    return aside


#: How the temporary file of `write_atomically` ends.
_TMP_SUFFIX = ".tmp"


def write_atomically(path: str, data: Union[bytes, Iterable[Union[bytes, memoryview]]]) -> None:
    """Replace ``path`` with ``data`` (bytes, or pieces written as they come): a 0600
    temporary file beside it, fsync, rename.

    The temporary file is ``.<name>.<random>.tmp``; one a process killed during the
    write leaves behind is for `remove_leftovers` to remove.

    Raises:
        OSError: from any step; the temporary file is removed.
    """
    directory, name = os.path.split(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=_TMP_SUFFIX, dir=directory)
    try:
        with open(fd, "wb") as f:
            # Each write releases the GIL: a piece made lazily lets other threads run.
            for piece in (data,) if isinstance(data, bytes) else data:
                f.write(piece)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def remove_leftovers(path: str) -> List[str]:
    """Remove the temporary files `write_atomically` left beside ``path`` (a process
    killed during a write leaves its ``.<name>.<random>.tmp``); return their paths.

    Only regular files of this user's named exactly so are removed (the random part is
    ``tempfile``'s: letters, digits and ``_``, so no other file's temporary name
    matches). Call it only where no write to ``path`` can be in progress (under the lock
    of the file's one writer), in a directory nobody else may write. Errors are ignored
    (it is cleanup).
    """
    directory, name = os.path.split(os.path.abspath(path))
    pattern = re.compile(re.escape(f".{name}.") + r"[a-z0-9_]+" + re.escape(_TMP_SUFFIX))
    removed = []
    with contextlib.suppress(OSError), os.scandir(directory) as entries:
        for entry in entries:
            if not pattern.fullmatch(entry.name):
                continue
            with contextlib.suppress(OSError):
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid():
                    os.unlink(entry.path)
                    removed.append(entry.path)
    return removed


def read_sysctl(path: str, default: int) -> int:
    """The number in the file at ``path`` (a sysctl: the pipe's largest size, a socket's
    queue length), or ``default`` where it cannot be read (not Linux, no /proc) or holds
    no number. Never raises."""
    try:
        with open(path, encoding="ascii") as f:
            return int(f.read())
    except (OSError, ValueError):
        return default

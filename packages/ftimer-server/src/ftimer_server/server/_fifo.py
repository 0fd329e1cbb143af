"""Creating and opening the server's FIFO safely.

The FIFO path is often in a shared directory, so the path is treated as hostile: a
symlink is never followed, anything but a FIFO is refused rather than removed (torch
removes whatever is there), and a FIFO owned by another user is refused (its owner could
read or redirect the stream).

The server's own FIFO is either reused or replaced. Reused (a server that restored
timers): writers that hold it open keep writing to the new server and lose nothing.
Replaced (a server that starts empty): a new FIFO is made under a temporary name, given
the mode and group, and renamed over the path, so the path always holds a FIFO and a
writer still holding the old one gets EPIPE at its next write; the ftimer client then
reopens the path and re-sends its armed timers, which the empty server would otherwise
never learn about.

Opening: the read end is opened non-blocking (``open()`` of a FIFO blocks until a writer
appears otherwise), and the server also holds a write end of its own: with a writer
always present, writers that close never turn into an end-of-file spin, and the server
can write ``Sync`` markers into its own stream.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import grp
import logging
import os
import select
import stat
import sys
import termios
from typing import Any, Dict, Optional, Tuple, Union

from ftimer_protocol import default_fifo_path
from ftimer_server._files import (
    O_CLOEXEC,
    O_NOFOLLOW,
    NotAPrivateDirectory,
    NotARegularFile,
    file_kind,
    is_same_file,
    open_private_dir,
    open_regular,
    read_sysctl,
    still_at,
    unlink_if_same,
)

__all__ = [
    "Fifo",
    "FifoBusy",
    "FifoError",
    "check_mode",
    "lock_fifo",
    "manages_parent",
    "open_fifo",
    "parent_mode",
    "resolve_group",
    "unlock_fifo",
    "unreachable_by_writers",
]

#: fcntl F_SETPIPE_SZ / F_GETPIPE_SZ (Linux); Python >= 3.10 names them.
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031 if sys.platform.startswith("linux") else None)
F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032 if sys.platform.startswith("linux") else None)
_PIPE_MAX_SIZE = "/proc/sys/fs/pipe-max-size"
#: The pipe's unit of room (``Fifo.full``), and its size where it cannot be asked.
_PAGE = 4096
_DEFAULT_PIPE_SIZE = 1 << 16
_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | O_NOFOLLOW | O_CLOEXEC

logger = logging.getLogger("ftimer_server")


class FifoError(OSError):
    """The FIFO path cannot be used safely (or at all); nothing was changed there.

    An ``OSError``, as torch's server raises for a path it cannot use: ``errno`` is the
    failed system call's (``ENOENT`` for a missing directory), or None for a refusal;
    ``filename`` is ``path`` and ``strerror`` is ``reason``.

    Attributes:
        path: the offending path (the FIFO or its directory).
        reason: what is wrong with it.
    """

    def __init__(self, path: str, reason: str, errno: Optional[int] = None) -> None:
        super().__init__(errno, reason, path)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"

    def __reduce__(self) -> Tuple[Any, ...]:
        # OSError's would make it again from (errno, strerror): fields in wrong places.
        return type(self), (self.path, self.reason, self.errno)


class FifoBusy(FifoError):
    """Another ftimer server (the daemon, or an embedded ``FileTimerServer``) serves the
    FIFO: it holds the FIFO's lock file.

    Attributes:
        lock_path: the lock file (``<fifo>.lock``).
    """

    def __init__(self, path: str, lock_path: str) -> None:
        super().__init__(
            path, f"another ftimer server is serving this FIFO (it holds the lock file {lock_path})"
        )
        self.lock_path = lock_path

    def __reduce__(self) -> Tuple[Any, ...]:
        return type(self), (self.path, self.lock_path)


class Fifo:
    """An open server FIFO: a non-blocking read end and the server's own write end.

    Attributes:
        path: where it is.
        read_fd: non-blocking read end.
        write_fd: non-blocking write end held by the server.
        created: True if this server created the FIFO (False: reused an existing one).
        replaced: True if it replaced an existing FIFO of this user (``created`` too).
        pipe_size: the pipe's buffer size in bytes (0 where unknown).
    """

    def __init__(
        self, path: str, read_fd: int, write_fd: int, created: bool, replaced: bool = False
    ) -> None:
        self.path = path
        self.read_fd = read_fd
        self.write_fd = write_fd
        self.created = created
        self.replaced = replaced
        self._made = os.fstat(read_fd)
        self._room = select.poll()
        self._room.register(write_fd, select.POLLOUT)
        self.pipe_size = 0

    def pending(self) -> int:
        """Bytes waiting in the pipe now (``FIONREAD``); where that cannot be asked, the
        most it can hold (``pipe_size``, else 1 MiB, Linux's default maximum)."""
        buf = array.array("i", [0])
        try:
            fcntl.ioctl(self.read_fd, termios.FIONREAD, buf, True)
        except OSError:
            return self.pipe_size or 1 << 20
        return buf[0]

    def full(self, pending: int) -> bool:
        """Whether the pipe, holding ``pending`` bytes, makes a writer wait for room.

        A pipe is full when its pages are, not its bytes: a line that does not fit in
        the rest of the last page takes a page of its own, so lines of a little over
        half a page fill a pipe at about half its size. Below that nothing is asked.
        """
        if pending < (self.pipe_size or _DEFAULT_PIPE_SIZE) // 2 - _PAGE:
            return False
        return not self._room.poll(0)  # the server's own write end: POLLOUT if a page is free

    def at_path(self) -> bool:
        """Whether ``path`` still names this FIFO (not if it was removed, or replaced by
        another file, its directory too, or cannot be looked up: writers that open the
        path then do not reach this server)."""
        return still_at(self.path, self._made)

    def close(self, remove: bool = False) -> None:
        """Close both ends; with ``remove``, also unlink the FIFO if this server created it
        and it is still the same file."""
        for fd in (self.read_fd, self.write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.read_fd = self.write_fd = -1
        if remove and self.created:
            unlink_if_same(self.path, self._made)


def open_fifo(
    path: Optional[Union[str, os.PathLike[str]]] = None,
    *,
    mode: int = 0o600,
    group: Optional[Union[int, str]] = None,
    private_parent: Optional[bool] = None,
    pipe_size: Optional[int] = None,
    replace: bool = False,
) -> Fifo:
    """Create (or reuse, or replace) the FIFO at ``path`` and open it for the server.

    Args:
        path: the FIFO; defaults to ``ftimer_protocol.default_fifo_path()``.
        mode: its permissions (applied to a reused FIFO too); 0600 lets only this user
            write; 0620 with ``group`` lets a group of workers write.
        group: a group name or gid to give the FIFO (and a parent it creates).
        private_parent: manage the parent directory: create it if missing, refuse it if
            owned by another user or writable by others, and give it, at every call,
            ``group`` and the mode 0700 with search (x) for the group, or for others,
            where the FIFO lets them write (0710 for a FIFO of 0620), so the FIFO's
            writers can reach it and nobody can list or change it. Defaults to True for
            the default path, False otherwise (then the parent must exist and is left as
            it is).
        pipe_size: the pipe buffer size to ask for; defaults to the largest the system
            allows (``/proc/sys/fs/pipe-max-size``). Ignored where unsupported.
        replace: if the path holds this user's FIFO, atomically put a new one in its
            place (same mode; the requested group, else the old one's) instead of
            reusing it, so writers holding the old one get EPIPE and reconnect. Falls
            back to reusing it (with a warning) when no FIFO can be made beside it.

    Raises:
        FifoError: the path is a symlink, not a FIFO, or a FIFO owned by another user;
            its parent is unsafe or missing, or (managed) cannot be given its group or
            mode; or it cannot be created or opened.
        ValueError: ``mode`` is not permission bits (a whole number from 0 to 0o777).
    """
    check_mode(mode)
    path = os.fspath(path) if path is not None else default_fifo_path()
    gid = resolve_group(group)
    if private_parent is None:
        private_parent = manages_parent(path)
    if private_parent:
        _ensure_private_dir(os.path.dirname(path) or ".", gid, mode)
    read_fd, created, replaced = _open_read_end(path, mode, gid, replace)
    try:
        write_fd = _open_write_end(path, read_fd)
    except BaseException as e:
        if created:
            unlink_if_same(path, os.fstat(read_fd))
        os.close(read_fd)
        if isinstance(e, OSError) and not isinstance(e, FifoError):
            raise FifoError(
                path, f"cannot open the FIFO for writing: {e.strerror}", e.errno
            ) from None
        raise
    fifo = Fifo(path, read_fd, write_fd, created, replaced)
    fifo.pipe_size = _enlarge_pipe(read_fd, pipe_size)
    return fifo


def check_mode(mode: int) -> None:
    """Refuse a FIFO ``mode`` that is no set of permission bits (0 to 0o777).

    Raises:
        ValueError: it is not a whole number in that range (-1 made a setuid FIFO
            everyone may write).
    """
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o777:
        raise ValueError(f"the FIFO's mode must be permission bits, 0 to 0o777, not {mode!r}")


#: The descriptors of the locks this process holds (`lock_fifo`). A forked child closes
#: its copies: a worker an agent forks (multiprocessing's "fork"), or a child of it that
#: outlives it, would otherwise hold the lock after the server stopped, and the agent's
#: next server on the path would find it busy.
#: Each descriptor's file (device, inode): a number is closed only while it still is.
_LOCKS: Dict[int, Tuple[int, int]] = {}


def _drop_locks_in_child() -> None:
    for fd, file in _LOCKS.items():
        with contextlib.suppress(OSError):
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) == file:
                os.close(fd)
    _LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_locks_in_child)


def lock_fifo(fifo: str) -> int:
    """Lock ``<fifo>.lock`` (flock, exclusive, not waiting) and return its descriptor:
    `unlock_fifo`, closing it, or the process's exit releases the lock. Every ftimer
    server takes it before it touches the FIFO (the daemon before anything else), so two
    servers never serve one path: the second would replace the FIFO, and the first read a
    FIFO nobody can reach any more.

    The file is made 0600 if missing and kept: only a server that removes its FIFO on
    stop removes it, under the lock. A lock is kept only if the file locked is still the
    one at the path (else it was removed meanwhile, and the lock is taken again).

    The FIFO's directory, if the server's (`manages_parent`), is made 0700 here if
    missing, as `open_fifo` makes it.

    Raises:
        FifoBusy: another server holds the lock.
        FifoError: ``fifo`` is empty or holds something other than a FIFO; the lock file
            cannot be made or opened, or is not this user's regular file (a symlink is
            never followed).
    """
    # Beside the FIFO and named after it, because the FIFO is what two servers must not
    # share (the sockets and the state file can be given other paths, or none). The
    # server writes that directory anyway, to replace the FIFO and bind its sockets. The
    # default path's directory may not exist yet: it is made here as open_fifo makes it
    # (0700), but its owner, mode and group are checked and set by open_fifo, under the
    # lock, so that a server that loses never changes them.
    _refuse_no_fifo(fifo)  # no lock file beside what is no FIFO (/dev/null.lock, say)
    path = fifo + ".lock"
    directory = os.path.dirname(fifo) or "."
    if manages_parent(fifo):
        _make_dir(directory)
    refused = f"refusing the lock file {path}: it is {{}}"
    for _ in range(3):  # removed by the server that held it, between open and lock
        try:
            # No controlling terminal: a tty put there is refused, not adopted.
            fd, st = open_regular(path, os.O_RDWR | os.O_CREAT | os.O_NOCTTY)
        except NotARegularFile as e:
            raise FifoError(fifo, refused.format(e.kind)) from None
        except OSError as e:
            if e.errno == errno.ENOENT:  # made if missing: its directory is
                raise FifoError(
                    fifo, f"the directory {directory} does not exist", e.errno
                ) from None
            why = f"cannot open the lock file {path}: {e.strerror}"
            if e.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):  # a symlink, dir, socket
                with contextlib.suppress(OSError):
                    why = refused.format(file_kind(os.lstat(path).st_mode))
            raise FifoError(fifo, why, e.errno) from None
        try:
            if st.st_uid != os.geteuid():
                raise FifoError(fifo, refused.format(f"owned by uid {st.st_uid}, not us"))
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise FifoBusy(fifo, path) from None
            if is_same_file(path, st):
                _LOCKS[fd] = (st.st_dev, st.st_ino)
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise FifoError(fifo, f"the lock file {path} keeps being removed")


def unlock_fifo(fifo: str, fd: int, *, remove: bool = False) -> None:
    """Release the lock `lock_fifo` took (its descriptor ``fd``); with ``remove``, also
    remove the lock file first, if it is still the one locked. In a forked child, whose
    copy was closed at the fork (and ``fd`` may be another file's now), it does nothing."""
    if _LOCKS.pop(fd, None) is None:
        return
    if remove:
        unlink_if_same(fifo + ".lock", os.fstat(fd))
    os.close(fd)


def resolve_group(group: Optional[Union[int, str]]) -> Optional[int]:
    """The gid of ``group`` (a name, or a gid given as is), or None for None.

    Raises:
        FifoError: no group has that name.
    """
    if group is None or isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise FifoError(str(group), "no such group") from None


def manages_parent(path: str) -> bool:
    """Whether `open_fifo` manages the directory of ``path`` by default: only for the
    documented default path, whose directory belongs to the server."""
    return path == default_fifo_path()


def parent_mode(mode: int) -> int:
    """The mode of a directory managed for a FIFO of ``mode``: rwx for its owner, and
    search (x) for the group and for others exactly where the FIFO lets them write."""
    return 0o700 | (0o010 if mode & 0o020 else 0) | (0o001 if mode & 0o002 else 0)


def _make_dir(directory: str) -> None:
    """Make ``directory`` 0700 unless it exists.

    Raises:
        FifoError: it cannot be made.
    """
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise FifoError(directory, f"cannot create the directory: {e.strerror}", e.errno) from None


def _ensure_private_dir(directory: str, gid: Optional[int], mode: int) -> None:
    # Owner, type and safety are checked on an open descriptor, and the group and mode
    # set through it, so the directory checked is the one changed. The mode is set at
    # every start: a directory made 0700 by an earlier run without a group would keep
    # the group's workers out of a FIFO they may write (EACCES, or a silent fall-back
    # of their default path to a per-user FIFO nobody reads).
    _make_dir(directory)
    try:
        fd, st = open_private_dir(directory)
    except NotAPrivateDirectory as e:
        raise FifoError(directory, f"the directory {e}", e.errno) from None
    except OSError as e:
        raise FifoError(directory, f"cannot open the directory: {e.strerror}", e.errno) from None
    try:
        if gid is not None and st.st_gid != gid:
            try:
                os.fchown(fd, -1, gid)
            except OSError as e:
                raise FifoError(
                    directory,
                    f"cannot give the directory group {gid} ({e.strerror}); the FIFO's "
                    "group could not reach the FIFO",
                    e.errno,
                ) from None
        wanted = parent_mode(mode)
        if stat.S_IMODE(st.st_mode) != wanted:
            try:
                os.fchmod(fd, wanted)
            except OSError as e:
                raise FifoError(
                    directory, f"cannot make the directory mode {wanted:04o}: {e.strerror}", e.errno
                ) from None
    finally:
        os.close(fd)


def unreachable_by_writers(path: str, mode: int, gid: Optional[int]) -> Optional[str]:
    """Say why the users the FIFO's ``mode`` and group ``gid`` let write ``path`` could not
    reach it, or return None.

    A directory on the way must give them search permission: others through its
    "others" bits, members of ``gid`` through its group bits (when it belongs to
    ``gid``) or its "others" bits. The directory the server manages (`manages_parent`)
    is left out: `open_fifo` gives it the right mode.
    Directories with an access control list are not judged (their mode bits do not say
    who may enter). Nothing is changed.
    """
    others = bool(mode & 0o002)
    group = gid is not None and bool(mode & 0o020)
    if not (others or group):
        return None
    directory = os.path.dirname(os.path.abspath(path))
    if manages_parent(path):
        directory = os.path.dirname(directory)
    while True:
        try:
            st = os.stat(directory)
        except OSError:
            return None  # missing or unreadable: open_fifo says what is wrong with it
        bits = stat.S_IMODE(st.st_mode)
        if not _has_acl(directory):
            if others and not bits & 0o001:
                who = "other users"
            elif group and not (bits & 0o001 or (st.st_gid == gid and bits & 0o010)):
                who = f"members of group {gid}"
            else:
                who = ""
            if who:
                return (
                    f"{who} may write the FIFO (mode {mode:04o}) but cannot reach it: "
                    f"directory {directory} (mode {bits:04o}, group {st.st_gid}) does not "
                    "let them in; give them search permission there (for a group: chgrp "
                    "and chmod g+x) or put the FIFO elsewhere"
                )
        parent = os.path.dirname(directory)
        if parent == directory:
            return None
        directory = parent


def _has_acl(directory: str) -> bool:
    try:
        return "system.posix_acl_access" in os.listxattr(directory)
    except (OSError, AttributeError):  # no xattr support (or not Linux): mode bits rule
        return False


def _refuse_no_fifo(path: str, st: Optional[os.stat_result] = None) -> None:
    """Refuse an empty path, or one that holds something other than a FIFO (``st``: its
    ``lstat()``, if read already).

    Raises:
        FifoError: it does.
    """
    if not path:
        raise FifoError(path, "refusing an empty path (expected a FIFO)")
    if st is None:
        try:
            st = os.lstat(path)
        except OSError:  # nothing there (yet), or it cannot be told: open_fifo says
            return
    if not stat.S_ISFIFO(st.st_mode):
        raise FifoError(path, f"refusing {file_kind(st.st_mode)} (expected a FIFO)")


def _open_read_end(
    path: str, mode: int, gid: Optional[int], replace: bool
) -> Tuple[int, bool, bool]:
    """Return (read end, created, replaced)."""
    for _ in range(3):  # the path may vanish between mkfifo and open: retry a little
        created = False
        try:
            os.mkfifo(path, 0o600)
            created = True
        except FileExistsError:
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            _refuse_no_fifo(path, st)
            if replace:
                if st.st_uid != os.geteuid():
                    raise FifoError(
                        path, f"refusing a FIFO owned by uid {st.st_uid}, not us"
                    ) from None
                new_fd = _replace(path, st, mode, gid)
                if new_fd is not None:
                    return new_fd, True, True
        except OSError as e:
            why = e.strerror
            if e.errno == errno.ENOENT:
                why = f"the directory {os.path.dirname(path) or '.'} does not exist"
            raise FifoError(path, f"cannot create the FIFO: {why}", e.errno) from None
        try:
            fd = os.open(path, _READ_FLAGS)
        except FileNotFoundError:
            continue
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise FifoError(path, "refusing a symlink (expected a FIFO)", e.errno) from None
            raise FifoError(path, f"cannot open the FIFO: {e.strerror}", e.errno) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISFIFO(st.st_mode):
                raise FifoError(path, f"refusing {file_kind(st.st_mode)} (expected a FIFO)")
            if st.st_uid != os.geteuid():
                raise FifoError(path, f"refusing a FIFO owned by uid {st.st_uid}, not us")
            what = ""
            try:
                if gid is not None and st.st_gid != gid:
                    what = f"give the FIFO group {gid}"
                    os.fchown(fd, -1, gid)
                if stat.S_IMODE(st.st_mode) != mode:
                    what = f"make the FIFO mode {mode:04o}"
                    os.fchmod(fd, mode)
            except OSError as e:
                raise FifoError(path, f"cannot {what}: {e.strerror}", e.errno) from None
        except BaseException:
            if created:  # ours, made by this call: not left behind
                unlink_if_same(path, os.fstat(fd))
            os.close(fd)
            raise
        return fd, created, False
    raise FifoError(path, "the FIFO keeps disappearing")


def _replace(path: str, old: os.stat_result, mode: int, gid: Optional[int]) -> Optional[int]:
    """Put a new FIFO in place of ``old`` (this user's FIFO at ``path``); return its read
    end, or ``None`` (with a warning) if no FIFO can be made beside it.

    Made and opened under a temporary name, given its mode and group, then renamed over
    the path: the path never lacks a FIFO and never holds one with the wrong permissions.

    Raises:
        FifoError: the path changed meanwhile, or the requested group cannot be given.
    """
    directory, name = os.path.split(path)
    # os.urandom, not secrets: importing secrets loads OpenSSL, megabytes of RSS.
    tmp = os.path.join(directory, f".{name}.{os.urandom(6).hex()}.tmp")
    try:
        os.mkfifo(tmp, 0o600)
    except OSError as e:
        logger.warning(
            "cannot make a new FIFO beside %s (%s): reusing it; writers that hold it "
            "open will not notice the restart",
            path,
            e.strerror,
        )
        return None
    fd = -1
    try:
        fd = os.open(tmp, _READ_FLAGS)
        target_gid = old.st_gid if gid is None else gid
        if os.fstat(fd).st_gid != target_gid:
            try:
                os.fchown(fd, -1, target_gid)
            except PermissionError as e:
                if gid is not None:
                    raise FifoError(
                        path, f"cannot give it group {gid}: {e.strerror}", e.errno
                    ) from None
                # Not in the old FIFO's group: it gets ours, as a new FIFO would.
        os.fchmod(fd, mode)
        now = os.lstat(path)  # what was checked is what gets replaced
        if (now.st_dev, now.st_ino) != (old.st_dev, old.st_ino):
            raise FifoError(path, "the FIFO was replaced while it was being opened")
        os.rename(tmp, path)
    except BaseException as e:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, FifoError):
            raise FifoError(path, f"cannot replace the FIFO: {e.strerror}", e.errno) from None
        raise
    return fd


def _open_write_end(path: str, read_fd: int) -> int:
    # Reopen the very FIFO we hold through /proc, not the path, which might have been
    # replaced in between. Non-blocking: it never blocks, since we are a reader.
    flags = os.O_WRONLY | os.O_NONBLOCK | O_CLOEXEC
    proc_path = f"/proc/self/fd/{read_fd}"
    if os.path.exists(proc_path):
        return os.open(proc_path, flags)
    fd = os.open(path, flags | O_NOFOLLOW)
    a, b = os.fstat(fd), os.fstat(read_fd)
    if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
        os.close(fd)
        raise FifoError(path, "the FIFO was replaced while it was being opened")
    return fd


def _enlarge_pipe(fd: int, wanted: Optional[int]) -> int:
    if F_SETPIPE_SZ is None or F_GETPIPE_SZ is None:
        return 0
    if wanted is None:
        wanted = read_sysctl(_PIPE_MAX_SIZE, 1 << 20)
    current: int = fcntl.fcntl(fd, F_GETPIPE_SZ)
    # Unprivileged users may be held below pipe-max-size by pipe-user-pages-soft: halve.
    while wanted > current:
        try:
            return int(fcntl.fcntl(fd, F_SETPIPE_SZ, wanted))
        except OSError:
            wanted //= 2
    return current

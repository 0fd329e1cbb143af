"""A process pinned for the length of a capture or a signal: by a pidfd where the kernel
has them (the caller's, or one opened here and checked against the start time), else by
its pid and start time, re-checked right before each signal. A pid <= 1 or a thread's
id is refused: nothing pinned here is ever a process group, every process, or a thread.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal as _signal
from typing import Optional

from ._procfs import live_thread, pidfd_pid, read_stat, read_status, strerror

__all__ = ["Process", "ProcessRefused"]


class ProcessRefused(Exception):
    """The pid given is not a process this capture may look at or signal.

    Attributes:
        gone: it is no longer there (exited, or its pid now belongs to another process).
    """

    def __init__(self, message: str, *, gone: bool = False) -> None:
        super().__init__(message)
        self.gone = gone


class Process:
    """A worker pinned for the length of a capture: by a pidfd (the caller's, or one
    opened here and checked against the start time), else by pid and start time.

    Use ``Process.open()``; ``close()`` releases a pidfd opened here (never the caller's).

    Attributes:
        pid: the process.
        start_time: its start time in clock ticks since boot, as read when opened.
        pidfd: the pidfd it is signalled through, if any.
    """

    def __init__(self, pid: int, start_time: int, pidfd: Optional[int], owned: bool) -> None:
        self.pid = pid
        self.start_time = start_time
        self.pidfd = pidfd
        self._owned = owned

    @classmethod
    def open(cls, pid: int, start_time: Optional[int], pidfd: Optional[int]) -> Process:
        """Pin process ``pid``, which must be the one started at ``start_time`` (if given)
        and the one ``pidfd`` refers to (if given).

        Raises:
            ProcessRefused: ``pid`` is <= 1 or a thread's id, or the process is gone (its
                ``gone`` attribute is then set), or it cannot be read.
        """
        if pid <= 1:
            raise ProcessRefused(f"pid {pid} is not a worker process")
        owned = False
        if pidfd is None and hasattr(os, "pidfd_open"):
            try:
                pidfd = os.pidfd_open(pid)
                owned = True
            except ProcessLookupError:
                raise ProcessRefused(f"process {pid} is gone", gone=True) from None
            except OSError as e:
                if e.errno not in (errno.ENOSYS, errno.EMFILE, errno.ENFILE, errno.ENOMEM):
                    # EINVAL/ENOENT: a thread's id; anything else: not ours to guess at.
                    raise ProcessRefused(_refusal(pid, e)) from None
        try:
            try:
                st = read_stat(pid)
                tgid = int(read_status(pid).get("Tgid", "0"))
            except ProcessLookupError:
                raise ProcessRefused(f"process {pid} is gone", gone=True) from None
            except (OSError, ValueError, IndexError) as e:
                raise ProcessRefused(f"process {pid} cannot be read: {strerror(e)}") from None
            if tgid != pid:
                raise ProcessRefused(f"{pid} is a thread of process {tgid}, not a process")
            named = pidfd_pid(pidfd) if pidfd is not None else None
            if named is not None and named != pid:
                # The caller's pidfd is for another process (-1: one that has exited).
                raise ProcessRefused(
                    f"the pidfd given for process {pid} refers to "
                    + ("a process that has exited" if named < 0 else f"process {named}"),
                    gone=named < 0,
                )
            if start_time is not None and st.start_time != start_time:
                raise ProcessRefused(
                    f"process {pid} is gone (its pid now belongs to another process)", gone=True
                )
            if st.state in "ZXx" and live_thread(pid) is None:
                # A zombie main thread whose other threads live is a live process still.
                raise ProcessRefused(f"process {pid} has exited", gone=True)
            process = cls(pid, st.start_time, pidfd, owned)
            if not process.alive():
                raise ProcessRefused(f"process {pid} has exited", gone=True)
            return process
        except BaseException:
            if owned and pidfd is not None:
                os.close(pidfd)
            raise

    def alive(self) -> bool:
        """True while the pinned process runs (not exited, not a zombie; a process whose
        main thread has exited runs while another of its threads does)."""
        if self.pidfd is not None:
            # poll, not select: select refuses a descriptor from 1024 up, which a daemon
            # holding a pidfd per worker reaches (its children were then taken for gone).
            poller = select.poll()
            poller.register(self.pidfd, select.POLLIN)
            return not poller.poll(0)
        try:
            st = read_stat(self.pid)
        except (OSError, ValueError, IndexError):
            return False
        return st.start_time == self.start_time and (
            st.state not in "ZXx" or live_thread(self.pid) is not None
        )

    def send(self, signal: int) -> None:
        """Deliver ``signal`` to exactly the pinned process.

        Raises:
            ProcessLookupError: it is gone (its pid may now be another process's).
            OSError: the signal could not be delivered (``PermissionError``, ...).
        """
        if self.pid <= 1:  # never a process group or every process
            raise PermissionError(errno.EPERM, f"refusing to signal pid {self.pid}")
        if self.pidfd is not None:
            _signal.pidfd_send_signal(self.pidfd, signal)
            return
        # No pidfd: the start time and thread group, read right before the kill.
        if not self.alive() or int(read_status(self.pid).get("Tgid", "0")) != self.pid:
            raise ProcessLookupError(errno.ESRCH, f"process {self.pid} is gone")
        os.kill(self.pid, signal)

    def resume(self) -> None:
        """SIGCONT it, in case a tracer (py-spy, gdb) left it stopped; a process gone
        meanwhile needs nothing."""
        with contextlib.suppress(OSError):
            self.send(_signal.SIGCONT)

    def close(self) -> None:
        """Close the pidfd opened here, if any. Idempotent."""
        if self._owned and self.pidfd is not None:
            os.close(self.pidfd)
        self.pidfd = None
        self._owned = False


def _refusal(pid: int, e: OSError) -> str:
    if e.errno in (errno.EINVAL, errno.ENOENT):
        return f"{pid} is not a process (a thread's id?): pidfd_open: {strerror(e)}"
    return f"process {pid} cannot be opened: pidfd_open: {strerror(e)}"

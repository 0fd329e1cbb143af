"""sd_notify without libsystemd: readiness, stopping, watchdog keep-alives and the file
descriptor store.

The protocol is one datagram per notification, newline-separated ``KEY=VALUE`` lines, sent
to the AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract
namespace). ``$WATCHDOG_USEC`` asks for ``WATCHDOG=1`` at least that often; systemd's
advice is every half interval. Descriptors given to the store (``FDSTORE=1``) come back
to the service's next process (``$LISTEN_FDS`` from descriptor 3 on, named by
``$LISTEN_FDNAMES``). See sd_notify(3), sd_watchdog_enabled(3) and sd_listen_fds(3).
"""

from __future__ import annotations

import array
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping
from typing import List, Optional, Sequence, Tuple

from ftimer_server.core._report import printable

__all__ = ["MAX_STATUS", "MIN_WATCHDOG_INTERVAL", "SystemdNotifier", "stored_fds"]

log = logging.getLogger("ftimer_server.systemd")

#: The shortest time between two ``WATCHDOG=1`` pings, in seconds. The pings come from
#: the server's loop, which wakes for each: ``WATCHDOG_USEC=1`` would have it spin (tens of
#: thousands of pings a second). 10 ms is far below any useful ``WatchdogSec=`` (seconds)
#: and as short as ``--state-interval`` may be.
MIN_WATCHDOG_INTERVAL = 0.01
#: How long a notification other than a ping waits for room in systemd's queue (s),
#: trying again every _NOTIFY_RETRY.
NOTIFY_WAIT = 2.0
_NOTIFY_RETRY = 0.01
#: The longest ``STATUS=`` sent, in characters (at most 4 bytes each: well within the
#: 4096 bytes of a notification systemd reads).
MAX_STATUS = 512


class SystemdNotifier:
    """Sends notifications to systemd's socket; every method is a no-op without one.

    Args:
        address: the socket address (``/path`` or ``@abstract``), or None for no-op.
        watchdog_usec: systemd's watchdog timeout in microseconds, or None.
    """

    def __init__(self, address: Optional[str], watchdog_usec: Optional[int] = None) -> None:
        self._address: Optional[str] = None
        if address:
            # "@name" is the abstract namespace: a leading NUL byte on the wire.
            self._address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_usec = watchdog_usec
        self._sock: Optional[socket.socket] = None
        self._lock = threading.Lock()  # keep-alives come from the server's loop thread
        self._warned = False

    @classmethod
    def from_environ(
        cls, environ: Optional[Mapping[str, str]] = None, pid: Optional[int] = None
    ) -> SystemdNotifier:
        """Read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``.

        The watchdog is enabled only when ``WATCHDOG_USEC`` is a positive integer and
        ``WATCHDOG_PID``, if set, is this process (``pid``, default ``os.getpid()``).
        Unsupported addresses (``vsock:``) are logged and ignored, and so is a timeout
        so short that its pings would come more often than `MIN_WATCHDOG_INTERVAL`
        (they come that often instead).
        """
        env = os.environ if environ is None else environ
        address: Optional[str] = env.get("NOTIFY_SOCKET") or None
        if address is not None and not address.startswith(("/", "@")):
            log.warning("NOTIFY_SOCKET=%s is not supported (only /path and @abstract)", address)
            address = None
        usec: Optional[int] = None
        raw = env.get("WATCHDOG_USEC", "")
        watchdog_pid = env.get("WATCHDOG_PID", "")
        me = os.getpid() if pid is None else pid
        # isdecimal and isascii: "²".isdigit() is true, and int() refuses it.
        is_number = raw.isascii() and raw.isdecimal()
        if is_number and int(raw) > 0 and (not watchdog_pid or watchdog_pid == str(me)):
            usec = int(raw)
            if address is not None and usec / 2e6 < MIN_WATCHDOG_INTERVAL:
                log.warning(
                    "WATCHDOG_USEC=%d asks for a keep-alive every %g s; sending one every "
                    "%g s instead (systemd may stop the daemon: set WatchdogSec= to seconds)",
                    usec,
                    usec / 2e6,
                    MIN_WATCHDOG_INTERVAL,
                )
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        """True when there is a socket to notify."""
        return self._address is not None

    @property
    def watchdog_interval(self) -> Optional[float]:
        """Seconds between ``WATCHDOG=1`` pings (half systemd's timeout, at least
        `MIN_WATCHDOG_INTERVAL`), or None."""
        if self._address is None or self.watchdog_usec is None:
            return None
        return max(self.watchdog_usec / 2e6, MIN_WATCHDOG_INTERVAL)

    def notify(self, *lines: str, fds: Sequence[int] = (), wait: float = NOTIFY_WAIT) -> bool:
        """Send ``lines`` as one notification, with descriptors ``fds``; True if it was
        sent. A receiver whose queue is full is tried again for ``wait`` seconds at most
        (0: not at all, for a ``WATCHDOG=1`` ping: one missed is the watchdog's to judge;
        READY=1, FDSTORE=1 and STOPPING=1 dropped are not made good by the next one).

        Failures (socket gone, permission) are logged once and otherwise ignored: systemd
        being unreachable must not stop the watchdog from working.
        """
        if self._address is None:
            return False
        payload = "\n".join(lines).encode()
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        end = time.monotonic() + wait
        while True:
            try:
                with self._lock:
                    if self._sock is None:
                        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    # Never blocks (a full queue would hold the caller for good), and not
                    # connected: a notify socket made anew at the address is reached.
                    self._sock.sendmsg([payload], rights, socket.MSG_DONTWAIT, self._address)
                return True
            except BlockingIOError as e:
                error: OSError = e
                if time.monotonic() < end:
                    time.sleep(_NOTIFY_RETRY)  # without the lock: a ping never waits
                    continue
            except OSError as e:
                error = e
            if not self._warned:
                log.warning("cannot notify systemd at %r: %s", self._address, error)
                self._warned = True
            return False

    def ready(self, status: str = "") -> bool:
        """``READY=1`` (and ``STATUS=``, ``MAINPID=``): start-up (or a reload) finished.
        ``status`` is sent in one line of at most `MAX_STATUS` characters: systemd reads a
        notification's lines as its assignments, and ignores one of 4096 bytes or more,
        its ``READY=1`` with it."""
        lines = ["READY=1", f"MAINPID={os.getpid()}"]
        if status:
            status = printable(status)
            if len(status) > MAX_STATUS:
                status = status[: MAX_STATUS - 1] + "…"
            lines.append(f"STATUS={status}")
        return self.notify(*lines)

    def stopping(self) -> bool:
        """``STOPPING=1``: shutdown began."""
        return self.notify("STOPPING=1")

    def reloading(self) -> bool:
        """``RELOADING=1``: a SIGHUP reload began (follow with `ready()`)."""
        # MONOTONIC_USEC lets systemd tell this reload from an earlier one (notify-reload).
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def store(self, name: str, fd: int) -> bool:
        """Have systemd hold ``fd`` under ``name``, in place of what it held under that
        name, until the service is stopped: the unit needs ``FileDescriptorStoreMax=``.
        Never polled (``FDPOLL=0``): systemd drops a descriptor that polls as an error,
        which the write end of a pipe does while nobody reads it."""
        self.unstore(name)
        return self.notify("FDSTORE=1", "FDPOLL=0", f"FDNAME={name}", fds=[fd])

    def unstore(self, name: str) -> bool:
        """Have systemd close what it holds under ``name`` (``FDSTOREREMOVE=1``)."""
        return self.notify("FDSTOREREMOVE=1", f"FDNAME={name}")

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the service is alive (send only when it really is)."""
        return self.notify("WATCHDOG=1", wait=0)

    def close(self) -> None:
        """Close the socket (a later notification opens a new one)."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def stored_fds(
    environ: Optional[Mapping[str, str]] = None, pid: Optional[int] = None
) -> List[Tuple[int, str]]:
    """The descriptors systemd passed this process (``pid``, default ``os.getpid()``),
    from its store, with their names: none where ``$LISTEN_PID`` names another process."""
    env = os.environ if environ is None else environ
    me = os.getpid() if pid is None else pid
    count = env.get("LISTEN_FDS", "")
    if env.get("LISTEN_PID") != str(me) or not (count.isascii() and count.isdecimal()):
        return []
    names = env.get("LISTEN_FDNAMES", "").split(":")
    return [(3 + i, names[i] if i < len(names) else "") for i in range(int(count))]

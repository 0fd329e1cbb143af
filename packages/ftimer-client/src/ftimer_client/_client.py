"""FileTimerClient: arm and disarm watchdog timers of this process over the server's FIFO
or its socket."""

from __future__ import annotations

import contextlib
import math
import numbers
import operator
import os
import re
import signal as _signal
import sys
import time
import warnings
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Dict, FrozenSet, Optional, Tuple, Type, Union

from ftimer_protocol import (
    LABEL_KEY_PATTERN,
    MAX_LABEL_VALUE,
    MAX_LABELS,
    MAX_PID,
    MAX_TIME,
    Arm,
    DumpHook,
    TimerRequestV1,
    decode,
)

from . import _dump
from ._errors import ServerUnavailable, ServerUnavailableWarning
from ._paths import resolve_route, torch_serves
from ._proc import default_labels
from ._shared import channel_for
from ._wire import V1Lines, V2Lines, check_signal, fix_deadline

__all__ = ["POLICIES", "FileTimerClient", "beyond_float", "not_seconds", "plain_seconds"]

#: Values of ``on_unavailable``.
POLICIES = ("raise", "warn", "ignore")

_monotonic = time.monotonic
# The protocol's pattern (its schema's own), for a refusal in the user's words.
_LABEL_KEY = re.compile(LABEL_KEY_PATTERN)
# Frames of this package: a warning names the first line outside it.
_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


class FileTimerClient:
    """The worker side of an ftimer (or torch ``FileTimerServer``) watchdog.

    A drop-in for ``torch.distributed.elastic.timer.FileTimerClient``: same constructor
    arguments, ``acquire(scope_id, expiration_time)`` and ``release(scope_id)``. Timers
    belong to this process (its pid); clients of one process that share a server (path,
    transport and protocol) share its state. Thread-safe; after a fork the child starts
    with nothing armed.

    Over the server's socket the kernel tells the server who sends, so the timers are
    this process's whatever pid a message names (and, with ``pid``, those of the process
    whose pidfd goes with every message). The API and the failure policies are the same
    over either transport.

    Args:
        file_path: the server's FIFO or socket. Default: ``$FTIMER_SOCKET``, else
            ``$FTIMER_FIFO``, else ``$TORCHELASTIC_TIMER_FILE``, else the server's default
            path, each FIFO preferring the socket beside it when there is one (see
            ``docs/client.md``).
        signal: what the server sends when a timer expires; 0 or negative: report only.
        protocol: 2 (ftimer's) or 1 (torch's, to talk to torch's own
            ``FileTimerServer``: the FIFO is then opened and closed per message).
            Default: 1 when the FIFO is the one torch's agent serves itself
            (``$TORCHELASTIC_ENABLE_FILE_TIMER`` is "1" and the path is
            ``$TORCHELASTIC_TIMER_FILE``), since that server reads nothing else; else 2.
        on_unavailable: when a message cannot be delivered (no server, or the pipe or
            the socket's queue still full after ``write_timeout``): ``"raise"``
            ``ServerUnavailable``, ``"warn"`` once per outage and carry on, or
            ``"ignore"``. Either way the client re-sends what is armed when the server
            is back.
        write_timeout: seconds to wait for room in a full pipe or queue, once per stall.
        labels: labels of every timer (protocol 2), e.g. ``{"job": "x"}``. Default:
            ``rank`` and ``local_rank`` from torchrun's ``RANK`` and ``LOCAL_RANK`` when
            set, and ``job`` from its ``TORCHELASTIC_RUN_ID``; ``{}`` for none.
        pid: arm timers of another process instead of this one (what the ``ftimer``
            command does for a shell script). This process's own pid is treated as
            ``None``: a forked child or a pickled copy arms its own timers.
        dump_signal: turn on the stack-dump hook for the server's incidents (protocol 2):
            register Python's ``faulthandler`` on this signal (a number or a name such as
            ``"SIGUSR2"`` or ``"SIGRTMIN+2"``), once per process, and announce it with
            every arm and expire. ``0``: off. Default: ``$FTIMER_DUMP_SIGNAL``, where a
            value the hook cannot use warns (``RuntimeWarning``) and leaves it off.
        transport: ``"auto"`` (what is at the path, looked at on each connection),
            ``"fifo"`` or ``"socket"``. Protocol 1 is FIFO-only.

    Raises:
        TypeError: ``labels`` is not a mapping (a list of pairs, a ``"job=x"`` string).
        ValueError: an argument is out of range or breaks the protocol's schema;
            ``transport`` is unknown, or ``"socket"`` with protocol 1; ``labels`` are
            given with protocol 1;
            ``dump_signal`` is not SIGUSR1, SIGUSR2 or a real-time signal, is handled
            by something else in this process, differs from the hook this process
            already has, or is given with ``pid`` or protocol 1.
        OSError: the stack-dump hook's temporary file could not be made.
    """

    def __init__(
        self,
        file_path: Union[str, os.PathLike[str], None] = None,
        signal: int = _signal.SIGKILL,
        *,
        protocol: Optional[int] = None,
        on_unavailable: str = "raise",
        write_timeout: float = 1.0,
        labels: Optional[Mapping[str, str]] = None,
        pid: Optional[int] = None,
        dump_signal: Union[int, str, None] = None,
        transport: str = "auto",
    ) -> None:
        if type(pid) is int and pid == os.getpid():  # not a bool or a float: refused below
            # This process's own timers: followed across a fork and into a pickled copy,
            # as without pid (kept, a child would arm, disarm and be reaped as its parent).
            pid = None
        # The arguments as given, for a pickled copy (see ``__reduce__``).
        options = {
            "protocol": protocol,
            "on_unavailable": on_unavailable,
            "write_timeout": write_timeout,
            "labels": labels,
            "pid": pid,
            "dump_signal": dump_signal,
            "transport": transport,
        }
        if protocol not in (None, 1, 2):
            raise ValueError(f"protocol must be 1 or 2, not {protocol!r}")
        if on_unavailable not in POLICIES:
            raise ValueError(f"on_unavailable must be one of {POLICIES}, not {on_unavailable!r}")
        if not (isinstance(write_timeout, (int, float)) and 0 <= write_timeout < math.inf):
            raise ValueError(f"write_timeout must be finite and >= 0, not {write_timeout!r}")
        if labels is not None and not isinstance(labels, Mapping):
            raise TypeError(
                f"labels must be a mapping of str to str, such as {{'job': 'x'}}, "
                f"not {type(labels).__name__} {labels!r:.60}"
            )
        self._route = resolve_route(file_path, transport=transport, protocol=protocol or 2)
        #: What a pickled copy is made from (see ``__reduce__``): a path given made
        #: absolute, as the route's, so that a copy unpickled in another working
        #: directory reaches the same server (None still means the default resolution).
        self._made_with = (None if file_path is None else self._route.path, options)
        if protocol is None and torch_serves(self._route):
            # torch's agent serves this FIFO itself: a protocol 2 line fails its read, and
            # a stuck worker would never be reaped.
            protocol = 1
            self._route = resolve_route(file_path, transport=transport, protocol=1)
            ignored = [
                name
                for name, given in (("labels", labels), ("dump_signal", dump_signal))
                if given  # None, 0 and {} ask for nothing
            ]
            if ignored:
                warnings.warn(
                    f"{' and '.join(ignored)} {'are' if len(ignored) > 1 else 'is'} ignored: "
                    "the FIFO is served by torch's own server "
                    "(TORCHELASTIC_ENABLE_FILE_TIMER=1), which reads torch's protocol 1",
                    RuntimeWarning,
                    stacklevel=2,
                )
                labels, dump_signal = None, 0
        elif protocol == 1 and labels:
            raise ValueError("labels need protocol 2: torch's format cannot carry them")
        protocol = protocol or 2
        self._signal = check_signal(signal)
        self._policy = on_unavailable
        self._keep = on_unavailable != "raise"
        self._timeout = float(write_timeout)
        self._labels: Dict[str, str] = default_labels() if labels is None else _labels(labels)
        if pid is not None:
            _check_pid(pid, self._route.transport)
        hook = _dump_hook(dump_signal, protocol, pid)
        self._channel = channel_for(self._route, protocol, pid)
        self._lines = self._channel.lines(self._signal, self._labels or None, hook)
        self._v2 = self._lines if isinstance(self._lines, V2Lines) else None
        self._warned = 0  # the outage last warned about (channel.outages counts them)
        self._closed = False
        self._channel.attach()

    # -- torch's API --------------------------------------------------------------------

    def acquire(self, scope_id: str, expiration_time: float) -> None:
        """Arm timer ``scope_id`` until ``expiration_time`` (wall-clock epoch seconds, as
        torch's client); re-arming an armed scope moves its deadline.

        Protocol 2 converts the time to a monotonic deadline, so a later wall-clock step
        does not move it. ``math.inf`` (or a time beyond the protocol's ``MAX_TIME``)
        arms the scope at the furthest deadline the protocol carries, about 31 million
        years away: a timer that never fires, as torch's, until released.

        Raises:
            ServerUnavailable: not delivered, with ``on_unavailable="raise"``.
            ValueError: the scope breaks the schema, or the time is NaN or negative
                (torch's wire format reads a negative time as a release: call
                ``release()``).
            TypeError: the time is not a number (or is a bool).
            RuntimeError: the client is closed.
        """
        if type(expiration_time) is bool:  # True would arm until 1970
            raise TypeError("expiration time must be a number of seconds, not a bool")
        try:
            negative = not expiration_time >= 0.0
        except TypeError:
            raise not_seconds("expiration time", expiration_time) from None
        if negative:
            raise ValueError(f"expiration time must be >= 0, not {expiration_time!r}")
        if self._v2 is not None:
            try:
                after = expiration_time - time.time()
            except OverflowError:  # an int beyond any float: beyond MAX_TIME
                after = math.inf
            self.arm(scope_id, after)
        else:
            expiration_time = min(expiration_time, MAX_TIME)  # inf: never fires
            self._arm(scope_id, self._v1_line(scope_id, expiration_time, None))

    def release(self, scope_id: str) -> None:
        """Disarm timer ``scope_id``; releasing a scope that is not armed does nothing.

        Raises:
            ServerUnavailable: not delivered, with ``on_unavailable="raise"``. The client
                still counts the scope as released and makes the server agree when it
                is back.
            ValueError: the scope breaks the schema.
            RuntimeError: the client is closed.
        """
        if self._closed:
            raise _closed()
        line = self._lines.disarm(scope_id)
        try:
            self._channel.disarm(scope_id, line, self._timeout)
        except ServerUnavailable as e:
            self._unavailable(e)

    # -- what torch lacks ---------------------------------------------------------------

    def arm(self, scope_id: str, after: float, *, signal: Optional[int] = None) -> None:
        """Arm (or re-arm) timer ``scope_id`` to expire ``after`` seconds from now.

        A negative ``after`` arms a timer already expired. ``math.inf`` (or a deadline
        beyond the protocol's ``MAX_TIME``, an int too large for a float included) arms
        it at the furthest deadline the protocol carries, about 31 million years away: a
        timer that never fires (torch arms ``math.inf`` so), until released.

        Args:
            signal: this timer's signal instead of the client's.

        Raises:
            ServerUnavailable: not delivered, with ``on_unavailable="raise"``.
            ValueError: ``after`` is NaN, minus infinity or an int below any float, or
                the scope breaks the schema (longer than ``MAX_SCOPE``, or its message
                over ``PIPE_BUF``).
            TypeError: ``after`` is not a number (or is a bool).
            RuntimeError: the client is closed.
        """
        if self._closed:
            raise _closed()
        if type(after) is bool:  # True would be a 1 s timer
            raise TypeError("after must be a number of seconds, not a bool")
        if type(after) is not float and type(after) is not int:
            after = plain_seconds(after)
        v2 = self._v2
        if v2 is None or signal is not None:
            line = self._line(scope_id, after, signal)
        else:  # self._line(), inlined: every block of expires() comes here
            try:  # free on the hot path: no check of the type before the sum
                deadline = _monotonic() + after
                if not 0.0 <= deadline <= MAX_TIME:
                    deadline = fix_deadline(deadline)
            except OverflowError:  # an int beyond any float
                deadline = fix_deadline(beyond_float(after))
            except TypeError:
                raise not_seconds("after", after) from None
            line = v2.entry(scope_id)[0] % deadline
        try:  # self._arm(), inlined: every block of expires() comes here
            self._channel.arm(scope_id, line, self, self._timeout, self._keep)
        except ServerUnavailable as e:
            self._unavailable(e)
        self._check_still_open()

    def _line(self, scope_id: str, after: float, signal: Optional[int]) -> bytes:
        """The line arming ``scope_id`` ``after`` seconds from now, with ``signal`` (None:
        the client's). As a version 2 deadline, a time long past arms an expired timer,
        one beyond ``MAX_TIME`` (inf) one that never fires.

        Raises:
            ValueError: as ``arm()``: NaN, minus infinity, the scope or the signal.
            TypeError: ``after`` is not a number.
        """
        v2 = self._v2
        sig = None if signal is None else check_signal(signal)
        if type(after) is not float and type(after) is not int:
            after = plain_seconds(after)
        try:
            deadline = (time.time() if v2 is None else _monotonic()) + after
            if not 0.0 <= deadline <= MAX_TIME:
                deadline = fix_deadline(deadline)
        except OverflowError:  # an int beyond any float
            deadline = fix_deadline(beyond_float(after))
        except TypeError:  # a str, None, a Decimal, a complex: no number of seconds
            raise not_seconds("after", after) from None
        if v2 is None:
            return self._v1_line(scope_id, deadline, sig)
        return v2.entry(scope_id)[0] % deadline if sig is None else v2.arm(scope_id, deadline, sig)

    def _v1_line(self, scope_id: str, expiration_time: float, signal: Optional[int]) -> bytes:
        assert isinstance(self._lines, V1Lines)
        return self._lines.arm(scope_id, expiration_time, signal)

    def _arm(self, scope_id: str, line: bytes, owner: Optional[FileTimerClient] = None) -> None:
        """Arm ``scope_id`` with ``line``, as the timer of ``owner`` (default: this
        client), under this client's failure policy."""
        if self._closed:
            raise _closed()
        try:
            self._channel.arm(
                scope_id, line, self if owner is None else owner, self._timeout, self._keep
            )
        except ServerUnavailable as e:
            self._unavailable(e)
        self._check_still_open()

    def _check_still_open(self) -> None:
        """After an arm: whether another thread closed this client meanwhile (after the
        check that it was open). close()'s disarms may then have gone before the arm,
        which nothing would ever release (release() refuses a closed client): disarm
        what is left, as close() does.

        Raises:
            RuntimeError: the client was closed (once the disarms are sent).
            ServerUnavailable: they were not, with ``on_unavailable="raise"`` (the
                client delivers them when the server is back).
        """
        if not self._closed:
            return
        try:
            self._channel.disarm_all(self._timeout, owner=self)
        except ServerUnavailable as e:
            self._unavailable(e)
        raise _closed()

    def heartbeat(self, scope_id: str, after: float) -> None:
        """Extend armed timer ``scope_id``: it now expires ``after`` seconds from now, as
        it was armed otherwise (its signal, its labels). Made through another client of
        this process, it stays the timer of the client that armed it (disarmed by that
        one's ``close()``); this client's failure policy applies.

        Raises:
            KeyError: this process has not armed ``scope_id`` (or has released it).
            ServerUnavailable: not delivered, with ``on_unavailable="raise"``.
            TypeError: ``after`` is not a number (or is a bool).
            ValueError: ``after`` is NaN or minus infinity.
            RuntimeError: the client is closed.
        """
        if self._closed:
            raise _closed()
        if type(after) is bool:
            raise TypeError("after must be a number of seconds, not a bool")
        channel = self._channel
        # Under the channel's lock: the arming client's close(), which disarms its scopes
        # under it, comes wholly before this (KeyError) or after (and disarms it too).
        with channel.lock:
            armed = channel.armed.get(scope_id)
            if armed is None:
                raise KeyError(scope_id)
            line, owner = armed
            maker = owner if isinstance(owner, FileTimerClient) else self
            request = decode(line)
            assert isinstance(request, (Arm, TimerRequestV1))  # the registry holds arms
            self._arm(scope_id, maker._line(scope_id, after, request.signal), maker)
            if maker is not self and maker._closed:
                # Closed meanwhile by a signal handler of this thread (the lock is
                # reentrant): its close() may have gone before this arm, which nothing
                # would release. (This client's own close: _arm() sees to it.)
                try:
                    channel.disarm_all(self._timeout, owner=maker)
                except ServerUnavailable as e:
                    self._unavailable(e)

    def expire(self, scope_id: str, *, signal: Optional[int] = None) -> None:
        """Expire timer ``scope_id`` now: ask the server to reap this process at once
        (with ``signal``, default the client's; 0 only reports).

        Raises:
            ServerUnavailable: not delivered, with ``on_unavailable="raise"``.
            ValueError: the scope breaks the schema.
            RuntimeError: the client is closed.
        """
        if self._closed:
            raise _closed()
        sig = self._signal if signal is None else check_signal(signal)
        if self._v2 is None:
            # Version 1 has no expire: arm with the present as the expiration time.
            line = self._v1_line(scope_id, time.time(), sig)
        else:
            line = self._v2.expire(scope_id, sig)
        try:
            self._channel.send(line, self._timeout, forget=scope_id)
        except ServerUnavailable as e:
            self._unavailable(e)

    def release_all(self) -> None:
        """Disarm every timer this process armed on this server through any of its
        clients of the same transport and protocol (one disarm each, and the disarms an
        outage left owed): what to do before ``exec()``. Timers armed for this process
        from elsewhere (``ftimer exec``'s timer of its command) are left alone.

        Raises:
            ServerUnavailable: not delivered, with ``on_unavailable="raise"``.
            RuntimeError: the client is closed.
        """
        if self._closed:
            raise _closed()
        try:
            self._channel.disarm_all(self._timeout)
        except ServerUnavailable as e:
            self._unavailable(e)

    def close(self) -> None:
        """Disarm the timers this client armed and let go of the connection (once no
        client of the process uses it, and nothing is owed to the server: disarms lost in
        an outage are still delivered when it is back). Idempotent; afterwards the other
        methods raise ``RuntimeError``.

        Raises:
            ServerUnavailable: the disarms were not delivered, with
                ``on_unavailable="raise"`` (the client is closed all the same, and
                delivers them when the server is back). A client with nothing armed
                sends nothing, and never raises it. Leaving a ``with`` block of the
                client on an exception never replaces that exception with this one.
        """
        if self._closed:
            return
        self._closed = True
        try:
            self._channel.disarm_all(self._timeout, owner=self)
        except ServerUnavailable as e:
            self._unavailable(e)
        except BaseException:
            # An interrupt (a signal handler's exception) may have landed before any of
            # this client's scopes was forgotten, and no method of a closed client would
            # ever disarm them: once more (idempotent), then let it go on.
            with contextlib.suppress(Exception):
                self._channel.disarm_all(self._timeout, owner=self)
            raise
        finally:
            self._channel.detach()

    def __enter__(self) -> FileTimerClient:
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        if exc_type is None:
            self.close()
            return
        # The block's own exception matters more than disarms that did not get through
        # (the client delivers them when the server is back), as in an expires block.
        with contextlib.suppress(ServerUnavailable):
            self.close()

    # -- introspection ------------------------------------------------------------------

    @property
    def file_path(self) -> str:
        """The path this client sends to: a FIFO or a socket (with the default path, the
        FIFO, unless a socket is there beside it when the client connects; the per-user
        default: the system daemon's FIFO once its channel moved there)."""
        if self._route.owner is None:
            return self._route.path
        return self._channel.route.path

    @property
    def transport(self) -> str:
        """The transport asked for: ``"auto"``, ``"fifo"`` or ``"socket"`` (protocol 1:
        always ``"fifo"``)."""
        return self._route.transport

    @property
    def signal(self) -> int:
        """The signal of this client's timers (0: report only). torch code assigns it
        (``client.signal = signal.SIGTERM``): timers armed from then on carry the new one.

        Raises:
            ValueError: on assignment, a value that is not an integer, or above the
                highest signal number (64); a negative one becomes 0, as torch's client
                reads it ("will not kill").
        """
        return self._signal

    @signal.setter
    def signal(self, value: int) -> None:
        self._signal = check_signal(value)
        # The hook the lines announce now (a forked child's own), not the constructor's.
        hook = self.dump_hook
        self._lines = self._channel.lines(self._signal, self._labels or None, hook)
        self._v2 = self._lines if isinstance(self._lines, V2Lines) else None

    @property
    def protocol(self) -> int:
        """1 (torch's format, open per message) or 2."""
        return self._channel.protocol

    @property
    def on_unavailable(self) -> str:
        """The failure policy: "raise", "warn" or "ignore"."""
        return self._policy

    @property
    def labels(self) -> Dict[str, str]:
        """The labels sent with every timer (protocol 2)."""
        return dict(self._labels)

    @property
    def dump_hook(self) -> Optional[DumpHook]:
        """The stack-dump hook announced with every arm and expire (its signal, and the
        descriptor of its file in this process), or None when it is off."""
        return None if self._v2 is None else self._v2.dump

    @property
    def armed(self) -> FrozenSet[str]:
        """Scopes armed through this client and not yet released or expired."""
        with self._channel.lock:
            return self._channel.state.armed_by(self)

    def __reduce__(self) -> Tuple[Any, ...]:
        """Pickled, as torch's client is (a ``multiprocessing`` child's argument, say), it
        is made anew in the process that unpickles it, from the same arguments and the
        current ``signal``: a client of that process, with nothing armed (timers belong
        to the process that armed them)."""
        file_path, options = self._made_with
        return (_remake, (type(self), file_path, self._signal, options))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self._route.path!r}, signal={self._signal}, "
            f"protocol={self.protocol}, transport={self.transport!r}, "
            f"on_unavailable={self._policy!r})"
        )

    def _wait_read(self) -> bool:
        """Whether the server has read what this client sent, waiting up to
        ``write_timeout`` (for the ``ftimer`` command, which exits next; see
        ``Channel.wait_read``)."""
        return self._channel.wait_read(self._timeout)

    def _unavailable(self, e: ServerUnavailable) -> None:
        if self._policy == "raise":
            raise e
        if self._policy == "warn" and self._warned != self._channel.outages:
            self._warned = self._channel.outages
            # Name the caller's line: the first frame outside this package (arm(),
            # release(), an expires block, a subclass's override...).
            level, frame = 2, sys._getframe(1)
            while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE):
                level, frame = level + 1, frame.f_back
            warnings.warn(
                f"{e}; carrying on without a watchdog until the server is back",
                ServerUnavailableWarning,
                stacklevel=level,
            )


def plain_seconds(after: Any) -> Any:
    """``after`` as a plain ``int`` or ``float`` when it is a real number of another type
    (a numpy scalar, a Fraction): ``now + np.float32(60)`` is computed in float32, whose
    steps at today's epoch are 128 s, and would send a time up to a minute early. Anything
    else (a str, a bool, a Decimal) is returned as it is, to be refused where it is used.
    The hot paths call it only for a type other than ``float`` and ``int``."""
    if isinstance(after, bool) or not isinstance(after, numbers.Real):
        return after
    if isinstance(after, numbers.Integral):
        return operator.index(after)
    return float(after)


def not_seconds(what: str, value: object) -> TypeError:
    """The error for ``value``, given as ``what``, that is no number of seconds."""
    return TypeError(
        f"{what} must be a number of seconds (int or float), not {type(value).__name__} "
        f"{value!r:.80}"
    )


def beyond_float(after: float) -> float:
    """Return what ``after``, an int too large for a float (beyond about 1.8e308 s),
    stands for: ``math.inf`` when positive (``arm()`` makes it ``MAX_TIME``).

    Raises:
        ValueError: it is negative: refused, as ``-math.inf`` is.
    """
    if after > 0:
        return math.inf
    raise ValueError(
        "timer duration must be a number of seconds (math.inf: a timer that never fires), "
        "not an integer below any float (refused as -math.inf is)"
    )


def _remake(
    cls: Type[FileTimerClient], file_path: object, signal: int, options: Dict[str, Any]
) -> FileTimerClient:
    return cls(file_path, signal, **options)  # type: ignore[arg-type]


def _closed() -> RuntimeError:
    return RuntimeError("this FileTimerClient is closed: make a new one to arm timers")


def _dump_hook(
    dump_signal: Union[int, str, None], protocol: int, pid: Optional[int]
) -> Optional[DumpHook]:
    """Return the stack-dump hook a client announces, registered; None when off.

    Raises:
        ValueError: ``dump_signal`` is refused (see ``FileTimerClient``).
        OSError: the hook's temporary file could not be made.
    """
    if dump_signal is None:
        # Warnings name the line that constructs the client.
        return _dump.from_environment(protocol=protocol, pid=pid, stacklevel=3)
    sig = _dump.check_dump_signal(dump_signal)
    if not sig:
        return None
    if pid is not None:
        raise ValueError(
            "dump_signal cannot be used with pid: the hook has to be registered inside the "
            "process whose timers these are, and this client is not that process"
        )
    if protocol == 1:
        raise ValueError("dump_signal needs protocol 2: torch's format cannot announce a hook")
    return _dump.install(sig)


def _check_pid(pid: int, transport: str) -> None:
    # Over the socket a pidfd names the process, and pid 1 is the init of the sender's
    # PID namespace (a container's shell, say), which the server tells from the host's.
    lowest = 1 if transport == "socket" and pid == os.getppid() else 2
    if isinstance(pid, bool) or not isinstance(pid, int) or not lowest <= pid <= MAX_PID:
        raise ValueError(
            f"pid must be the id of a process other than init (2..{MAX_PID}), not {pid!r}: "
            "0 and negative ids name process groups, and 1 is init; servers refuse them"
        )


def _labels(labels: Mapping[str, str]) -> Dict[str, str]:
    """Check ``labels`` against the protocol's schema; say what is wrong in plain words.

    Raises:
        ValueError: too many labels, a key the schema refuses, or a value too long.
    """
    if len(labels) > MAX_LABELS:
        raise ValueError(f"at most {MAX_LABELS} labels, not {len(labels)}")
    for key, value in labels.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"labels map strings to strings, not {key!r}: {value!r}")
        if not _LABEL_KEY.fullmatch(key):
            raise ValueError(
                f"label key {key!r} is not allowed: a key is a letter or '_', then at most "
                "31 letters, digits or '_' (like rank or job_id)"
            )
        if len(value) > MAX_LABEL_VALUE:
            raise ValueError(
                f"label {key!r} is {len(value)} characters long; the most is {MAX_LABEL_VALUE}"
            )
    return dict(labels)

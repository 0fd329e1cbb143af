"""The stack-dump hook: Python's faulthandler on a signal, writing to a file the server reads.

When a timer expires, a server that captures diagnostics before the reap sends the
announced signal and reads the dump through ``/proc/PID/fd/FD``: no ptrace, and it works
while a thread holds the GIL in C code (faulthandler's handler runs in C and reads the
thread states without taking the GIL).

A process has at most one hook: faulthandler keeps one registration per signal, and
clients of a process share it. The file is anonymous (unlinked at once, so nothing is
left behind) and opened for appending, so every dump lands at its end whoever else reads
or truncates it. A forked child must not append its dumps to its parent's file (they would
interleave in one file, under its parent's announcement), so it gets a file of its own
(``after_fork_in_child``, called by the channels' fork handler before they rebuild their
lines).
"""

from __future__ import annotations

import faulthandler
import os
import signal
import threading
import warnings
from collections.abc import Mapping
from typing import IO, FrozenSet, Optional, Tuple, Union

from ftimer_protocol import MAX_SIGNAL, DumpHook, parse_signal, signal_name

__all__ = [
    "ENV_VAR",
    "after_fork_in_child",
    "check_dump_signal",
    "current",
    "from_environment",
    "install",
    "usable_signals",
]

#: Turns the hook on when a client is not given ``dump_signal``.
ENV_VAR = "FTIMER_DUMP_SIGNAL"

_UNCATCHABLE = (signal.SIGKILL, signal.SIGSTOP)
# Say what is wrong with a signal of the wrong kind, in words.
_HINT = "choose SIGUSR2, SIGUSR1 or a real-time signal (SIGRTMIN+N)"

_lock = threading.Lock()
# (signal, file) of this process's hook; the file stays open for the life of the process.
_state: Optional[Tuple[int, IO[bytes]]] = None


def usable_signals() -> FrozenSet[int]:
    """Signals the hook may take: SIGUSR1, SIGUSR2 and the real-time signals.

    Every other signal means something already: SIGTERM or SIGINT ask the process to
    stop (a reap's escalation among them), SIGCHLD, SIGPIPE, SIGWINCH or SIGCONT arrive in
    normal operation (each would add a dump to the file), faulthandler keeps SIGSEGV and
    SIGABRT for its fatal-error handler, and SIGKILL and SIGSTOP cannot be caught.
    """
    usable = {int(signal.SIGUSR1), int(signal.SIGUSR2)}
    low, high = getattr(signal, "SIGRTMIN", None), getattr(signal, "SIGRTMAX", None)
    if low is not None and high is not None:
        usable.update(range(int(low), int(high) + 1))
    return frozenset(usable)


def check_dump_signal(value: Union[int, str]) -> int:
    """Return the signal number ``value`` names for the hook, or 0 for "off".

    Args:
        value: a number, or a name such as ``"SIGUSR2"``, ``"USR2"`` or ``"SIGRTMIN+2"``;
            ``0``, ``""`` and ``"0"`` turn the hook off.

    Raises:
        ValueError: not a signal of this platform, or one the hook cannot take.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"dump_signal must be a signal number or name, not {value!r}")
    if isinstance(value, str):
        if not value.strip():
            return 0
        number = parse_signal(value, allow_zero=True)
    else:
        number = int(value)  # a signal.Signals member becomes a plain int
    if number == 0:
        return 0
    if not 0 < number <= MAX_SIGNAL:
        raise ValueError(f"{number} is not a signal number (1..{MAX_SIGNAL})")
    if number in _UNCATCHABLE:
        raise ValueError(f"{signal_name(number)} cannot be caught, so it cannot dump: {_HINT}")
    if number not in usable_signals():
        raise ValueError(
            f"{signal_name(number)} ({number}) has a meaning of its own (it stops the process, "
            f"arrives in normal operation, or is faulthandler's own): {_HINT}"
        )
    return number


def install(sig: int) -> DumpHook:
    """Register this process's hook on ``sig`` (checked by ``check_dump_signal``), once.

    Later calls with the same signal return the same hook.

    Raises:
        ValueError: the process already has a hook on another signal, or something in it
            already handles ``sig`` (a Python handler of its own, native code, or another
            ``faulthandler.register``): the hook would take the signal from it.
        OSError: no temporary file could be made for the dumps.
    """
    global _state
    with _lock:
        if _state is not None:
            if _state[0] == sig:
                return DumpHook(sig, _state[1].fileno())
            raise ValueError(
                f"this process's stack-dump hook is on {signal_name(_state[0])}; a process "
                f"has one hook, so its clients must all use {signal_name(_state[0])}"
            )
        _check_not_handled(sig)
        file = _dump_file()
        try:
            faulthandler.register(sig, file=file, all_threads=True, chain=False)
        except (OSError, RuntimeError, ValueError) as e:
            file.close()
            raise ValueError(
                f"cannot register the stack-dump hook on {signal_name(sig)}: {e}"
            ) from e
        _state = (sig, file)
        return DumpHook(sig, file.fileno())


def current() -> Optional[DumpHook]:
    """Return this process's hook, or None when it has none."""
    state = _state
    return None if state is None else DumpHook(state[0], state[1].fileno())


def from_environment(
    *,
    protocol: int,
    pid: Optional[int],
    environ: Optional[Mapping[str, str]] = None,
    stacklevel: int = 1,
) -> Optional[DumpHook]:
    """Return the hook ``$FTIMER_DUMP_SIGNAL`` asks for, registered; None when it is unset,
    empty or "0", or names a signal the hook cannot use (a ``RuntimeWarning`` says why).

    A setting of the environment never fails a client: it warns and leaves the hook off.
    It is not read for a client that arms another process's timers (``pid``): the hook
    can only be in the process that registers it.

    Args:
        stacklevel: the frame a warning names, as ``warnings.warn``'s, counted from the
            caller of this function (1: the caller).
    """
    env = os.environ if environ is None else environ
    text = env.get(ENV_VAR, "")
    if pid is not None or text.strip() in ("", "0"):  # unset, or set to off
        return None
    if protocol == 1:
        _warn(
            f"{ENV_VAR} is ignored with protocol 1: torch's format cannot announce a hook",
            stacklevel + 1,
        )
        return None
    try:
        sig = check_dump_signal(text)
        return install(sig) if sig else None
    except (ValueError, OSError) as e:
        _warn(f"{ENV_VAR}={text!r}: {e}; stack dumps stay off", stacklevel + 1)
        return None


def after_fork_in_child() -> None:
    """Give a forked child a dump file of its own (or no hook, if none can be made).

    Runs in the child before its channels rebuild their lines from ``current()``.
    """
    global _lock, _state
    _lock = threading.Lock()  # another thread of the parent may have held it
    if _state is None:
        return
    sig, inherited = _state
    _state = None
    try:
        file = _dump_file()
    except OSError as e:
        # No file of its own: the child stops catching the signal rather than write into
        # its parent's file. It announces no hook, so no server sends it the signal.
        faulthandler.unregister(sig)
        _warn(f"no stack-dump file for the forked child {os.getpid()} ({e}); its hook is off", 1)
    else:
        # Same signal, already registered: this only points faulthandler at the new file.
        faulthandler.register(sig, file=file, all_threads=True, chain=False)
        _state = (sig, file)
    # The child's copy of the parent's descriptor; the parent's stays open.
    inherited.close()


def _dump_file() -> IO[bytes]:
    # Imported here: only a process with the hook pays for them (tempfile: ~6 ms).
    import fcntl  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    # Unbuffered: faulthandler writes to the descriptor itself, never through Python.
    # Open for the life of the process (the hook's file), so no context manager.
    file = tempfile.TemporaryFile(buffering=0, prefix="ftimer-dump-")  # noqa: SIM115
    try:
        flags = fcntl.fcntl(file.fileno(), fcntl.F_GETFL)
        fcntl.fcntl(file.fileno(), fcntl.F_SETFL, flags | os.O_APPEND)
    except OSError:
        file.close()
        raise
    return file


def _check_not_handled(sig: int) -> None:
    """Raises ValueError: something in this process already handles ``sig``."""
    handler = signal.getsignal(sig)
    if callable(handler):
        what = getattr(handler, "__qualname__", None) or repr(handler)
        raise ValueError(
            f"this process handles {signal_name(sig)} with a Python handler of its own "
            f"({what}); the stack-dump hook would replace it: {_HINT} that it does not use"
        )
    if _caught(sig):
        raise ValueError(
            f"this process already catches {signal_name(sig)} outside Python's signal module "
            f"(native code, or faulthandler.register); the stack-dump hook would replace its "
            f"handler: {_HINT} that it does not use"
        )


def _caught(sig: int) -> bool:
    """Whether the kernel says this process catches ``sig`` (``SigCgt``); False where
    there is no ``/proc``."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def _warn(message: str, stacklevel: int) -> None:
    # stacklevel counts from _warn's caller.
    warnings.warn(message, RuntimeWarning, stacklevel=stacklevel + 1)

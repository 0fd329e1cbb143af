"""Keeping the program's signals off the client's own work: CPython's raw signal mask and
handler functions, the signals a thread may block, and the helper threads that block them.
"""

from __future__ import annotations

import signal
import threading
from typing import Any, Callable, Tuple

__all__ = ["BLOCKABLE", "getsignal", "sigmask", "start_helper"]

#: ``pthread_sigmask()`` of CPython's ``_signal``, returning a set of ints. Not the
#: ``signal`` module's: that one wraps it in a Python function, and a signal handler may
#: run (and raise) as any Python function is entered, so a ``finally`` putting the mask
#: back through it could leave signals blocked in the thread for good. The C function
#: runs pending handlers only once it has changed the mask.
sigmask = getattr(signal, "_signal", signal).pthread_sigmask
#: The signals a thread blocks to keep them off itself: every one but those that cannot
#: be blocked and those a fault raises (one of those blocked kills the process at the
#: fault, without faulthandler's traceback).
BLOCKABLE = frozenset(signal.valid_signals()) - {
    signal.SIGKILL,
    signal.SIGSTOP,
    signal.SIGSEGV,
    signal.SIGBUS,
    signal.SIGFPE,
    signal.SIGILL,
    signal.SIGTRAP,
    signal.SIGSYS,
}
#: ``getsignal()`` of CPython's ``_signal``: the raw handler, where the ``signal``
#: module's makes an enum of it (about 1 us, at every protocol 1 message).
getsignal = getattr(signal, "_signal", signal).getsignal


def start_helper(target: Callable[..., None], args: Tuple[Any, ...], name: str) -> threading.Thread:
    """Start a daemon thread running ``target(*args)`` with the program's signals
    blocked (its first act).

    The program's signals then go to its own threads: a Python handler runs in the main
    thread only, and a SIGTERM the kernel gave a helper left the main thread in its
    blocking call (a ``time.sleep(60)``), its handler late by as much. Blocked in the
    thread, not around its start: ``Thread.start()`` waits in Python code, where a
    handler may run, and one that started a process then gave it every signal blocked.

    Raises:
        RuntimeError: no thread can start (``Thread.start()``'s).
    """
    thread = threading.Thread(target=_blocking, args=(target, *args), name=name, daemon=True)
    thread.start()
    return thread


def _blocking(target: Callable[..., None], *args: Any) -> None:
    sigmask(signal.SIG_BLOCK, BLOCKABLE)
    target(*args)

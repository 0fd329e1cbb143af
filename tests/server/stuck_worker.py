"""A worker that gets stuck on purpose, for the capture tests (run as a script).

    python stuck_worker.py KIND [--hook]

KIND is how it gets stuck: ``sleep`` (time.sleep), ``cgil`` (a C call that holds the
GIL), ``deadlock`` (two threads, two locks), ``busy`` (a Python loop), ``threads50`` (50
threads parked on an event), ``exit-on-hook`` (its SIGUSR2 handler exits), ``tree``
(children and grandchildren that keep forking), ``facts`` (a child, a socket pair, a
pipe and a named FIFO open). With ``--hook`` it registers ``faulthandler`` on SIGUSR2,
writing to an anonymous temporary file, as a client's dump hook would.

When stuck, it prints one JSON line on stdout: its pid, the hook file's descriptor, and
the native ids of its named threads. The stuck frames are in functions whose names the
tests look for (``stuck_in_sleep``, ``stuck_in_c``, ``take_a_then_b``, ...).
"""

from __future__ import annotations

import ctypes
import faulthandler
import json
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional

FOREVER = 600.0
tids: Dict[str, int] = {}


def ready(hook_fd: Optional[int], **extra: object) -> None:
    print(json.dumps({"pid": os.getpid(), "fd": hook_fd, "tids": tids, **extra}), flush=True)


def stuck_in_sleep() -> None:
    time.sleep(FOREVER)


def stuck_in_c() -> None:
    # PyDLL keeps the GIL during the call: no other thread runs Python meanwhile. A
    # signal handler (the dump hook's) cuts sleep() short, as it would many a C call:
    # loop, as C code that waits for something does.
    libc = ctypes.PyDLL(None)
    while True:
        libc.sleep(int(FOREVER))


def spin() -> None:
    n = 0
    while True:
        n += 1


def take_a_then_b(a: threading.Lock, b: threading.Lock, barrier: threading.Barrier) -> None:
    tids["left"] = threading.get_native_id()
    with a:
        barrier.wait()
        with b:
            pass


def take_b_then_a(a: threading.Lock, b: threading.Lock, barrier: threading.Barrier) -> None:
    tids["right"] = threading.get_native_id()
    with b:
        barrier.wait()
        with a:
            pass


def park(event: threading.Event, barrier: threading.Barrier) -> None:
    barrier.wait()
    event.wait()


def fork_forever(depth: int) -> None:
    """Keep forking: up to 4 live children each, every few milliseconds, to depth 3;
    the leaves exit soon, so their parents fork again. Never returns."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    if depth >= 3:
        time.sleep(0.02)
        os._exit(0)
    alive: List[int] = []
    while True:
        if len(alive) < 4:
            child = os.fork()
            if child == 0:
                fork_forever(depth + 1)
            alive.append(child)
        for pid in list(alive):
            if os.waitpid(pid, os.WNOHANG)[0]:
                alive.remove(pid)
        time.sleep(0.002)


def main(argv: List[str]) -> None:
    kind = argv[0]
    hook_fd = None
    if "--hook" in argv:
        dump = tempfile.TemporaryFile()  # noqa: SIM115 (open until the worker dies)
        faulthandler.register(signal.SIGUSR2, file=dump, all_threads=True)
        hook_fd = dump.fileno()
    if kind == "sleep":
        ready(hook_fd)
        stuck_in_sleep()
    elif kind == "cgil":
        ready(hook_fd)
        stuck_in_c()
    elif kind == "busy":
        ready(hook_fd)
        spin()
    elif kind == "sleep-beside-busy":  # a thread runs Python while the main one sleeps
        threading.Thread(target=spin, name="spinner", daemon=True).start()
        ready(hook_fd)
        stuck_in_sleep()
    elif kind == "deadlock":
        a, b = threading.Lock(), threading.Lock()
        barrier = threading.Barrier(3)
        for target, name in ((take_a_then_b, "left"), (take_b_then_a, "right")):
            threading.Thread(target=target, args=(a, b, barrier), name=name).start()
        barrier.wait()
        ready(hook_fd)
        stuck_in_sleep()
    elif kind.startswith("threads"):  # "threads50": 50 threads more, parked
        count = int(kind[len("threads") :])
        event = threading.Event()
        barrier = threading.Barrier(count + 1)
        for i in range(count):
            threading.Thread(target=park, args=(event, barrier), name=f"parked-{i}").start()
        barrier.wait()
        ready(hook_fd)
        stuck_in_sleep()
    elif kind == "exit-on-hook":
        signal.signal(signal.SIGUSR2, lambda *_: os._exit(3))
        ready(hook_fd)
        stuck_in_sleep()
    elif kind == "tree":
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children reaped by the kernel
        children = []
        for _ in range(2):
            child = os.fork()
            if child == 0:
                fork_forever(1)
            children.append(child)
        ready(hook_fd, children=children)
        stuck_in_sleep()
    elif kind == "forker":  # keeps forking children that live a second (a busy pool)
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)
        ready(hook_fd)
        while True:
            if os.fork() == 0:
                time.sleep(1.0)
                os._exit(0)
    elif kind == "facts":
        child = os.fork()
        if child == 0:
            with open("/proc/self/comm", "w") as comm:
                comm.write("data-worker")
            time.sleep(FOREVER)
            os._exit(0)
        left, right = socket.socketpair()
        r, w = os.pipe()
        fifo = os.path.join(tempfile.mkdtemp(), "fifo")
        os.mkfifo(fifo)
        named = os.open(fifo, os.O_RDWR)  # O_RDWR: a FIFO opened without waiting
        ready(hook_fd, child=child, keep=[left.fileno(), right.fileno(), r, w, named])
        stuck_in_sleep()
    else:
        raise SystemExit(f"unknown kind {kind!r}")


if __name__ == "__main__":
    main(sys.argv[1:])

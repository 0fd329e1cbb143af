"""The processes of a chaos run, one role per sub-command (``python workers.py ROLE ...``).

- ``healthy FIFO``: loops short ``expires`` blocks until its stdin closes, printing a
  JSON summary (blocks done, outage warnings, exceptions) every second and at the end,
  then exits 0: the proof that it stayed alive to the end.
- ``quiet FIFO``: arms and disarms when told on stdin, and writes nothing in between: a
  worker between two steps, for faults that hit just after a disarm.
- ``hung FIFO``: reads ``after`` from stdin, arms a timer and sleeps forever; it must be
  reaped. Prints the earliest its deadline can be.
- ``canary N``: a process with N extra threads that never arms anything; it must survive.

Every worker prints ``ready`` once its client is set up. Clients warn rather than raise
when the daemon is down (``on_unavailable="warn"``): the daemon is killed on purpose here,
and a worker counts the warnings instead of failing its step.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import signal
import sys
import threading
import time
import warnings
from typing import Dict, List, Optional

from ftimer_client import FileTimerClient, ServerUnavailableWarning, configure, expires

#: Seconds a healthy block's timer gives it; its work takes at most WORK seconds.
BLOCK_AFTER = 2.0
WORK = 0.03
#: Seconds between two summaries of a healthy worker.
REPORT_EVERY = 1.0


class Tally:
    """What a worker saw, safe to bump from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.blocks = 0
        self.warnings = 0
        self.errors: List[str] = []

    def block(self) -> None:
        with self._lock:
            self.blocks += 1

    def warning(self, *args: object, **kwargs: object) -> None:
        """A `warnings.showwarning` replacement: count instead of printing."""
        with self._lock:
            self.warnings += 1

    def error(self, e: BaseException) -> None:
        with self._lock:
            self.errors.append(repr(e)[:200])

    def summary(self) -> str:
        """The counts so far, as one JSON line."""
        with self._lock:
            return json.dumps(
                {"blocks": self.blocks, "warnings": self.warnings, "errors": self.errors}
            )


def count_warnings(tally: Tally) -> None:
    """Route every outage warning of the client to ``tally``."""
    warnings.simplefilter("always", ServerUnavailableWarning)
    warnings.showwarning = tally.warning


def say(line: str) -> None:
    """Tell the harness something (one line on stdout)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def healthy(fifo: str, protocol: int, threads: int, labels: Optional[Dict[str, str]]) -> int:
    """Loop ``expires`` blocks in ``threads`` threads until stdin closes."""
    tally = Tally()
    count_warnings(tally)
    client = FileTimerClient(fifo, protocol=protocol, on_unavailable="warn", labels=labels)
    configure(client)
    stop = threading.Event()
    started = threading.Barrier(threads + 1)

    def loop(seed: int) -> None:
        rng = random.Random(seed)
        first = True
        while not stop.is_set():
            try:
                with expires(after=BLOCK_AFTER) as block:
                    time.sleep(rng.uniform(0, WORK))  # the step's work
                    if rng.random() < 0.25:
                        block.beat()
                tally.block()
            except Exception as e:
                tally.error(e)
            if first:
                first = False
                started.wait()

    workers = [threading.Thread(target=loop, args=(os.getpid() * 100 + i,)) for i in range(threads)]
    for t in workers:
        t.start()
    started.wait()
    say("ready")
    # Until the harness closes stdin, a summary every second: a worker killed later
    # has still told what it saw.
    while not select.select([sys.stdin], [], [], REPORT_EVERY)[0] or os.read(0, 4096):
        say(tally.summary())
    stop.set()
    for t in workers:
        t.join()
    client.close()
    say(tally.summary())
    return 0


def quiet(fifo: str) -> int:
    """Obey stdin: ``arm AFTER`` arms scope "quiet" and prints ``armed LATEST`` (the
    latest its deadline can be), ``disarm`` disarms it and prints ``disarmed``. Between
    commands it writes nothing."""
    tally = Tally()
    count_warnings(tally)
    client = FileTimerClient(fifo, on_unavailable="warn")
    say("ready")
    for line in sys.stdin:
        command, *args = line.split()
        try:
            if command == "arm":
                client.arm("quiet", float(args[0]))
                say(f"armed {time.monotonic() + float(args[0])!r}")
            else:
                client.release("quiet")
                say("disarmed")
        except Exception as e:
            tally.error(e)
            say(f"error {e!r}")
    client.close()
    say(tally.summary())
    return 0


def hung(fifo: str) -> int:
    """Arm for the ``after`` read from stdin, print ``armed EARLIEST WARNED``, hang."""
    configure(FileTimerClient(fifo, on_unavailable="warn"))
    say("ready")
    after = float(sys.stdin.readline())
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", ServerUnavailableWarning)
        earliest = time.monotonic() + after
        with expires(after=after, scope="hung"):
            say(f"armed {earliest!r} {len(seen)}")
            while True:
                signal.pause()


def canary(threads: int) -> int:
    """Start ``threads`` idle threads, print ``ready``, live until killed."""
    idle = threading.Event()
    for _ in range(threads):
        threading.Thread(target=idle.wait, daemon=True).start()
    say("ready")
    while True:
        signal.pause()


def main(argv: Optional[List[str]] = None) -> int:
    """Run the role named on the command line."""
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="role", required=True)
    p = sub.add_parser("healthy")
    p.add_argument("fifo")
    p.add_argument("--protocol", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--labels", type=json.loads, default=None)
    sub.add_parser("quiet").add_argument("fifo")
    sub.add_parser("hung").add_argument("fifo")
    sub.add_parser("canary").add_argument("threads", type=int)
    args = parser.parse_args(argv)
    if args.role == "healthy":
        return healthy(args.fifo, args.protocol, args.threads, args.labels)
    if args.role == "quiet":
        return quiet(args.fifo)
    if args.role == "hung":
        return hung(args.fifo)
    return canary(args.threads)


if __name__ == "__main__":
    sys.exit(main())

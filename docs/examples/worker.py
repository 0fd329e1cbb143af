"""A worker that wraps one step in an ftimer watchdog timer.

    python docs/examples/worker.py --fifo /run/ftimer/timer.fifo --timeout 60 --work 5

The step ("work") just sleeps, in ``all_reduce`` (as a rank waiting for its peers in a
collective would) or, with ``--hang-in load_batch``, in a data loader. If it takes longer
than ``--timeout`` seconds, the ftimer-server watching the FIFO captures why (the stacks
of this worker and of the other ranks of its ``--job``), then reaps it (SIGKILL by
default).
"""

from __future__ import annotations

import argparse
import os
import time

from ftimer_client import FileTimerClient, configure, expires


def all_reduce(seconds: float) -> None:
    time.sleep(seconds)  # stands in for a collective waiting on a rank that never comes


def load_batch(seconds: float) -> None:
    time.sleep(seconds)  # stands in for a data loader stuck on a file system


def train_step(seconds: float, hang_in: str) -> None:
    {"all_reduce": all_reduce, "load_batch": load_batch}[hang_in](seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fifo", required=True, help="the server's FIFO")
    parser.add_argument("--timeout", type=float, required=True, help="seconds the step may take")
    parser.add_argument("--work", type=float, required=True, help="seconds the step takes")
    parser.add_argument("--name", default="worker", help="used in what this prints")
    parser.add_argument("--job", default="demo", help="the job label (ranks of a job are peers)")
    parser.add_argument("--rank", default="0", help="the rank label")
    parser.add_argument("--hang-in", default="all_reduce", choices=("all_reduce", "load_batch"))
    args = parser.parse_args()

    labels = {"name": args.name, "job": args.job, "rank": args.rank}
    # dump_signal: the server can have this worker dump its own stacks (without ptrace).
    configure(FileTimerClient(args.fifo, labels=labels, dump_signal="SIGUSR2"))
    with expires(after=args.timeout, scope="step"):
        print(
            f"{args.name} (pid {os.getpid()}, rank {args.rank}): armed a {args.timeout:g} s "
            f"timer; the step takes {args.work:g} s",
            flush=True,
        )
        train_step(args.work, args.hang_in)
    print(f"{args.name} (pid {os.getpid()}): step done, timer disarmed", flush=True)


if __name__ == "__main__":
    main()

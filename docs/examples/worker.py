"""A worker that wraps one step in an ftimer watchdog timer.

    python docs/examples/worker.py --fifo /run/ftimer/timer.fifo --timeout 60 --work 5

The step ("work") just sleeps. If it takes longer than ``--timeout`` seconds, the
ftimer-server watching the FIFO reaps this process (SIGKILL by default).
"""

from __future__ import annotations

import argparse
import os
import time

from ftimer_client import FileTimerClient, configure, expires


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fifo", required=True, help="the server's FIFO")
    parser.add_argument("--timeout", type=float, required=True, help="seconds the step may take")
    parser.add_argument("--work", type=float, required=True, help="seconds the step takes")
    parser.add_argument("--name", default="worker", help="used in what this prints")
    args = parser.parse_args()

    configure(FileTimerClient(args.fifo, labels={"name": args.name}))
    with expires(after=args.timeout, scope="step"):
        print(
            f"{args.name} (pid {os.getpid()}): armed a {args.timeout:g} s timer; "
            f"the step takes {args.work:g} s",
            flush=True,
        )
        time.sleep(args.work)
    print(f"{args.name} (pid {os.getpid()}): step done, timer disarmed", flush=True)


if __name__ == "__main__":
    main()

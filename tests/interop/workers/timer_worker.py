"""A worker process for the client/server interop tests.

``timer_worker.py {torch,ftimer} FIFO {stuck,on-time} AFTER [--scope S] [--signal N]
[--protocol 1|2]``

The timer API is torch's (``torch.distributed.elastic.timer``) or ftimer's
(``ftimer_client``), used the same way: ``configure(FileTimerClient(FIFO, ...))`` then
``expires(after=AFTER)``, with the call-site scope unless ``--scope`` is given.

- ``stuck``: arms one timer and hangs inside it; the server must reap it.
- ``on-time``: runs five short blocks, each armed for AFTER seconds, then stays alive
  outside any block for longer than AFTER before exiting 0: had a release been lost, the
  server would reap it meanwhile.

It prints ``armed PID`` once its first timer is armed, and ``done`` before exiting.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Dict, List


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("api", choices=["torch", "ftimer"])
    parser.add_argument("fifo")
    parser.add_argument("mode", choices=["stuck", "on-time"])
    parser.add_argument("after", type=float)
    parser.add_argument("--scope")
    parser.add_argument("--signal", type=int)
    parser.add_argument("--protocol", type=int)
    args = parser.parse_args(argv)

    if args.api == "torch":
        from torch.distributed.elastic import timer
    else:
        import ftimer_client as timer
    options: Dict[str, Any] = {}
    if args.signal is not None:
        options["signal"] = args.signal
    if args.protocol is not None:
        options["protocol"] = args.protocol
    timer.configure(timer.FileTimerClient(args.fifo, **options))

    if args.mode == "stuck":
        with timer.expires(after=args.after, scope=args.scope):  # the stuck scope
            print(f"armed {os.getpid()}", flush=True)
            time.sleep(120)
        return 1  # not reaped
    for step in range(5):
        with timer.expires(after=args.after, scope=args.scope):  # the on-time scope
            if step == 0:
                print(f"armed {os.getpid()}", flush=True)
            time.sleep(0.05)
    time.sleep(args.after + 0.5)
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""A program written for torch's timer API only: a server watching two worker processes.

It is what an agent embedding torch's watchdog looks like: ``FileTimerServer`` in the
parent, ``configure``/``FileTimerClient``/``expires`` in spawned workers. Both workers
run three short steps; then "hung" hangs in a step and "ok" outlives all its deadlines.
The program prints the workers' exit codes as JSON: ``{"hung": ..., "ok": ...}``.

test_drop_in.py runs it as it is, and with its import of torch's timer (only that line)
replaced by the same names from ``ftimer_client`` and ``ftimer_server``.
"""

from __future__ import annotations

import json
import multiprocessing
import signal
import sys
import time

from torch.distributed.elastic.timer import FileTimerClient, FileTimerServer, configure, expires


def worker(file_path, hang):
    configure(FileTimerClient(file_path, signal=signal.SIGTERM))
    for _ in range(3):
        with expires(after=1):
            time.sleep(0.05)
    with expires(after=1, scope="last step"):
        if hang:
            time.sleep(60)
    time.sleep(1.5)  # alive past every deadline: a lost release would get it reaped


def main(file_path):
    server = FileTimerServer(file_path, "job", max_interval=0.1)
    server.start()
    context = multiprocessing.get_context("spawn")
    workers = {
        name: context.Process(target=worker, args=(file_path, name == "hung"))
        for name in ("hung", "ok")
    }
    for process in workers.values():
        process.start()
    for process in workers.values():
        process.join(60)
    print(json.dumps({name: p.exitcode for name, p in workers.items()}), flush=True)
    server.stop()


if __name__ == "__main__":
    main(sys.argv[1])

"""torch 2.13's own ``FileTimerServer`` in a process of its own: ``torch_server.py FIFO``.

After every reap torch's server signals its own process too, so it never runs in the
test process. Each ``log_event`` call is printed as a JSON line
``{"name": ..., "request": {...} | null}``; ``ready`` is printed once a client can open
the FIFO.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import threading
import time
from typing import Any, List, Optional

from torch.distributed.elastic.timer import FileTimerServer


def log_event(name: str, request: Optional[Any]) -> None:
    body = None if request is None else json.loads(request.to_json())
    print(json.dumps({"name": name, "request": body}), flush=True)


def wait_for_reader(path: str, timeout: float = 30.0) -> None:
    """Return once the server's thread has the FIFO open for reading."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            return
        except OSError as e:
            if e.errno != errno.ENXIO or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def main(argv: List[str]) -> int:
    server = FileTimerServer(argv[0], run_id="interop", max_interval=0.1, log_event=log_event)
    server.start()
    wait_for_reader(argv[0])
    print("ready", flush=True)
    threading.Event().wait()  # until reaped by itself, or ended by the test
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""One server of the bench's, driven over stdin/stdout: ``python serve.py ftimer|torch|floor
PATH`` (see ``bench_server.py``).

Apart from the driver's module so that the process holds what the server needs and no more:
its RSS is the server's, not the driver's imports (``statistics``, ``subprocess``, ...).
"""

from __future__ import annotations

import os
import select
import socket
import sys
import threading
import time
from typing import Any


def serve(kind: str, path: str) -> None:
    """Run one server and answer the driver's commands (one per line on stdin)."""
    if kind == "floor":
        server = _Receiver(path)

        def count() -> int:
            return server.count

        ok = count

        def armed() -> int:
            raise NotImplementedError("the floor's reader keeps no timers")

        junk = armed

    elif kind == "ftimer":
        from ftimer_protocol import socket_path_for
        from ftimer_server import FileTimerServer

        server: Any = FileTimerServer(path, socket_path=socket_path_for(path))

        def count() -> int:
            requests = server.stats().requests
            return sum(sum(v.values()) for k, v in requests.items() if k != "sync")

        def ok() -> int:
            requests = server.stats().requests
            return sum(v.get("ok", 0) for k, v in requests.items() if k != "sync")

        def armed() -> int:
            return int(server.stats().armed)

        def junk() -> int:
            return sum(server.stats().decode_errors.values())

    else:
        from torch.distributed.elastic.timer import FileTimerServer as TorchServer

        reap = TorchServer._reap_worker

        def _reap_worker(self: Any, worker_pid: int, signal: int) -> bool:
            # torch 2.13 kills its own process after every reap: not in a benchmark.
            return True if worker_pid == os.getpid() else bool(reap(self, worker_pid, signal))

        TorchServer._reap_worker = _reap_worker  # type: ignore[method-assign]
        server = TorchServer(path, "bench", max_interval=0.1, daemon=True)

        def count() -> int:
            return int(server._request_count)

        ok = count

        def armed() -> int:
            return len(server._timers)

        def junk() -> int:
            raise NotImplementedError("torch's server does not count bad lines")

    server.start()
    print("ready", flush=True)
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "wait":  # until `count` requests were applied: print when (monotonic)
            target, give_up = int(args[0]), time.monotonic() + 60
            while count() < target and time.monotonic() < give_up:
                time.sleep(0.0005)
            print(f"{time.monotonic()} {count()} {ok()}", flush=True)
        elif cmd == "junk":  # until `n` invalid lines were counted (ftimer only)
            target, give_up = int(args[0]), time.monotonic() + 60
            while junk() < target and time.monotonic() < give_up:
                time.sleep(0.0005)
            print(f"{time.monotonic()} {junk()}", flush=True)
        elif cmd == "armed":
            print(armed(), flush=True)
        elif cmd == "quit":
            break
    server.stop()


class _Receiver:
    """The socket's floor: a thread receiving datagrams as ftimer's server does (one
    ``recvmsg()`` each, with ``SO_PASSCRED`` and ``SO_PASSPIDFD``, the pidfd closed),
    counting them and nothing more."""

    def __init__(self, path: str) -> None:
        self.count = 0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_PASSPIDFD", 76), 1)
        self._sock.bind(path)
        self._sock.setblocking(False)

    def start(self) -> None:
        threading.Thread(target=self._run, daemon=True).start()

    def stop(self) -> None:
        self._sock.close()

    def _run(self) -> None:
        recvmsg, close = self._sock.recvmsg, os.close
        space = socket.CMSG_SPACE(12) + 2 * socket.CMSG_SPACE(4)
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN)
        while True:
            poller.poll()
            while True:
                try:
                    _, ancillary, _, _ = recvmsg(select.PIPE_BUF + 1, space)
                except BlockingIOError:
                    break
                except OSError:  # closed by stop()
                    return
                for _, kind, data in ancillary:
                    if kind != socket.SCM_CREDENTIALS:  # a pidfd
                        close(int.from_bytes(data[:4], sys.byteorder))
                self.count += 1


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2])

"""What the chaos harness throws at the daemon: junk, partial lines, hostile requests,
a full pipe, damaged state files. Builders here are pure (bytes out); the few writes go
through `FifoWriter`, whole lines in atomic writes of at most PIPE_BUF bytes.
"""

from __future__ import annotations

import errno
import json
import os
import random
import select
import time
from collections.abc import Callable, Iterable, Sequence
from typing import List, Tuple

__all__ = [
    "FifoWriter",
    "HOSTILE_SIGNALS",
    "PIPE_BUF",
    "damage_state",
    "hostile_lines",
    "junk_lines",
    "mixed_junk",
    "partial_lines",
    "sync_lines",
]

PIPE_BUF = select.PIPE_BUF
#: Signals a hostile request asks for: a real one, "report only", and two that are none.
HOSTILE_SIGNALS = (9, 0, 65, -1)


def mixed_junk(size: int, rng: random.Random) -> bytes:
    """About ``size`` bytes of assorted invalid lines, each ending in a newline."""
    kinds: List[Callable[[], bytes]] = [
        lambda: bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 200))).replace(
            b"\n", b"?"
        ),
        lambda: b"z" * rng.randrange(PIPE_BUF + 1, 3 * PIPE_BUF),  # over-long
        lambda: b'{"version":2,"op":"arm"}',  # fields missing
        lambda: b'{"version":3,"op":"arm","pid":5}',  # unknown version
        lambda: b'{"version":2,"op":"arm","pid":1e400,"scope_id":"x","deadline":0,"signal":9}',
        lambda: b'{"version":2,"op":"disarm_all",',  # an object cut at a newline ...
        lambda: b'"pid":2}',  # ... and its second half
        lambda: b"[" * 2000 + b"]" * 2000,  # deep nesting
        lambda: b"\xff\xfe\x00{" + b"\x80" * 50,  # not UTF-8
        lambda: b'{"version":2,"op":"sync","token":"' + b"t" * 200 + b'"',  # unterminated
    ]
    out = bytearray()
    while len(out) < size:
        out += rng.choice(kinds)() + b"\n"
    return bytes(out)


def junk_lines(data: bytes) -> int:
    """How many lines the daemon will see in ``data`` (blank ones are not junk)."""
    return sum(1 for line in data.split(b"\n")[:-1] if line.strip(b" \t\r"))


def partial_lines(victims: Sequence[int], rng: random.Random, count: int) -> List[bytes]:
    """``count`` lines cut short (no newline), as a writer dying mid-line leaves them.

    Some are the start of a request that would reap one of ``victims``: what the next
    writer appends must never complete it into something that signals them.
    """
    out: List[bytes] = []
    for _ in range(count):
        pid = rng.choice(victims)
        full = json.dumps(
            {"version": 2, "op": "expire", "pid": pid, "scope_id": "x", "signal": 9},
            separators=(",", ":"),
        ).encode()
        choices = [
            full[: rng.randrange(1, len(full) - 1)],
            b"y" * rng.randrange(1, 100),
            b'{"version":2,"op":"arm","pid":%d,"scope_id":"x","labels":{"version' % pid,
        ]
        out.append(rng.choice(choices))
    return out


def hostile_lines(targets: Iterable[int]) -> List[bytes]:
    """Requests to reap each of ``targets`` with each of `HOSTILE_SIGNALS`, in three forms:
    version 2 ``expire`` ("reap me now"), version 2 ``arm`` with a deadline long past, and
    torch's version 1 with an expiration time long past."""
    lines: List[bytes] = []
    for pid in targets:
        for sig in HOSTILE_SIGNALS:
            for doc in (
                {"version": 2, "op": "expire", "pid": pid, "scope_id": "x", "signal": sig},
                {
                    "version": 2,
                    "op": "arm",
                    "pid": pid,
                    "scope_id": "x",
                    "deadline": 0,
                    "signal": sig,
                },
                {"version": 1, "pid": pid, "scope_id": "x", "expiration_time": 0, "signal": sig},
            ):
                lines.append(json.dumps(doc, separators=(",", ":")).encode() + b"\n")
    return lines


def sync_lines(count: int) -> List[bytes]:
    """``count`` valid lines that change nothing (sync markers nobody waits for)."""
    return [b'{"version":2,"op":"sync","token":"chaos-fill-%d"}\n' % i for i in range(count)]


def damage_state(path: str, how: str, rng: random.Random) -> str:
    """Damage the state file at ``path``; return what was done, for the log.

    Args:
        how: ``corrupt`` (random bytes), ``truncated`` (its first half) or ``bad-entry``
            (one invalid timer added among the valid ones).
    """
    with open(path, "rb") as f:
        data = f.read()
    if how == "corrupt":
        new = bytes(rng.getrandbits(8) for _ in range(max(64, len(data))))
    elif how == "truncated":
        new = data[: len(data) // 2]
    elif how == "bad-entry":
        doc = json.loads(data)
        doc["timers"].insert(
            0, {"op": "arm", "pid": -5, "scope_id": "x", "deadline": -1.0, "signal": 9}
        )
        new = json.dumps(doc).encode()
    else:
        raise ValueError(how)
    with open(path, "wb") as f:
        f.write(new)
    return f"{how}: {len(data)} -> {len(new)} bytes"


class FifoWriter:
    """A write end of the FIFO, as a worker holds it: one atomic ``write()`` per batch."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)

    def write_lines(self, lines: Iterable[bytes], timeout: float = 30.0) -> int:
        """Write ``lines`` in batches of at most PIPE_BUF bytes (so none is split),
        waiting for room when the pipe is full; return the bytes written.

        Raises:
            TimeoutError: no room for ``timeout`` seconds.
        """
        written = 0
        for batch in _batches(lines):
            self._write_whole(batch, timeout)
            written += len(batch)
        return written

    def fill(self, lines: Sequence[bytes]) -> Tuple[int, int]:
        """Write batches of ``lines`` (cycled) until the pipe is full; return (bytes,
        lines) written."""
        written = count = 0
        # Whole batches while they fit, then single lines: a full pipe has no room left
        # for even the shortest message.
        for chunks in (_batches(lines), list(lines)):
            i = 0
            while True:
                chunk = chunks[i % len(chunks)]
                try:
                    os.write(self.fd, chunk)
                except BlockingIOError:
                    break
                written += len(chunk)
                count += chunk.count(b"\n")
                i += 1
        return written, count

    def _write_whole(self, batch: bytes, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                os.write(self.fd, batch)  # at most PIPE_BUF: all or nothing
                return
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([], [self.fd], [], left)[1]:
                    raise TimeoutError(errno.EAGAIN, "the FIFO stayed full") from None

    def close(self) -> None:
        """Close the write end."""
        os.close(self.fd)


def _batches(lines: Iterable[bytes]) -> List[bytes]:
    out: List[bytes] = []
    current = b""
    for line in lines:
        if len(current) + len(line) > PIPE_BUF:
            out.append(current)
            current = b""
        current += line
    if current:
        out.append(current)
    return out

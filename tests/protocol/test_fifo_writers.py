"""Many real processes writing into one real FIFO at once: nothing lost, nothing torn."""

from __future__ import annotations

import os
import pathlib
import selectors
import subprocess
import sys
import tempfile
import time
from collections import Counter
from typing import List, Tuple

from hypothesis import given, settings
from hypothesis import strategies as st

from ftimer_protocol import PIPE_BUF, Arm, Message, RemoteProtocolError, StreamDecoder, encode

WRITER = """
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY)
for line in open(sys.argv[2], "rb").read().split(b"\\0"):
    if line:
        assert os.write(fd, line) == len(line)
"""


def _message_of_size(pid: int, seq: int, size: int) -> bytes:
    base = len(encode(Arm(pid=pid, scope_id=f"{seq}:", deadline=1.0, signal=9)))
    scope = f"{seq}:" + "é" * ((size - base) // 2) + "x" * ((size - base) % 2)
    line = encode(Arm(pid=pid, scope_id=scope, deadline=1.0, signal=9))
    assert len(line) == size
    return line


def _run_writers(batches: List[List[bytes]]) -> Tuple[List[Message], int]:
    """Start one writer process per batch; read until they exit; return what was decoded."""
    with tempfile.TemporaryDirectory(prefix="ftimer-") as tmp:
        return _run_writers_in(pathlib.Path(tmp), batches)


def _run_writers_in(tmp: pathlib.Path, batches: List[List[bytes]]) -> Tuple[List[Message], int]:
    fifo = tmp / "timer.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    keepalive = os.open(fifo, os.O_WRONLY)  # no EOF while writers come and go
    procs = []
    for i, batch in enumerate(batches):
        data = tmp / f"batch{i}"
        data.write_bytes(b"\0".join(batch))
        procs.append(subprocess.Popen([sys.executable, "-c", WRITER, str(fifo), str(data)]))
    decoder = StreamDecoder()
    decoded: List[Message] = []
    errors = 0
    deadline = time.monotonic() + 60
    with selectors.DefaultSelector() as sel:
        sel.register(reader, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            finished = all(p.poll() is not None for p in procs)
            if sel.select(timeout=0.05):
                while True:
                    try:
                        chunk = os.read(reader, 1 << 16)
                    except BlockingIOError:
                        break
                    for r in decoder.feed(chunk):
                        if isinstance(r, RemoteProtocolError):
                            errors += 1
                        else:
                            decoded.append(r)
            elif finished:
                break  # every writer is done and the pipe is drained
    os.close(keepalive)
    os.close(reader)
    assert [p.wait(timeout=10) for p in procs] == [0] * len(procs)
    return decoded, errors


@settings(max_examples=5)
@given(sizes=st.lists(st.integers(100, PIPE_BUF), min_size=1, max_size=6))
def test_concurrent_writers_lose_and_tear_nothing(sizes: List[int]) -> None:
    writers, per_writer = 4, 300
    batches = [
        [_message_of_size(1000 + w, i, sizes[i % len(sizes)]) for i in range(per_writer)]
        for w in range(writers)
    ]
    decoded, errors = _run_writers(batches)
    assert errors == 0
    assert len(decoded) == writers * per_writer
    # Byte-identical: re-encoding is deterministic, so compare the lines themselves.
    assert Counter(encode(m) for m in decoded) == Counter(line for b in batches for line in b)


@settings(max_examples=3)
@given(
    sizes=st.lists(st.integers(100, PIPE_BUF), min_size=1, max_size=4),
    junk=st.lists(st.binary(min_size=1, max_size=3 * PIPE_BUF), min_size=1, max_size=20),
)
def test_garbage_writers_cost_no_valid_message(sizes: List[int], junk: List[bytes]) -> None:
    valid = [
        [_message_of_size(2000 + w, i, sizes[i % len(sizes)]) for i in range(200)] for w in range(3)
    ]
    garbage = [junk * 10, [j.replace(b"\n", b"") or b"z" for j in junk] * 10]
    decoded, _ = _run_writers(valid + garbage)
    sent = Counter(line for b in valid for line in b)
    received = Counter(encode(m) for m in decoded)
    # Every valid message arrives intact; junk may decode to nothing else but junk.
    assert received & sent == sent

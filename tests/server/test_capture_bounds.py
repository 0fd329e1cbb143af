"""What one capture may hold, and one incident may take, whatever the worker makes of its
stacks: threads, frames and names are capped, py-spy's output is held only in part, the
record is cut to the store's budget, and each says what was cut.

py-spy is a stand-in script printing JSON shaped as ``py-spy dump --json`` prints it
(pretty, two spaces). The only process these tests start is a sleeping Python, in a
session of its own, killed at the end of each test; nothing else is signalled.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import List

import msgspec
import pytest

from ftimer_server.core._incident import Capture, Frame, Incident, ThreadStack
from ftimer_server.incidents import _tools
from ftimer_server.incidents._capture import CaptureOptions, capture
from ftimer_server.incidents._helper import WriteJob, run_write
from ftimer_server.incidents._stack_formats import (
    MAX_ARGS,
    MAX_CAPTURE_TEXT,
    MAX_FRAMES,
    MAX_RAW,
    MAX_TEXT,
    MAX_THREADS,
    bound_threads,
)
from ftimer_server.incidents._tools import PY_SPY_KEPT

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc")


@contextlib.contextmanager
def sleeper(*args: str) -> Iterator[int]:
    """A sleeping Python (with ``args``), in a session of its own; its pid, once it runs
    (before its exec, /proc shows no command line of its own)."""
    script = "import time; print('ready', flush=True); time.sleep(60)"
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *args], start_new_session=True, stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        yield proc.pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: ours alone
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def fake_py_spy(tmp_path: pathlib.Path, threads: List[dict]) -> str:
    """A py-spy that prints ``threads`` as ``py-spy dump --json`` does."""
    out = tmp_path / "dump.json"
    out.write_text(json.dumps(threads, indent=2) + "\n")
    path = tmp_path / "py-spy"
    path.write_text(f"#!/bin/sh\nexec cat {out}\n")
    path.chmod(0o755)
    return str(path)


def thread(tid: int, depth: int, name: str = "f", file: str = "/w/train.py") -> dict:
    frame = {"name": name, "filename": file, "module": None, "short_filename": "train.py"}
    return {
        "pid": 1,
        "thread_id": tid,
        "thread_name": None,
        "os_thread_id": tid,
        "active": False,
        "owns_gil": False,
        "frames": [dict(frame, line=n + 1) for n in range(depth)],
    }


def run(pid: int, py_spy: str) -> Capture:
    return capture(
        pid,
        None,
        None,
        role="stuck",
        labels=None,
        hook=None,
        options=CaptureOptions(py_spy=py_spy, hook=False),
        deadline=time.monotonic() + 20,
    )


def check_bounds(c: Capture) -> None:
    assert len(c.threads) <= MAX_THREADS
    assert len(c.raw) <= MAX_RAW + 100
    text = 0
    for t in c.threads:
        assert len(t.frames) <= MAX_FRAMES
        assert len(t.name) <= MAX_TEXT
        for f in t.frames:
            assert len(f.function) <= MAX_TEXT
            assert len(f.file) <= MAX_TEXT
            text += len(f.function) + len(f.file)
    assert text <= MAX_CAPTURE_TEXT
    # What the helper sends the server, and what goes into the incident.
    assert len(msgspec.msgpack.encode(c)) < 2 * MAX_CAPTURE_TEXT


def test_threads_frames_and_names_are_capped_and_said(tmp_path: pathlib.Path) -> None:
    with sleeper() as pid:
        # 400 threads, then the main thread last (as py-spy lists it), 1000 frames deep
        # in functions with names of 1000 characters: ~2 MiB of output, all held.
        many = [thread(100_000 + n, 3) for n in range(400)]
        main = thread(pid, 1000, name="g" * 1000, file="/" + "d" * 999)
        c = run(pid, fake_py_spy(tmp_path, [*many, main]))
    assert c.method == "py-spy", c.error
    check_bounds(c)
    tids = {t.tid for t in c.threads}
    assert pid in tids  # the main thread is kept first
    assert len(c.threads) == MAX_THREADS
    assert c.threads_cut == 401 - MAX_THREADS  # py-spy's 401 (/proc's one is the main)
    shown = next(t for t in c.threads if t.tid == pid)
    assert shown.frames
    assert shown.frames[0].line == 1
    assert shown.frames_cut == 1000 - len(shown.frames)
    assert shown.frames[0].function.startswith("ggg")
    assert shown.frames[0].function.endswith("...")
    assert c.error is not None
    assert f"{c.threads_cut} threads not shown" in c.error
    assert f"frames cut to the innermost {MAX_FRAMES} in 1 threads" in c.error


def test_threads_beyond_those_read_are_counted_and_the_busy_ones_kept() -> None:
    # A worker of 15,002 threads, py-spy killed at its deadline: /proc read 4096 of them,
    # and "3840 threads not shown" was said where 14,746 were. And a thread in
    # uninterruptible sleep (D) among idle ones was left out as any other.
    threads = [ThreadStack(tid=1000 + n, state="S") for n in range(600)]
    threads.append(ThreadStack(tid=9000, state="D"))
    kept, dropped, notes = bound_threads(threads, 1000, total=15_002)
    assert dropped == 15_002 - MAX_THREADS
    assert f"{15_002 - MAX_THREADS} threads not shown" in notes[0]
    assert {1000, 9000} <= {t.tid for t in kept}


def test_py_spy_output_is_held_in_part(tmp_path: pathlib.Path) -> None:
    with sleeper() as pid:
        # 200 threads of 200 frames: ~7 MiB of output, more than is held; the first
        # threads and the last (the main thread) are whole in what is.
        many = [thread(100_000 + n, 200, name="f" * 40) for n in range(200)]
        c = run(pid, fake_py_spy(tmp_path, [*many, thread(pid, 5, name="main_loop")]))
    size = (tmp_path / "dump.json").stat().st_size
    assert size > PY_SPY_KEPT
    assert c.method == "py-spy", c.error
    check_bounds(c)
    tids = {t.tid for t in c.threads}
    assert 100_000 in tids
    assert next(t for t in c.threads if t.tid == pid).frames[0].function == "main_loop"
    assert 100_100 not in tids  # in the middle, not held
    assert c.error is not None
    assert f"py-spy's output ({size} bytes) was more than the {PY_SPY_KEPT} kept" in c.error
    assert "stacks of" in c.error
    assert "cut short or not shown" in c.error


def test_a_cut_dump_gives_its_lone_thread_to_no_one_by_elimination(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # py-spy without kernel thread ids (a peer on Python 3.9 or 3.10), its output over the
    # limit: the one thread whole in its start, the newest, was taken for the main thread
    # (the one ident left over), and its stack shown as the main thread's.
    monkeypatch.setattr(_tools, "MAX_OUTPUT", 1 << 20, raising=False)
    with sleeper() as pid:
        threads = [dict(thread(0, 5000, name=f"t{n}"), os_thread_id=None) for n in range(3)]
        for n, t in enumerate(threads):
            t["thread_id"] = 0x7F0000000000 + (n << 24)  # no stack mapping of the sleeper's
        c = run(pid, fake_py_spy(tmp_path, threads))
    assert c.method == "py-spy", c.error
    assert c.error is not None
    assert "py-spy wrote more than 1048576 bytes" in c.error
    [kept] = [t for t in c.threads if t.frames]
    assert kept.frames[0].function == "t0"
    assert kept.tid == 0
    assert not next(t for t in c.threads if t.tid == pid).frames


def test_command_line_is_capped() -> None:
    with sleeper(*(["x" * 5000] * 300)) as pid:
        c = capture(
            pid,
            None,
            None,
            role="stuck",
            labels=None,
            hook=None,
            options=CaptureOptions(hook=False),
            deadline=time.monotonic() + 5,
        )
    assert c.facts is not None
    assert len(c.facts.cmdline) == MAX_ARGS + 1
    assert all(len(a) <= MAX_TEXT for a in c.facts.cmdline)
    assert c.facts.cmdline[-1] == f"[... {303 - MAX_ARGS} more arguments]"


def test_an_incident_is_cut_to_the_stores_budget(tmp_path: pathlib.Path) -> None:
    frames = [Frame("f" * 100, "/" + "d" * 100, n) for n in range(200)]
    threads = [ThreadStack(tid=n, frames=frames) for n in range(1, 41)]
    incident = Incident(
        id="20261203T000000.000Z-1-step",
        host="h",
        created=1.0,
        pid=1,
        scope_id="step",
        signal=9,
        deadline=0.0,
        captures=[Capture(pid=p, method="py-spy", threads=threads) for p in (1, 2)],
    )
    assert len(msgspec.json.encode(incident)) > 3_000_000
    max_bytes = 1_000_000
    answer = run_write(WriteJob(incident, (str(tmp_path), 10, max_bytes), want=True))
    record = tmp_path / f"{incident.id}.json"
    assert record.stat().st_size <= max_bytes // 2
    sizes = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert sizes <= max_bytes
    written = msgspec.msgpack.decode(answer, type=Incident)
    assert any(
        f"was more than the {max_bytes // 2} an incident may take" in e for e in written.errors
    )
    kept = written.captures[0].threads[0]
    assert kept.frames
    assert kept.frames[0].line == 0
    assert kept.frames_cut == 200 - len(kept.frames)

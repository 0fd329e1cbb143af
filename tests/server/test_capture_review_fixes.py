"""The capture as a hostile stuck worker meets it: a dump hook's output made to hold the
capture helper (a frame line built for the regex to backtrack on, a line number of
thousands of digits, megabytes of frames from many workers at once), and a worker of
thousands of threads against a short deadline. Real workers, their own hook files and
signals (SIGUSR2, which each worker catches); nothing else is signalled.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest

from ftimer_protocol import DumpHook
from ftimer_server.core._incident import Capture
from ftimer_server.incidents._capture import CaptureOptions, capture
from ftimer_server.incidents._procfs import read_threads
from ftimer_server.incidents._stack_formats import (
    MAX_FRAMES,
    MAX_THREADS,
    parse_faulthandler,
    parsing,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc")

HEADER = "Current thread 0x00007f0000000000 (most recent call first):\n"


def test_a_frame_line_built_to_backtrack_is_parsed_at_once() -> None:
    # A name of spaces then one character: `in (?P<function>.*?)\s*$` backtracked
    # quadratically (16,000 spaces: 0.76 s; these 400,000: hours), in C, holding the
    # capture helper's GIL: every capture of the host, and every incident write, waited.
    script = textwrap.dedent(
        f"""
        from ftimer_server.incidents._stack_formats import _cut, parse_faulthandler
        [thread] = parse_faulthandler({HEADER!r} + '  File "a.py", line 1 in '
                                      + " " * 400_000 + "x\\n")
        print(thread.frames[0].line, thread.frames[0].function == _cut(" " * 400_000 + "x"))
        """
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        pytest.fail("parsing one hostile frame line took over 30 s")
    assert (done.returncode, done.stdout) == (0, "1 True\n"), done.stderr


def test_a_line_number_of_thousands_of_digits_costs_only_its_own_number() -> None:
    # int() of it raised ValueError on Python 3.11+ (its digit limit), out of the parse:
    # the capture was lost whole, the worker's /proc facts with it.
    hung = '  File "a.py", line ' + "7" * 5000 + " in hung\n"
    text = HEADER + hung + '  File "a.py", line 3 in main\n'
    [thread] = parse_faulthandler(text)
    assert [(f.function, f.line) for f in thread.frames] == [("hung", 0), ("main", 3)]


def test_a_dump_is_parsed_to_its_bounds_whatever_its_size() -> None:
    # 4 MiB of frame lines (the most of a dump read) became 155,000 frames before any was
    # dropped, per worker, and every worker's at once: the helper reached 600 MiB.
    frames = "".join(f'  File "a.py", line {n} in f{n}\n' for n in range(MAX_FRAMES + 50))
    [thread] = parse_faulthandler(HEADER + frames)
    assert [f.line for f in thread.frames] == list(range(MAX_FRAMES))  # the innermost
    assert thread.cut == 50
    many = parse_faulthandler(HEADER * (MAX_THREADS + 10))
    assert len(many) == MAX_THREADS


# A worker whose hook is faulthandler on SIGUSR2, writing to a file it holds open; prints
# the file's descriptor.
HOOKED = r"""
import faulthandler, os, signal, sys, tempfile, time
fd, path = tempfile.mkstemp()
os.unlink(path)
faulthandler.register(signal.SIGUSR2, file=fd, all_threads=True)
print(fd, flush=True)
time.sleep(60)
"""


@contextlib.contextmanager
def hooked_worker() -> Iterator[tuple[int, int]]:
    """A worker with its dump hook: (pid, the hook file's descriptor in it)."""
    worker = subprocess.Popen([sys.executable, "-c", HOOKED], stdout=subprocess.PIPE)
    try:
        assert worker.stdout is not None
        yield worker.pid, int(worker.stdout.readline())
    finally:
        worker.kill()
        worker.wait()
        if worker.stdout is not None:
            worker.stdout.close()


def hook_capture(pid: int, fd: int, seconds: float) -> Capture:
    """A capture of ``pid`` by its dump hook (on ``fd``), within ``seconds``."""
    return capture(
        pid,
        None,
        None,
        role="stuck",
        labels=None,
        hook=DumpHook(signal=12, fd=fd),
        options=CaptureOptions(py_spy=None, hook=True),
        deadline=time.monotonic() + seconds,
    )


def test_a_dump_is_read_and_parsed_two_at_a_time() -> None:
    # As py-spy's output is: with both turns taken (two other captures parsing), the
    # dump is not read until one is free, and never past the deadline.
    with hooked_worker() as (pid, fd):
        assert parsing.acquire(blocking=False)
        assert parsing.acquire(blocking=False)
        try:
            c = hook_capture(pid, fd, seconds=1.0)
        finally:
            parsing.release()
            parsing.release()
        assert not any(t.frames for t in c.threads)  # /proc's facts of them alone
        assert "no time left to read the dump by the deadline" in (c.error or ""), c.error
        assert c.facts is not None  # what /proc said is kept
        free = hook_capture(pid, fd, seconds=3.0)
        assert free.method == "hook", free.error
        assert free.threads


def test_threads_are_read_from_proc_only_until_the_deadline() -> None:
    # Each thread's stat, comm, wchan and kernel stack: 4,000 threads took 0.84 s against
    # a 0.15 s capture, and a capture answered after its budget is lost, facts and all.
    script = (
        "import threading, time\n"
        "for _ in range(20):\n"
        "    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
        "print(flush=True)\n"
        "time.sleep(60)\n"
    )
    worker = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert worker.stdout is not None
        worker.stdout.readline()
        assert len(read_threads(worker.pid, kernel_stacks=False)) == 21
        assert read_threads(worker.pid, kernel_stacks=False, deadline=time.monotonic()) == []
    finally:
        worker.kill()
        worker.wait()
        worker.stdout.close()  # type: ignore[union-attr]

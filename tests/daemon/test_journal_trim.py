"""A journal past its trim is saved, and so trimmed, at once, whatever --state-interval.

A flood of junk changes no timer, but every byte of it is journalled, and a restart
replays what the journal holds. The trim threshold only marked the state as changed,
and the saver waited out its whole interval: with ``--state-interval 60``, a minute of
flood had to be replayed before the daemon was ready again. Now a save is due as soon as
the journal passes the threshold; and only one per threshold's worth, not a storm.
"""

from __future__ import annotations

import json
import os
import pathlib
import threading
from typing import Callable, List, Tuple

from tests.conftest import wait_until

from ftimer_server import Timer
from ftimer_server.daemon._state import StateSaver

from .conftest import PYTHON, DaemonProcess

Spawn = Callable[..., DaemonProcess]
BOOT = "c0ffee00-0000-4000-8000-000000000000"
#: The threshold the daemon below runs with (the real one is 16 MiB).
SMALL_TRIM = 64 * 1024

# The daemon, with a journal trimmed past SMALL_TRIM bytes.
SMALL_TRIM_DAEMON = f"""
import sys
from ftimer_server.server import _journal
_journal.JOURNAL_TRIM = {SMALL_TRIM}
from ftimer_server.daemon._cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_an_overdue_save_is_made_at_once_whatever_the_interval(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "state.json"
    full = threading.Event()  # the journal past its trim

    def snapshot() -> Tuple[List[Timer], int]:
        full.clear()  # a checkpoint starts a new segment
        return [], 0

    saver = StateSaver(str(path), snapshot, BOOT, interval=3600, overdue=full.is_set)
    saver.start()
    try:
        wait_until(lambda: saver.saves == 1, what="the first save")
        full.set()
        saver.changed()
        wait_until(lambda: saver.saves == 2, what="the overdue save, before the hour is out")
    finally:
        saver.stop(final_save=False)


def test_a_save_made_meanwhile_is_not_made_again(tmp_path: pathlib.Path) -> None:
    # The server's loop saw the journal full just before the snapshot trimmed it: the
    # saver, woken, finds nothing overdue any more and waits out its interval.
    path = tmp_path / "state.json"
    full = threading.Event()
    checks: List[Tuple[int, bool]] = []  # (saves so far, overdue?) at each look
    saver: StateSaver

    def overdue() -> bool:
        checks.append((saver.saves, full.is_set()))
        return full.is_set()

    def snapshot() -> Tuple[List[Timer], int]:
        if full.is_set():
            saver.changed()  # the loop, a moment before the checkpoint below
            full.clear()
        return [], 0

    saver = StateSaver(str(path), snapshot, BOOT, interval=3600, overdue=overdue)
    saver.start()
    try:
        wait_until(lambda: saver.saves == 1, what="the first save")
        full.set()
        saver.changed()
        # The saver looked again after the overdue save, and found nothing due.
        wait_until(lambda: (2, False) in checks, what="the look after the second save")
        assert saver.saves == 2
    finally:
        saver.stop(final_save=False)


def current_journal(state: pathlib.Path) -> int:
    try:
        return int(json.loads(state.read_text())["journal"])
    except (FileNotFoundError, ValueError):
        return 0


def test_a_flood_is_trimmed_from_the_journal_within_a_long_state_interval(
    spawn: Spawn, short_dir: pathlib.Path
) -> None:
    state = short_dir / "state.json"
    d = spawn(
        "--state-file",
        str(state),
        "--state-interval",
        "60",
        "--capture",
        "none",
        command=[PYTHON, "-c", SMALL_TRIM_DAEMON],
    ).ready()
    first = wait_until(lambda: current_journal(state), what="the first save")
    flood = 4 * SMALL_TRIM  # junk lines: no timer changes
    fd = os.open(d.fifo, os.O_WRONLY)
    try:
        block = b"y\n" * 2048
        for _ in range(flood // len(block)):
            os.write(fd, block)
    finally:
        os.close(fd)
    # Saved (a new segment named) long before the minute is out: the replay a restart
    # would face is about SMALL_TRIM bytes, not a minute of flood.
    wait_until(lambda: current_journal(state) > first, what="a save for the full journal")
    d.status()  # everything written has been read
    # One save per SMALL_TRIM bytes at most (and the one at start), not one per read.
    assert current_journal(state) - first <= flood // SMALL_TRIM
    assert d.stop() == 0

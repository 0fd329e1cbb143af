"""Behaviour of daemon/_state.py that no test pinned, found by mutation testing (each test
fails with the mutant that found it)."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import time
from typing import List, Tuple

import pytest
from tests.conftest import on_other_clocks, wait_until

from ftimer_server import Timer
from ftimer_server.daemon._state import (
    STATE_VERSION,
    StateSaver,
    decode_state,
    encode_state,
    load_state,
)

BOOT = "c0ffee00-0000-4000-8000-000000000000"


def test_a_state_file_of_exactly_the_limit_loads_one_byte_more_is_set_aside(
    tmp_path: pathlib.Path,
) -> None:
    # The limit is the largest file the daemon may write (`max_state_bytes`): a file of
    # that size is its own, and holds every timer.
    path = tmp_path / "state.json"
    ts = [Timer(10, "a", 5.0, 9, 100), Timer(11, "b", 6.0, 15)]
    data = encode_state(ts, BOOT, 1.0)
    path.write_bytes(data)
    load = load_state(str(path), BOOT, max_bytes=len(data))
    assert (load.timers, load.ignored) == (ts, "")
    load = load_state(str(path), BOOT, max_bytes=len(data) - 1)
    assert (load.timers, load.ignored) == ([], f"larger than {len(data) - 1} bytes")
    assert load.set_aside
    assert not path.exists()


def test_a_save_that_fails_is_retried_once_a_second_not_in_a_loop(
    tmp_path: pathlib.Path,
) -> None:
    # A full or read-only disk: each attempt takes a snapshot (the server's lock) and
    # encodes every timer (the GIL). Retried at once, over and over, the saver thread
    # spun and took both from the server's loop for as long as the disk stayed full.
    directory = tmp_path / "d"
    directory.mkdir()
    attempts: List[float] = []

    def snapshot() -> Tuple[List[Timer], int]:
        attempts.append(time.monotonic())
        return [], 0

    saver = StateSaver(str(directory / "state.json"), snapshot, BOOT, interval=0.01)
    directory.rmdir()  # writes now fail
    saver.start()
    try:
        wait_until(lambda: len(attempts) >= 2, what="a second attempt")
    finally:
        saver.stop(final_save=False)
    assert saver.errors >= 2
    assert attempts[1] - attempts[0] >= 0.95  # max(interval, 1 s) apart


def test_a_dropped_timer_is_said_with_what_it_was(caplog: pytest.LogCaptureFixture) -> None:
    # The restart keeps the others: the operator learns which one was lost, and why.
    good = {"op": "arm", "pid": 42, "scope_id": "s", "deadline": 1.5, "signal": 9}
    doc = {
        "version": STATE_VERSION,
        "boot_id": BOOT,
        "saved_at": 1.0,
        "timers": [{**good, "signal": 99}, good],
    }
    with caplog.at_level(logging.ERROR, logger="ftimer_server.state"):
        assert decode_state(json.dumps(doc).encode()).timers == [Timer(42, "s", 1.5, 9)]
    [record] = caplog.records
    assert record.getMessage().startswith("state file: dropped an invalid timer (")
    assert '"signal": 99' in record.getMessage()  # the timer, as the file held it


# Loads a state file saved on clocks (5 s, 7 s) ahead of the host's, in a daemon whose
# own are (11 s, 3 s) ahead (run under unshare --time): prints why it was not used.
OTHER_CLOCKS = """
import sys
from ftimer_server.daemon._state import encode_state, load_state
path = sys.argv[1]
with open(path, "wb") as f:
    f.write(encode_state([], "boot", 1.0, clocks=(5 * 10**9, 7 * 10**9)))
print(load_state(path, "boot").ignored)
"""


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare(1)"
)
def test_a_state_saved_on_other_clocks_says_how_far_apart(tmp_path: pathlib.Path) -> None:
    done = on_other_clocks(OTHER_CLOCKS, str(tmp_path / "state.json"))
    if done.returncode and "unshare" in done.stderr:
        pytest.skip(f"no time namespaces here: {done.stderr!r}")
    assert done.stdout == (
        "saved on other clocks, CLOCK_MONOTONIC -6 s, CLOCK_BOOTTIME +4 s from the "
        "server's: another time namespace\n"
    )

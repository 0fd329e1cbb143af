"""Fixes from a review of the wire: the default scope of a file whose path is not UTF-8,
and a scope's size reckoned for any forked child."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap
from signal import SIGUSR2
from typing import Optional

import pytest

from ftimer_client._wire import V2Lines
from ftimer_protocol import (
    MAX_FD,
    MAX_PID,
    MAX_TIME,
    PIPE_BUF,
    Disarm,
    DumpHook,
    FileTimerRequest,
    MessageTooLarge,
    decode,
)

from .conftest import FifoPeer

SCRIPT = textwrap.dedent(
    """\
    import sys
    from ftimer_client import FileTimerClient, configure, expires
    configure(FileTimerClient(sys.argv[1], protocol=int(sys.argv[2])))
    with expires(after=60):
        pass
    @expires(after=60)
    def step():
        pass
    step()
    """
)


@pytest.mark.skipif(sys.getfilesystemencoding() != "utf-8", reason="a UTF-8 file system")
@pytest.mark.parametrize("protocol", [1, 2])
def test_the_default_scope_of_a_file_whose_path_is_not_utf8(
    peer: FifoPeer, tmp_path: pathlib.Path, protocol: int
) -> None:
    directory = os.path.join(os.fsencode(tmp_path), b"caf\xe9")
    os.mkdir(directory)
    script = os.path.join(directory, b"train.py")
    with open(script, "w") as f:
        f.write(SCRIPT)
    run = subprocess.run(
        [sys.executable, script, str(peer.path), str(protocol)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr  # it raised LocalProtocolError ("surrogates")
    scopes = [m.scope_id for m in peer.wait_count(4)]  # type: ignore[union-attr]
    # The path's bytes, those that are not UTF-8 written as backslashreplace does.
    text = script.decode("utf-8", "backslashreplace")
    assert "caf\\xe9" in text
    assert scopes == [f"{text}#4", f"{text}#4", f"{text}#6", f"{text}#6"]
    # A server reads torch's line for the same call site as the same scope.
    torch_line = FileTimerRequest(1, f"{os.fsdecode(script)}#4", -1).to_json().encode()
    assert decode(torch_line).scope_id == scopes[0]  # type: ignore[union-attr]


def _longest_scope(lines: V2Lines) -> int:
    """The length of the longest ASCII scope ``lines`` accepts."""
    low, high = 0, PIPE_BUF  # accepted, refused
    while high - low > 1:
        mid = (low + high) // 2
        try:
            lines.entry("s" * mid)
            low = mid
        except MessageTooLarge:
            high = mid
    return low


@pytest.mark.parametrize("start_time", [None, 5])
@pytest.mark.parametrize("dump", [None, DumpHook(SIGUSR2, 3)])
def test_a_scope_that_fits_in_the_parent_fits_in_any_child(
    start_time: Optional[int], dump: Optional[DumpHook]
) -> None:
    lines = V2Lines(7, start_time, 9, None, dump)
    scope = "s" * _longest_scope(lines)
    # A child with the widest pid, start time and hook descriptor (a start time is
    # there in the child where it was in the parent: /proc is, or is not).
    widest_start = None if start_time is None else 2**63 - 1
    lines.rebind(MAX_PID, widest_start, None if dump is None else DumpHook(SIGUSR2, MAX_FD))
    arm_format, disarm = lines.entry(scope)  # raised MessageTooLarge
    arm = arm_format % MAX_TIME
    assert len(arm) == PIPE_BUF  # room enough, and no more
    assert decode(arm).scope_id == scope  # type: ignore[union-attr]
    assert decode(disarm) == Disarm(MAX_PID, scope, widest_start)

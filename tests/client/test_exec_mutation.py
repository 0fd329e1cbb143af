"""What mutation testing of `ftimer exec` found no test pinned: a SIGINT its caller
ignores (`nohup`, `cmd &`) stays ignored in the command. Real processes and FIFO."""

from __future__ import annotations

import pathlib
import signal
import subprocess
import sys
from typing import Iterator

import pytest
from tests.client.conftest import FTIMER, FifoPeer


@pytest.fixture
def peer(fifo_path: pathlib.Path) -> Iterator[FifoPeer]:
    p = FifoPeer(fifo_path)
    yield p
    p.close()


PROBE = "import signal; print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)"


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def test_a_sigint_ignored_by_ftimers_caller_stays_ignored_in_the_command(peer: FifoPeer) -> None:
    # Kills _cli.py _start_gated: `if callable(signal.getsignal(signal.SIGINT)):` made
    # `if True:` (CMD of `nohup`/`cmd &` got SIGINT's default action back, and died of a
    # Ctrl-C meant for the foreground job).
    argv = [*FTIMER, "exec", "--fifo", str(peer.path), "--after", "600", "--signal", "0",
            "--write-timeout", "5", "--", sys.executable, "-c", PROBE]  # fmt: skip
    done = subprocess.run(
        argv, preexec_fn=_ignore_sigint, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True", done

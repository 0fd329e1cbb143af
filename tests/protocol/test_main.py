"""``python -m ftimer_protocol``: the self-check, and ``--help`` that does not run it."""

from __future__ import annotations

import subprocess
import sys


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ftimer_protocol", *args], capture_output=True, text=True
    )


def test_the_self_check_passes() -> None:
    result = run()
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith("self-check: ok")
    assert "MalformedMessage" in result.stdout  # the junk line, reported


def test_help_says_what_it_does_without_running_it() -> None:
    result = run("--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: python -m ftimer_protocol")
    assert "self-check" not in result.stdout


def test_an_unknown_argument_is_a_usage_error() -> None:
    result = run("--nope")
    assert result.returncode == 2
    assert "unrecognized arguments: --nope" in result.stderr
    assert result.stdout == ""

"""Behaviour of server/_fifo.py that no test pinned, found by mutation testing (each test
fails with the mutant that found it)."""

from __future__ import annotations

import os
import pathlib
import stat

import pytest

from ftimer_server.server._fifo import open_fifo


def test_a_managed_parent_made_before_is_given_the_mode_its_fifo_needs(
    tmp_path: pathlib.Path,
) -> None:
    # A directory made 0700 by an earlier run without a group kept a group's workers out
    # of a FIFO of 0620 they may write: the mode is set at every start.
    parent = tmp_path / "run"
    parent.mkdir(mode=0o700)
    fifo = open_fifo(parent / "f", mode=0o620, group=os.getgid(), private_parent=True)
    try:
        assert stat.S_IMODE(os.stat(parent).st_mode) == 0o710
    finally:
        fifo.close(remove=True)
    fifo = open_fifo(parent / "f", mode=0o600, private_parent=True)  # and taken back
    try:
        assert stat.S_IMODE(os.stat(parent).st_mode) == 0o700
    finally:
        fifo.close(remove=True)


@pytest.mark.parametrize("mode", [0, 0o777])
def test_the_mode_s_bounds_are_permission_bits(tmp_path: pathlib.Path, mode: int) -> None:
    fifo = open_fifo(tmp_path / "f", mode=mode)
    try:
        assert stat.S_IMODE(os.stat(tmp_path / "f").st_mode) == mode
    finally:
        fifo.close(remove=True)


@pytest.mark.parametrize("mode", [-1, 0o1000, True, 0o600 * 1.0])
def test_open_fifo_itself_refuses_a_mode_that_is_no_permission_bits(
    tmp_path: pathlib.Path, mode: object
) -> None:
    with pytest.raises(ValueError, match="mode"):
        open_fifo(tmp_path / "f", mode=mode)
    assert not os.path.lexists(tmp_path / "f")

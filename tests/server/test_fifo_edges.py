"""Behaviour of server/_fifo.py that no test pinned, found by mutation testing (each test
fails with the mutant that found it)."""

from __future__ import annotations

import os
import pathlib
import shutil
import stat
import tempfile
from collections.abc import Iterator

import pytest

from ftimer_server.server._fifo import open_fifo, unreachable_by_writers


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


@pytest.fixture
def searchable_dir() -> Iterator[pathlib.Path]:
    """A fresh directory every user may search, in /tmp (pytest's own are 0700)."""
    base = pathlib.Path(tempfile.mkdtemp(prefix="ftimer-reach-", dir="/tmp"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base)


@pytest.mark.parametrize("depth", [1, 2], ids=["parent", "grandparent"])
def test_a_directory_on_the_way_that_shuts_writers_out_is_named(
    searchable_dir: pathlib.Path, depth: int
) -> None:
    # The daemon refuses to start then (its writers would all get EACCES): the walk up
    # the path stopped after one level, and the group's condition was not pinned.
    shut = searchable_dir / "shut"
    fifo = shut / "x" / "t.fifo" if depth == 2 else shut / "t.fifo"
    fifo.parent.mkdir(parents=True)
    fifo.parent.chmod(0o755)
    shut.chmod(0o700)
    said = unreachable_by_writers(str(fifo), 0o622, None)
    assert said is not None
    assert said.startswith("other users may write the FIFO (mode 0622) but cannot reach it")
    assert f"directory {shut} (mode 0700" in said
    shut.chmod(0o711)
    assert unreachable_by_writers(str(fifo), 0o622, None) is None
    assert unreachable_by_writers(str(fifo), 0o600, None) is None  # only its owner writes


def test_a_group_reaches_the_fifo_through_its_own_group_bits_only(
    searchable_dir: pathlib.Path,
) -> None:
    gid = 4242  # a group of nobody here: only the numbers are compared
    shut = searchable_dir / "shut"
    shut.mkdir()
    fifo = shut / "t.fifo"
    os.chown(shut, -1, gid)
    shut.chmod(0o710)  # its group may search it
    assert unreachable_by_writers(str(fifo), 0o620, gid) is None
    said = unreachable_by_writers(str(fifo), 0o620, gid + 1)  # another group: shut out
    assert said is not None
    assert said.startswith(f"members of group {gid + 1} may write the FIFO")
    shut.chmod(0o700)
    assert unreachable_by_writers(str(fifo), 0o620, gid) is not None
    assert unreachable_by_writers(str(fifo), 0o600, gid) is None  # the group may not write
    shut.chmod(0o701)  # others' bits let every group in
    assert unreachable_by_writers(str(fifo), 0o620, gid + 1) is None

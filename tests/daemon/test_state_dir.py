"""The state file's directory: the daemon's user's alone, or the daemon does not start.

A user who may rename in it (its owner, or anyone it lets write, sticky or not) could
keep an old snapshot and put it back before the next start: a worker that had disarmed
was then reaped after the restart, and the daemon had not said a word (it only warned
about group and others' write bits, never about the owner). Now such a directory is
refused, as the FIFO's and the incidents' are, and so is one whose parent lets others
rename it away and back. At start the daemon also removes what its own interrupted saves
left there.

Directories of another user are made with os.chown (root only); nothing here arms a
timer, and nothing is ever signalled.
"""

from __future__ import annotations

import os
import pathlib
from typing import Callable

import pytest

from ftimer_server.daemon._state import StatePathError, check_state_dir

from .conftest import PATIENCE, DaemonProcess

Spawn = Callable[..., DaemonProcess]
NOBODY = 65534
FIX = "use a directory only the daemon's user may write (such as /run/ftimer)"
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown to another uid")


def refusal(d: DaemonProcess) -> str:
    """The one line a daemon that could not start logged."""
    assert d.proc.wait(PATIENCE) == 3
    (line,) = [r["msg"] for r in d.records() if r["level"] == "error"]
    return str(line)


@pytest.mark.parametrize("mode", [0o1777, 0o777, 0o770, 0o730, 0o702], ids=lambda m: f"{m:04o}")
def test_a_state_directory_others_may_write_is_refused(short_dir: pathlib.Path, mode: int) -> None:
    directory = short_dir / "state"
    directory.mkdir()
    directory.chmod(mode)
    with pytest.raises(StatePathError) as refused:
        check_state_dir(str(directory / "state.json"))
    assert str(refused.value) == (
        f"the state file's directory {directory} is writable by others (mode {mode:04o}); "
        f"make it 0700 (chmod go-w); {FIX}"
    )


@root_only
def test_another_users_state_directory_is_refused(short_dir: pathlib.Path) -> None:
    # Mode 0755: no write bit for anyone but its owner, who may rename what it holds.
    directory = short_dir / "state"
    directory.mkdir(mode=0o755)
    os.chown(directory, NOBODY, NOBODY)
    with pytest.raises(StatePathError) as refused:
        check_state_dir(str(directory / "state.json"))
    assert str(refused.value) == (
        f"the state file's directory {directory} is owned by uid {NOBODY}, not by this "
        f"server's user (0); {FIX}"
    )


def test_a_symlink_for_the_state_directory_is_judged_where_it_leads(
    short_dir: pathlib.Path,
) -> None:
    # systemd's StateDirectory= with DynamicUser= is a symlink (/var/lib/x to
    # private/x): it was refused as a symlink.
    real = short_dir / "private" / "real"
    real.mkdir(mode=0o700, parents=True)
    (short_dir / "link").symlink_to(real)
    check_state_dir(str(short_dir / "link" / "state.json"))
    real.chmod(0o777)
    with pytest.raises(StatePathError, match=r"directory .*/link is writable by others"):
        check_state_dir(str(short_dir / "link" / "state.json"))


def test_the_directories_it_makes_are_private_whatever_the_umask(
    short_dir: pathlib.Path,
) -> None:
    # os.makedirs made those above the last with the umask's mode (0775 under 002),
    # which the check then refused, at every start.
    old = os.umask(0o002)
    try:
        check_state_dir(str(short_dir / "a" / "b" / "state.json"))
    finally:
        os.umask(old)
    assert (short_dir / "a").stat().st_mode & 0o777 == 0o700
    assert (short_dir / "a" / "b").stat().st_mode & 0o777 == 0o700


def test_a_parent_others_may_rename_in_is_refused_a_sticky_one_is_not(
    short_dir: pathlib.Path,
) -> None:
    # Without the sticky bit, others could rename the private directory away and back.
    parent = short_dir / "shared"
    parent.mkdir()
    directory = parent / "state"
    directory.mkdir(mode=0o700)
    parent.chmod(0o777)
    with pytest.raises(StatePathError) as refused:
        check_state_dir(str(directory / "state.json"))
    assert str(refused.value) == (
        f"the state file's directory {directory} is unsafe: {parent} (mode 0777) lets users "
        "other than its owner rename what is in it, and so put an old state file back "
        f"before a restart; {FIX}"
    )
    parent.chmod(0o1777)  # as /tmp: only an entry's owner renames it
    check_state_dir(str(directory / "state.json"))


@root_only
def test_a_parent_of_another_user_is_refused(short_dir: pathlib.Path) -> None:
    parent = short_dir / "home"
    parent.mkdir(mode=0o755)
    directory = parent / "state"
    directory.mkdir(mode=0o700)
    os.chown(parent, NOBODY, NOBODY)
    with pytest.raises(StatePathError, match=f"{parent} is owned by uid {NOBODY}, who may"):
        check_state_dir(str(directory / "state.json"))


def test_a_missing_state_directory_is_made_private(short_dir: pathlib.Path) -> None:
    directory = short_dir / "a" / "b"
    check_state_dir(str(directory / "state.json"))
    assert directory.stat().st_mode & 0o777 == 0o700


def test_the_daemon_refuses_to_start_with_a_state_directory_others_may_write(
    spawn: Spawn, short_dir: pathlib.Path
) -> None:
    directory = short_dir / "state"
    directory.mkdir()
    directory.chmod(0o1777)
    state = directory / "state.json"
    d = spawn("--state-file", str(state), "--capture", "none")
    assert refusal(d) == (
        f"cannot start: --state-file (state-file) {state}: the state file's directory "
        f"{directory} is writable by others (mode 1777); make it 0700 (chmod go-w); {FIX}"
    )
    assert list(directory.iterdir()) == []  # no lock file, no journal made there


@root_only
def test_the_daemon_refuses_another_users_state_directory_so_no_old_snapshot_comes_back(
    spawn: Spawn, short_dir: pathlib.Path
) -> None:
    # The review's case: the directory's owner renamed the daemon's state file away
    # and put that old snapshot back before a restart, and the worker that had disarmed
    # meanwhile was reaped. Now the first start is refused.
    directory = short_dir / "state"
    directory.mkdir(mode=0o755)
    os.chown(directory, NOBODY, NOBODY)
    state = directory / "state.json"
    d = spawn("--state-file", str(state), "--capture", "none")
    assert refusal(d) == (
        f"cannot start: --state-file (state-file) {state}: the state file's directory "
        f"{directory} is owned by uid {NOBODY}, not by this server's user (0); {FIX}"
    )
    assert list(directory.iterdir()) == []


# -- what interrupted saves left ---------------------------------------------------------


def test_the_temporary_files_of_interrupted_saves_are_removed_at_start(
    spawn: Spawn, short_dir: pathlib.Path
) -> None:
    # A save killed between its temporary file and the rename leaves the file behind;
    # nothing ever removed it.
    directory = short_dir / "state"
    directory.mkdir(mode=0o700)
    state = directory / "state.json"
    leftovers = [directory / ".state.json.k3_x9abq.tmp", directory / ".state.json.0aq1zz7m.tmp"]
    for path in leftovers:
        path.write_bytes(b'{"version": 1, "boot_id": "')  # half a save
    # Not the temporary files of this state file's saves: left alone.
    others = [
        directory / ".state.json.journal.1.k3x9abqz.tmp",  # another file's name
        directory / ".other.json.k3x9abqz.tmp",
        directory / "state.json.k3x9abqz.tmp",
        directory / ".state.json.K3X9ABQZ.tmp",  # not tempfile's letters
    ]
    for path in others:
        path.write_bytes(b"kept")
    (directory / ".state.json.dir00000.tmp").mkdir()
    (directory / ".state.json.link0000.tmp").symlink_to(others[0])
    d = spawn("--state-file", str(state), "--capture", "none").ready()
    assert not any(path.exists() for path in leftovers)
    assert all(path.read_bytes() == b"kept" for path in others)
    assert (directory / ".state.json.dir00000.tmp").is_dir()
    assert (directory / ".state.json.link0000.tmp").is_symlink()
    removed = sorted(
        r["msg"] for r in d.records() if r["msg"].endswith("left by a save that was interrupted")
    )
    assert removed == sorted(
        f"removed {path}, left by a save that was interrupted" for path in leftovers
    )
    assert d.stop() == 0

"""Safe creation and opening of the server's FIFO, on the real file system."""

from __future__ import annotations

import os
import pathlib
import stat

import pytest

from ftimer_server import FifoError, open_fifo

from .conftest import NOBODY, run_as_nobody

ROOT = os.geteuid() == 0
OTHER_UID = 65534  # nobody


def test_creates_a_private_fifo_and_opens_both_ends(fifo_path: pathlib.Path) -> None:
    old = os.umask(0)  # the requested mode holds whatever the umask
    try:
        fifo = open_fifo(fifo_path)
    finally:
        os.umask(old)
    try:
        st = fifo_path.lstat()
        assert stat.S_ISFIFO(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert fifo.created
        # A writer's bytes reach the read end; the read end never blocks.
        with pytest.raises(BlockingIOError):
            os.read(fifo.read_fd, 10)
        os.write(fifo.write_fd, b"hello\n")
        assert os.read(fifo.read_fd, 10) == b"hello\n"
    finally:
        fifo.close()


def test_writers_closing_never_look_like_end_of_file(fifo_path: pathlib.Path) -> None:
    fifo = open_fifo(fifo_path)
    try:
        fd = os.open(fifo_path, os.O_WRONLY | os.O_NONBLOCK)
        os.write(fd, b"x\n")
        os.close(fd)
        assert os.read(fifo.read_fd, 10) == b"x\n"
        with pytest.raises(BlockingIOError):  # not b"": no EOF spin
            os.read(fifo.read_fd, 10)
    finally:
        fifo.close()


def test_reuses_its_own_fifo_and_keeps_it(fifo_path: pathlib.Path) -> None:
    first = open_fifo(fifo_path)
    inode = fifo_path.lstat().st_ino
    first.close()
    assert fifo_path.exists()  # not removed unless asked
    second = open_fifo(fifo_path, mode=0o620)
    try:
        assert not second.created
        assert fifo_path.lstat().st_ino == inode
        assert stat.S_IMODE(fifo_path.lstat().st_mode) == 0o620
    finally:
        second.close(remove=True)
    assert fifo_path.exists()  # it did not create it: never removes it


def test_removes_only_what_it_created_when_asked(fifo_path: pathlib.Path) -> None:
    fifo = open_fifo(fifo_path)
    fifo.close(remove=True)
    assert not fifo_path.exists()


def test_never_removes_a_replacement(fifo_path: pathlib.Path) -> None:
    fifo = open_fifo(fifo_path)
    fifo_path.unlink()
    os.mkfifo(fifo_path)
    fifo.close(remove=True)
    assert fifo_path.exists()


def test_refuses_a_symlink_even_to_a_fifo(fifo_path: pathlib.Path) -> None:
    target = fifo_path.with_name("real.fifo")
    os.mkfifo(target, 0o600)
    fifo_path.symlink_to(target)
    with pytest.raises(FifoError, match="symlink"):
        open_fifo(fifo_path)
    assert fifo_path.is_symlink()


def test_refuses_a_dangling_symlink(fifo_path: pathlib.Path) -> None:
    fifo_path.symlink_to(fifo_path.with_name("elsewhere"))
    with pytest.raises(FifoError, match="symlink"):
        open_fifo(fifo_path)
    assert not fifo_path.with_name("elsewhere").exists()


def test_refuses_a_regular_file_and_leaves_it_alone(fifo_path: pathlib.Path) -> None:
    fifo_path.write_text("precious")
    with pytest.raises(FifoError, match="regular file"):
        open_fifo(fifo_path)
    assert fifo_path.read_text() == "precious"


def test_refuses_a_directory(fifo_path: pathlib.Path) -> None:
    fifo_path.mkdir()
    with pytest.raises(FifoError, match="directory"):
        open_fifo(fifo_path)


@pytest.mark.skipif(not ROOT, reason="needs root to make a file owned by another user")
def test_refuses_a_fifo_owned_by_another_user(fifo_path: pathlib.Path) -> None:
    os.mkfifo(fifo_path, 0o666)
    os.chown(fifo_path, OTHER_UID, OTHER_UID)
    with pytest.raises(FifoError, match=f"owned by uid {OTHER_UID}"):
        open_fifo(fifo_path)
    assert fifo_path.lstat().st_uid == OTHER_UID


def test_missing_parent_is_an_error_for_an_explicit_path(tmp_path: pathlib.Path) -> None:
    with pytest.raises(FifoError, match="cannot create"):
        open_fifo(tmp_path / "missing" / "timer.fifo")


def test_group_and_mode(fifo_path: pathlib.Path) -> None:
    gid = os.getgroups()[-1] if os.getgroups() else os.getgid()
    fifo = open_fifo(fifo_path, mode=0o620, group=gid)
    try:
        st = fifo_path.lstat()
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o620, gid)
    finally:
        fifo.close()
    with pytest.raises(FifoError, match="no such group"):
        open_fifo(fifo_path, group="no-such-group-ftimer")


def test_pipe_buffer_is_enlarged(fifo_path: pathlib.Path) -> None:
    fifo = open_fifo(fifo_path)
    try:
        assert fifo.pipe_size > 65536
        max_size = int(pathlib.Path("/proc/sys/fs/pipe-max-size").read_text())
        assert fifo.pipe_size <= max_size
    finally:
        fifo.close()


@pytest.fixture
def default_path(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    """Make the default FIFO path a temporary one (root's would be /run/ftimer)."""
    import ftimer_server.server._fifo

    path = tmp_path / "ftimer" / "timer.fifo"
    monkeypatch.setattr(ftimer_server.server._fifo, "default_fifo_path", lambda: str(path))
    return path


def test_default_path_gets_a_private_parent(default_path: pathlib.Path) -> None:
    fifo = open_fifo()
    try:
        assert fifo.path == str(default_path)
        assert stat.S_IMODE(default_path.parent.lstat().st_mode) == 0o700
    finally:
        fifo.close()
    fifo = open_fifo(default_path)  # given explicitly, it is still the default path
    fifo.close()


def test_default_path_refuses_an_unsafe_parent(default_path: pathlib.Path) -> None:
    parent = default_path.parent
    parent.mkdir()
    parent.chmod(0o777)
    with pytest.raises(FifoError, match="writable by others"):
        open_fifo()
    parent.rmdir()
    parent.with_name("elsewhere").mkdir()
    parent.symlink_to(parent.with_name("elsewhere"))
    with pytest.raises(FifoError, match="symlink"):
        open_fifo()
    assert not parent.with_name("elsewhere").joinpath("timer.fifo").exists()


@pytest.mark.skipif(not ROOT, reason="needs root to make a directory owned by another user")
def test_default_path_refuses_a_parent_owned_by_another_user(default_path: pathlib.Path) -> None:
    default_path.parent.mkdir(mode=0o700)
    os.chown(default_path.parent, OTHER_UID, OTHER_UID)
    with pytest.raises(FifoError, match=f"owned by uid {OTHER_UID}"):
        open_fifo()


def test_private_parent_on_request(tmp_path: pathlib.Path) -> None:
    fifo = open_fifo(tmp_path / "run" / "timer.fifo", private_parent=True)
    fifo.close()
    assert stat.S_IMODE((tmp_path / "run").lstat().st_mode) == 0o700


def _leftovers(fifo_path: pathlib.Path) -> list[str]:
    return [p.name for p in fifo_path.parent.iterdir() if p.name.endswith(".tmp")]


def test_replace_puts_a_new_fifo_in_place(fifo_path: pathlib.Path) -> None:
    first = open_fifo(fifo_path, mode=0o620)
    old_inode = fifo_path.lstat().st_ino
    holder = os.open(fifo_path, os.O_WRONLY | os.O_NONBLOCK)  # a client keeping it open
    try:
        first.close()
        second = open_fifo(fifo_path, mode=0o640, replace=True)
        try:
            assert (second.created, second.replaced) == (True, True)
            st = fifo_path.lstat()
            assert stat.S_ISFIFO(st.st_mode)
            assert st.st_ino != old_inode
            assert stat.S_IMODE(st.st_mode) == 0o640
            assert os.fstat(second.read_fd).st_ino == st.st_ino
            with pytest.raises(BrokenPipeError):  # the old FIFO has no reader any more
                os.write(holder, b"x\n")
            fd = os.open(fifo_path, os.O_WRONLY | os.O_NONBLOCK)  # new opens find the new one
            os.write(fd, b"hello\n")
            os.close(fd)
            assert os.read(second.read_fd, 10) == b"hello\n"
            assert _leftovers(fifo_path) == []
        finally:
            second.close(remove=True)
        assert not fifo_path.exists()  # it created (replaced) it: removed when asked
    finally:
        os.close(holder)


def test_replace_creates_a_missing_fifo(fifo_path: pathlib.Path) -> None:
    fifo = open_fifo(fifo_path, replace=True)
    try:
        assert (fifo.created, fifo.replaced) == (True, False)
        assert stat.S_ISFIFO(fifo_path.lstat().st_mode)
    finally:
        fifo.close()


@pytest.mark.skipif(not ROOT, reason="needs root to give a file a group we are not in")
def test_replace_keeps_the_old_group_unless_one_is_asked_for(fifo_path: pathlib.Path) -> None:
    os.mkfifo(fifo_path, 0o600)
    os.chown(fifo_path, -1, 12345)
    open_fifo(fifo_path, mode=0o620, replace=True).close()
    st = fifo_path.lstat()
    assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (12345, 0o620)
    open_fifo(fifo_path, group=23456, replace=True).close()
    assert fifo_path.lstat().st_gid == 23456


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("symlink", "symlink"),
        ("regular file", "regular file"),
        ("directory", "directory"),
        ("foreign FIFO", "owned by uid"),
    ],
)
def test_replace_refuses_what_reuse_refuses(
    fifo_path: pathlib.Path, kind: str, message: str
) -> None:
    target = fifo_path.with_name("real.fifo")
    if kind == "symlink":
        os.mkfifo(target, 0o600)
        fifo_path.symlink_to(target)
    elif kind == "regular file":
        fifo_path.write_text("precious")
    elif kind == "directory":
        fifo_path.mkdir()
    else:
        if not ROOT:
            pytest.skip("needs root to make a file owned by another user")
        os.mkfifo(fifo_path, 0o666)
        os.chown(fifo_path, OTHER_UID, OTHER_UID)
    before = fifo_path.lstat()
    with pytest.raises(FifoError, match=message):
        open_fifo(fifo_path, replace=True)
    after = fifo_path.lstat()
    assert (after.st_ino, after.st_mode, after.st_uid) == (
        before.st_ino,
        before.st_mode,
        before.st_uid,
    )
    assert _leftovers(fifo_path) == []


def test_replace_falls_back_to_reuse_when_no_fifo_can_be_made_beside_it(
    fifo_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    os.mkfifo(fifo_path, 0o600)
    inode = fifo_path.lstat().st_ino
    real_mkfifo = os.mkfifo

    def mkfifo(path: str, mode: int = 0o666) -> None:
        if os.path.basename(path).startswith("."):  # the temporary name: a read-only dir
            raise PermissionError(13, "Permission denied")
        real_mkfifo(path, mode)

    monkeypatch.setattr(os, "mkfifo", mkfifo)
    with caplog.at_level("WARNING", logger="ftimer_server"):
        fifo = open_fifo(fifo_path, replace=True)
    try:
        assert (fifo.created, fifo.replaced) == (False, False)
        assert fifo_path.lstat().st_ino == inode
        assert "reusing it" in caplog.text
    finally:
        fifo.close()


#: Opens the FIFO (argv[1]) with group 0, which uid nobody may not give: prints the
#: error's type and text, then what is left in the directory.
FIFO_WITH_GROUP_0 = """
import os, sys
from ftimer_server import FifoError, open_fifo
try:
    open_fifo(sys.argv[1], group=0).close()
    print("opened")
except Exception as e:
    print(type(e).__name__, e)
print(sorted(os.listdir(os.path.dirname(sys.argv[1]))))
"""


def test_a_group_the_user_may_not_give_is_a_fifo_error_and_no_fifo_is_left(
    nobody_dir: pathlib.Path,
) -> None:
    # Before: a raw PermissionError from fchown, and the FIFO just made left behind.
    fifo = nobody_dir / "timer.fifo"
    result = run_as_nobody(FIFO_WITH_GROUP_0, str(fifo))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"FifoError {fifo}: cannot give the FIFO group 0: Operation not permitted",
        "[]",
    ]


def test_a_group_the_user_may_not_give_leaves_a_reused_fifo_in_place(
    nobody_dir: pathlib.Path,
) -> None:
    fifo = nobody_dir / "timer.fifo"
    os.mkfifo(fifo, 0o600)
    os.chown(fifo, NOBODY, NOBODY)
    inode = fifo.lstat().st_ino
    # Reused (not replaced): open_fifo's default. Not this call's FIFO: not removed.
    result = run_as_nobody(FIFO_WITH_GROUP_0, str(fifo))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"FifoError {fifo}: cannot give the FIFO group 0: Operation not permitted",
        "['timer.fifo']",
    ]
    assert fifo.lstat().st_ino == inode

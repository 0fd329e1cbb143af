"""Which socket a path leads to, as the kernel says: a socket's name is the path it was
bound at, whatever is there now. Real sockets (and, as root, a real mount)."""

from __future__ import annotations

import errno
import logging
import os
import pathlib
import socket
import subprocess
from collections.abc import Iterator
from typing import Tuple

import pytest
from tests.conftest import tmpfs
from tests.server.conftest import needs_unix_diag

from ftimer_server import FifoError
from ftimer_server.server import _sockdiag
from ftimer_server.server._sockdiag import peer_of, reached_at
from ftimer_server.server._socket import open_socket


@pytest.fixture
def replaced(tmp_path: pathlib.Path) -> Iterator[Tuple[socket.socket, socket.socket, str]]:
    """A socket whose file was removed, and another bound at its path since."""
    path = str(tmp_path / "s.socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as last:
        last.bind(path)
        os.unlink(path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as other:
            other.bind(path)
            yield last, other, path


@needs_unix_diag
def test_the_kernel_names_the_socket_a_socket_is_connected_to(tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "s.socket")
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as bound,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe,
    ):
        bound.bind(path)
        assert peer_of(probe.fileno()) is None
        probe.connect(path)
        assert peer_of(probe.fileno()) == os.fstat(bound.fileno()).st_ino
    with open(os.devnull, "rb") as not_a_socket, pytest.raises(OSError):  # noqa: PT011
        peer_of(not_a_socket.fileno())  # which errno: the kernel's


@needs_unix_diag
def test_a_socket_is_not_reached_at_its_path_once_another_is_bound_there(
    replaced: Tuple[socket.socket, socket.socket, str],
) -> None:
    last, other, path = replaced
    assert last.getsockname() == path  # its name says nothing of the file there
    assert not reached_at(last, path)
    assert reached_at(other, path)


@needs_unix_diag
def test_a_socket_under_a_mount_laid_over_its_directory_is_not_reached(
    tmp_path: pathlib.Path,
) -> None:
    # Both files are the first of a fresh tmpfs: the same inode number on the same kind
    # of file system, which a comparison of the files themselves would take as one.
    with tmpfs(tmp_path / "run", "64k") as run:
        path = str(run / "s.socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as under:
            under.bind(path)
            subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(run)], check=True)
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as over:
                    over.bind(path)
                    assert not reached_at(under, path)
                    assert reached_at(over, path)
            finally:
                subprocess.run(["umount", "-l", str(run)], check=True)
            assert reached_at(under, path)  # in sight again


def test_a_socket_whose_path_leads_to_nobody_or_to_a_stream_socket_is_not_reached(
    tmp_path: pathlib.Path,
) -> None:
    path = str(tmp_path / "s.socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as last:
        last.bind(path)
        os.unlink(path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as gone:
            gone.bind(path)
        assert not reached_at(last, path)  # a socket file nobody is bound to
        os.unlink(path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stream:
            stream.bind(path)
            assert not reached_at(last, path)
        os.unlink(path)
        with pytest.raises(FileNotFoundError):
            reached_at(last, path)


def test_without_the_kernel_s_word_a_socket_s_name_decides_and_the_log_says_so_once(
    replaced: Tuple[socket.socket, socket.socket, str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # As under systemd's RestrictAddressFamilies= without AF_NETLINK.
    def refused(fd: int) -> None:
        raise OSError(errno.EAFNOSUPPORT, os.strerror(errno.EAFNOSUPPORT))

    monkeypatch.setattr(_sockdiag, "peer_of", refused)
    monkeypatch.setattr(_sockdiag, "_said", False)
    last, _, path = replaced
    with caplog.at_level(logging.WARNING, logger="ftimer_server"):
        assert reached_at(last, path)
        assert reached_at(last, path)
    [said] = [r.getMessage() for r in caplog.records]
    assert said.startswith(f"cannot ask the kernel which socket {path} leads to")
    assert "allow AF_NETLINK" in said


@needs_unix_diag
def test_a_socket_given_to_take_over_that_its_path_no_longer_leads_to_is_refused(
    replaced: Tuple[socket.socket, socket.socket, str],
) -> None:
    # Taken over by its name, it was served while clients reached the other one.
    last, _, path = replaced
    with pytest.raises(FifoError, match="the socket given is not bound there"):
        open_socket(path, adopt=(last.fileno(), 10))
    assert last.fileno() >= 0  # the caller's, left open for it to close
    assert os.path.exists(path)

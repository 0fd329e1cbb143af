"""Which file a socket is bound to, as the kernel says: a socket's name is the path it was
bound at, whatever is there now. Real sockets."""

from __future__ import annotations

import errno
import os
import pathlib
import socket
from collections.abc import Iterator
from typing import Tuple

import pytest

from ftimer_server import FifoError
from ftimer_server.server import _sockdiag
from ftimer_server.server._sockdiag import bound_at, bound_file
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


def test_the_kernel_names_the_file_a_socket_is_bound_to(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "s.socket"
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as bound,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as unbound,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as abstract,
    ):
        bound.bind(str(path))
        abstract.bind(f"\0ftimer-test-{os.getpid()}")
        st = os.lstat(path)
        assert bound_file(bound.fileno()) == st.st_ino
        assert bound_file(unbound.fileno()) is None
        assert bound_file(abstract.fileno()) is None


def test_a_socket_is_not_bound_at_its_path_once_another_is_bound_there(
    replaced: Tuple[socket.socket, socket.socket, str],
) -> None:
    last, other, path = replaced
    assert last.getsockname() == path  # its name says nothing of the file there
    assert not bound_at(last, path)
    assert bound_at(other, path)


def test_without_the_kernel_s_word_a_socket_s_name_decides(
    replaced: Tuple[socket.socket, socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A kernel without unix_diag (or a seccomp filter that refuses netlink sockets).
    def no_sock_diag(fd: int) -> None:
        raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))

    monkeypatch.setattr(_sockdiag, "bound_file", no_sock_diag)
    last, _, path = replaced
    assert bound_at(last, path)
    os.unlink(path)
    with pytest.raises(FileNotFoundError):
        bound_at(last, path)


def test_a_socket_given_to_take_over_whose_file_was_replaced_is_refused(
    replaced: Tuple[socket.socket, socket.socket, str],
) -> None:
    # Taken over by its name, it was served while clients reached the other one.
    last, _, path = replaced
    with pytest.raises(FifoError, match="the socket given is not bound there"):
        open_socket(path, adopt=(last.fileno(), 10))
    assert last.fileno() >= 0  # the caller's, left open for it to close
    assert os.path.exists(path)

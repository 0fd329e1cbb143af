"""Which socket a datagram sent to a path reaches, as the kernel says (``sock_diag``).

A socket's name (``getsockname()``) is the path it was bound at, whatever is at that path
now: its file may have been removed and another socket bound there since, or a mount
laid over its directory. Which socket the path leads to, only the kernel can say: a
socket connected to the path has that one as its peer (the lookup every sender makes),
and ``NETLINK_SOCK_DIAG`` names an AF_UNIX socket's peer (``UDIAG_SHOW_PEER``).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import struct
from typing import Optional

__all__ = ["peer_of", "reached_at"]

logger = logging.getLogger("ftimer_server")

# <linux/netlink.h>, <linux/sock_diag.h>, <linux/unix_diag.h>
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2
_UDIAG_SHOW_PEER = 0x4
_UNIX_DIAG_PEER = 2
_NO_COOKIE = 0xFFFFFFFF
_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, seq, port
_REQUEST = struct.Struct("=BBHIIIII")  # family, protocol, pad, states, ino, show, cookie
_REPLY = struct.Struct("=BBBBIII")  # family, type, state, pad, ino, cookie
_ATTR = struct.Struct("=HH")  # length, type
_INO = struct.Struct("=I")
_ERROR = struct.Struct("=i")  # nlmsgerr: -errno
# Whether the kernel could not be asked, said once: it will not answer later either.
_said = False


def peer_of(fd: int) -> Optional[int]:
    """The inode number of the socket that the AF_UNIX socket ``fd`` is connected to, or
    ``None`` if it is connected to none.

    Raises:
        OSError: the kernel cannot say (no ``unix_diag``, netlink sockets refused, not a
            socket).
    """
    ino = os.fstat(fd).st_ino
    try:
        request = _REQUEST.pack(
            socket.AF_UNIX, 0, 0, 0xFFFFFFFF, ino, _UDIAG_SHOW_PEER, _NO_COOKIE, _NO_COOKIE
        )
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as netlink:
            length = _NLMSGHDR.size + len(request)
            netlink.send(
                _NLMSGHDR.pack(length, _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1, 0) + request
            )
            reply = netlink.recv(4096, socket.MSG_DONTWAIT)  # answered within send()
        length, kind = _NLMSGHDR.unpack_from(reply)[:2]
        if kind == _NLMSG_ERROR:
            error = -_ERROR.unpack_from(reply, _NLMSGHDR.size)[0]
            raise OSError(error, os.strerror(error))
        if kind != _SOCK_DIAG_BY_FAMILY or _REPLY.unpack_from(reply, _NLMSGHDR.size)[4] != ino:
            raise OSError(errno.EPROTO, "an unexpected sock_diag reply")
        at, end = _NLMSGHDR.size + _REPLY.size, min(length, len(reply))
        while at + _ATTR.size <= end:
            size, attribute = _ATTR.unpack_from(reply, at)
            if size < _ATTR.size:
                break
            if attribute == _UNIX_DIAG_PEER:
                return int(_INO.unpack_from(reply, at + _ATTR.size)[0])
            at += (size + 3) & ~3
    except struct.error as e:  # a reply cut short, an inode past 32 bits
        raise OSError(errno.EPROTO, f"sock_diag: {e}") from None
    return None


def reached_at(sock: socket.socket, path: str) -> bool:
    """Whether a datagram sent to ``path`` reaches ``sock``, an AF_UNIX datagram socket
    bound there: not once its file was removed and another socket bound there, nor
    under a mount laid over its directory. Where the kernel cannot say (no
    ``unix_diag``, or netlink sockets refused: systemd's ``RestrictAddressFamilies=``
    without ``AF_NETLINK``), whether a socket is at the path ``sock`` was bound at,
    which is said once in the log.

    Raises:
        OSError: nothing can be looked at at ``path`` (``FileNotFoundError``: nothing
            is there), or the path cannot be connected to (no permission).
    """
    if sock.getsockname() != path:
        return False
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as probe:
        try:
            probe.connect(path)  # sends nothing: what is queued there stays as it is
        except OSError as e:
            if e.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.EPROTOTYPE):
                return False  # nobody bound there (or gone since), or a stream socket
            raise
        try:
            peer = peer_of(probe.fileno())
        except OSError as e:
            _say_unasked(path, e)
            return True  # the name must do
    return peer == os.fstat(sock.fileno()).st_ino


def _say_unasked(path: str, e: OSError) -> None:
    global _said
    if not _said:
        _said = True
        logger.warning(
            "cannot ask the kernel which socket %s leads to (sock_diag: %s): a socket "
            "there is taken for the one bound there, by its name; allow AF_NETLINK "
            "(systemd's RestrictAddressFamilies=)",
            path,
            e.strerror or e,
        )

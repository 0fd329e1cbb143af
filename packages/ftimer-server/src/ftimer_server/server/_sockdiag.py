"""Which file an AF_UNIX socket is bound to, as the kernel says (``sock_diag``).

A socket's name (``getsockname()``) is the path it was bound at, whatever is at that path
now: the file may have been removed, and another socket bound there since. Only the
kernel can tell which file is the socket's (``NETLINK_SOCK_DIAG``, ``UDIAG_SHOW_VFS``:
the inode of the file it was bound to). The socket holds that file, so its inode number
cannot be given to another while it is open.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct
from typing import Optional

__all__ = ["bound_at", "bound_file"]

# <linux/netlink.h>, <linux/sock_diag.h>, <linux/unix_diag.h>
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2
_UDIAG_SHOW_VFS = 0x2
_UNIX_DIAG_VFS = 1
_NO_COOKIE = 0xFFFFFFFF
_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, seq, port
_REQUEST = struct.Struct("=BBHIIIII")  # family, protocol, pad, states, ino, show, cookie
_REPLY = struct.Struct("=BBBBIII")  # family, type, state, pad, ino, cookie
_ATTR = struct.Struct("=HH")  # length, type
_VFS_INO = struct.Struct("=I")  # unix_diag_vfs: the inode (then the device)


def bound_file(fd: int) -> Optional[int]:
    """The inode number of the file the AF_UNIX socket ``fd`` is bound to (its low 32
    bits: all the kernel says), or ``None`` if it is bound to none (unbound, or an
    abstract name).

    Raises:
        OSError: the kernel cannot say (no ``unix_diag``, not a socket).
    """
    ino = os.fstat(fd).st_ino
    request = _REQUEST.pack(
        socket.AF_UNIX, 0, 0, 0xFFFFFFFF, ino, _UDIAG_SHOW_VFS, _NO_COOKIE, _NO_COOKIE
    )
    header = _NLMSGHDR.pack(
        _NLMSGHDR.size + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1, 0
    )
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as netlink:
        netlink.send(header + request)
        reply = netlink.recv(4096, socket.MSG_DONTWAIT)  # answered within send()
    length, kind = _NLMSGHDR.unpack_from(reply)[:2]
    if kind == _NLMSG_ERROR:
        error = -struct.unpack_from("=i", reply, _NLMSGHDR.size)[0]
        raise OSError(error, os.strerror(error))
    if kind != _SOCK_DIAG_BY_FAMILY or _REPLY.unpack_from(reply, _NLMSGHDR.size)[4] != ino:
        raise OSError(errno.EPROTO, "an unexpected sock_diag reply")
    at = _NLMSGHDR.size + _REPLY.size
    while at + _ATTR.size <= min(length, len(reply)):
        size, attribute = _ATTR.unpack_from(reply, at)
        if size < _ATTR.size:
            break
        if attribute == _UNIX_DIAG_VFS:
            return int(_VFS_INO.unpack_from(reply, at + _ATTR.size)[0])
        at += (size + 3) & ~3
    return None


def bound_at(sock: socket.socket, path: str) -> bool:
    """Whether the socket at ``path`` is the file ``sock`` is bound to: not one bound
    there since (``sock``'s own removed). Where the kernel cannot say (no ``unix_diag``),
    whether ``sock`` was bound at ``path`` and a socket is there.

    Raises:
        OSError: nothing can be looked at at ``path``, or ``sock`` is closed.
    """
    if sock.getsockname() != path:
        return False
    st = os.lstat(path)
    if not stat.S_ISSOCK(st.st_mode):
        return False
    try:
        bound = bound_file(sock.fileno())
    except OSError:
        return True  # the name must do
    # The inode alone: the device the kernel names is not always the one stat() gives
    # (btrfs subvolumes, overlayfs), and the socket holds its file, whose number no file
    # bound at the path since can have.
    return bound == st.st_ino & 0xFFFFFFFF

"""Where a server listens by default, so clients and servers agree without settings.

Pure functions of the user id and the environment: no file system access.

A server reads a FIFO and may also bind an AF_UNIX datagram socket beside it (the socket
binding of docs/protocol.md): ``timer.fifo`` -> ``timer.socket``. The environment
variables that name them are here too, so every client and server reads the same ones.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Optional

__all__ = [
    "ENV_FIFO",
    "ENV_SOCKET",
    "ENV_TORCH_FIFO",
    "FIFO_ENV_VARS",
    "SYSTEM_FIFO_PATH",
    "SYSTEM_SOCKET_PATH",
    "default_fifo_path",
    "default_socket_path",
    "socket_path_for",
]

#: The FIFO of a daemon running as root.
SYSTEM_FIFO_PATH = "/run/ftimer/timer.fifo"
#: The socket of a daemon running as root (``socket_path_for(SYSTEM_FIFO_PATH)``).
SYSTEM_SOCKET_PATH = "/run/ftimer/timer.socket"

#: Names the FIFO (ftimer's own variable).
ENV_FIFO = "FTIMER_FIFO"
#: Names the FIFO too: what torchrun sets for torch's ``FileTimerServer`` and its clients.
ENV_TORCH_FIFO = "TORCHELASTIC_TIMER_FILE"
#: Names the socket.
ENV_SOCKET = "FTIMER_SOCKET"
#: The variables naming the FIFO, in order of precedence.
FIFO_ENV_VARS = (ENV_FIFO, ENV_TORCH_FIFO)

_FIFO_SUFFIX = ".fifo"
_SOCKET_SUFFIX = ".socket"


def default_fifo_path(
    uid: Optional[int] = None, environ: Optional[Mapping[str, str]] = None
) -> str:
    """Return the documented default FIFO path of a server running as ``uid``.

    root: ``/run/ftimer/timer.fifo``; another user: ``$XDG_RUNTIME_DIR/ftimer/timer.fifo``
    when ``XDG_RUNTIME_DIR`` is set (an absolute path), else ``/tmp/ftimer-<uid>/timer.fifo``
    (the server creates that directory 0700 and refuses one owned by someone else).

    Args:
        uid: the server's effective user id; defaults to this process's.
        environ: the environment to read; defaults to ``os.environ``.
    """
    uid = os.geteuid() if uid is None else uid
    env = os.environ if environ is None else environ
    if uid == 0:
        return SYSTEM_FIFO_PATH
    runtime_dir = env.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(runtime_dir):
        return os.path.join(runtime_dir, "ftimer", "timer.fifo")
    return f"/tmp/ftimer-{uid}/timer.fifo"


def socket_path_for(fifo_path: str) -> str:
    """Return the path of the socket a server binds beside its FIFO ``fifo_path``.

    A FIFO path ending in ``.fifo`` has it replaced by ``.socket``
    (``/run/ftimer/timer.fifo`` -> ``/run/ftimer/timer.socket``); any other path gets
    ``.socket`` appended. (``<fifo>.sock`` is the daemon's control socket, another thing.)

    Args:
        fifo_path: the FIFO's path, as the server was given it.
    """
    if fifo_path.endswith(_FIFO_SUFFIX):
        return fifo_path[: -len(_FIFO_SUFFIX)] + _SOCKET_SUFFIX
    return fifo_path + _SOCKET_SUFFIX


def default_socket_path(
    uid: Optional[int] = None, environ: Optional[Mapping[str, str]] = None
) -> str:
    """Return the documented default socket path of a server running as ``uid``: the
    socket beside ``default_fifo_path(uid, environ)``.

    Args:
        uid: the server's effective user id; defaults to this process's.
        environ: the environment to read; defaults to ``os.environ``.
    """
    return socket_path_for(default_fifo_path(uid, environ))

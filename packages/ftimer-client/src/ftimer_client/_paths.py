"""Where a client sends when it is not told: a function of its inputs, the environment
and what is at the paths (its only I/O: the working directory and a look at each path).

A server reads a FIFO and may bind a datagram socket beside it
(``ftimer_protocol.socket_path_for``). A client given no path prefers that socket, whose
sender the kernel vouches for, and falls back to the FIFO; a client given a path uses
what is there. torch's protocol 1 is spoken over a FIFO only (torch's server has no
socket).

A relative path (given, or in the environment) is made absolute against the working
directory when the route is made, once: a process that changes directory later still
reconnects (after a server restart) to the server it started with.

A writer that finds nothing at its path asks here whether the system daemon's directory
hides it from this user (``hidden_system_dir``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Callable, NamedTuple, Optional, Tuple, Union

from ftimer_protocol import (
    ENV_SOCKET,
    ENV_TORCH_FIFO,
    FIFO_ENV_VARS,
    SYSTEM_FIFO_PATH,
    SYSTEM_SOCKET_PATH,
    default_fifo_path,
    socket_path_for,
)

__all__ = [
    "TRANSPORTS",
    "Route",
    "hidden_system_dir",
    "resolve_fifo_path",
    "resolve_route",
    "system_route",
    "torch_serves",
]

#: "1" in torch's agent (and so in its workers, who inherit it): the agent runs torch's
#: own FileTimerServer at ``$TORCHELASTIC_TIMER_FILE``.
ENV_TORCH_TIMER = "TORCHELASTIC_ENABLE_FILE_TIMER"

#: What shows the system daemon is there, to a user other than root.
_SYSTEM = (SYSTEM_FIFO_PATH, SYSTEM_SOCKET_PATH)
#: Values of ``transport``: by what is at the path, or always a FIFO, or always a socket.
TRANSPORTS = ("auto", "fifo", "socket")


class Route(NamedTuple):
    """Where a channel sends, decided at each (re)connection by what is on disk then."""

    #: The path (absolute unless empty): a FIFO, a socket, or (``"auto"``) whichever is
    #: there.
    path: str
    #: ``"auto"``, ``"fifo"`` or ``"socket"``.
    transport: str
    #: ``"auto"`` only: a socket path used instead of ``path`` whenever a socket is there
    #: (the socket beside a FIFO found by the default resolution); None: none.
    prefer: Optional[str] = None
    #: The per-user default's user: its directory must be that user's, or another user
    #: who made it first would read this user's timers (``open_writer`` refuses it);
    #: None: a path given, or the system daemon's.
    owner: Optional[int] = None


def resolve_fifo_path(
    file_path: Union[str, os.PathLike[str], None] = None,
    *,
    environ: Optional[Mapping[str, str]] = None,
    uid: Optional[int] = None,
    exists: Callable[[str], bool] = os.path.exists,
) -> str:
    """Return the FIFO path a client should use.

    The first of: ``file_path``; ``$FTIMER_FIFO``; ``$TORCHELASTIC_TIMER_FILE``; the
    system daemon's ``/run/ftimer/timer.fifo`` for root, and for another user when that
    path exists (a worker next to a root daemon); else the per-user default of
    ``ftimer_protocol.default_fifo_path()``. A relative path is made absolute against
    the working directory.

    Args:
        file_path: an explicit path; wins when given.
        environ: the environment to read; defaults to ``os.environ``.
        uid: the effective user id; defaults to this process's.
        exists: tells whether a path exists (injected for tests).
    """
    return _fifo(file_path, environ, uid, exists, (SYSTEM_FIFO_PATH,))[0]


def resolve_route(
    file_path: Union[str, os.PathLike[str], None] = None,
    *,
    transport: str = "auto",
    protocol: int = 2,
    environ: Optional[Mapping[str, str]] = None,
    uid: Optional[int] = None,
    exists: Callable[[str], bool] = os.path.exists,
) -> Route:
    """Return where a client with these settings sends.

    - ``file_path`` given: that path, with ``transport`` (``"auto"``: what is there).
    - ``transport="fifo"``, or protocol 1: the FIFO of ``resolve_fifo_path()``.
    - ``transport="socket"``: ``$FTIMER_SOCKET``, else the socket beside that FIFO.
    - ``transport="auto"``: ``$FTIMER_SOCKET``, else that FIFO, or the socket beside it
      whenever one is there (the system daemon's counts as there for another user when
      its FIFO or its socket exists).

    Args:
        file_path: an explicit path; wins when given.
        transport: one of ``TRANSPORTS``.
        protocol: 1 (torch's, FIFO only) or 2.
        environ: the environment to read; defaults to ``os.environ``.
        uid: the effective user id; defaults to this process's.
        exists: tells whether a path exists (injected for tests).

    Raises:
        ValueError: ``transport`` is not one of ``TRANSPORTS``, or is ``"socket"`` with
            protocol 1.
    """
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, not {transport!r}")
    if protocol == 1:
        if transport == "socket":
            raise ValueError(
                "protocol 1 (torch's format) is spoken over a FIFO only: torch's server has "
                "no socket; use protocol 2 for the socket"
            )
        transport = "fifo"
    if file_path is not None:
        return Route(_absolute(os.fspath(file_path)), transport)
    env = os.environ if environ is None else environ
    if transport == "fifo":
        fifo, owner = _fifo(None, env, uid, exists, (SYSTEM_FIFO_PATH,))
        return Route(fifo, "fifo", owner=owner)
    socket = env.get(ENV_SOCKET)
    if socket:  # a socket, said so: what else is there is refused as not one
        return Route(_absolute(socket), "socket")
    fifo, owner = _fifo(None, env, uid, exists, _SYSTEM)
    if transport == "socket":
        return Route(socket_path_for(fifo), "socket", owner=owner)
    return Route(fifo, "auto", socket_path_for(fifo), owner)


def system_route(route: Route, exists: Callable[[str], bool] = os.path.exists) -> Optional[Route]:
    """The system daemon's route, with ``route``'s transport, in place of the per-user
    default ``route`` once the daemon's FIFO or socket exists (``resolve_route()`` as it
    would be now, for a worker started before the daemon made ``/run/ftimer``); None
    while neither exists, or if ``route`` is not a per-user default.

    Args:
        exists: tells whether a path exists (the channel's keys take the daemon's as
            there).
    """
    if route.owner is None:
        return None
    system = (SYSTEM_FIFO_PATH,) if route.transport == "fifo" else _SYSTEM
    if not any(exists(path) for path in system):
        return None
    if route.transport == "fifo":
        return Route(SYSTEM_FIFO_PATH, "fifo")
    if route.transport == "socket":
        return Route(SYSTEM_SOCKET_PATH, "socket")
    return Route(SYSTEM_FIFO_PATH, "auto", SYSTEM_SOCKET_PATH)


def torch_serves(route: Route, environ: Optional[Mapping[str, str]] = None) -> bool:
    """Whether ``route`` reaches torch's own server: its agent runs one
    (``$TORCHELASTIC_ENABLE_FILE_TIMER`` is "1") at ``$TORCHELASTIC_TIMER_FILE``, and the
    route's FIFO is that one.

    That server reads torch's protocol 1 only: a protocol 2 line fails its read, and the
    timer is never kept.
    """
    env = os.environ if environ is None else environ
    torch_fifo = env.get(ENV_TORCH_FIFO)
    if env.get(ENV_TORCH_TIMER) != "1" or not torch_fifo or route.transport == "socket":
        return False
    return _same_file(route.path, torch_fifo)


def hidden_system_dir(path: str) -> str:
    """A hint when the system daemon's FIFO may exist where this user cannot see it.

    A non-root client defaults to the system FIFO only when it can see it; a directory
    that does not let it in sends it to its per-user FIFO instead, which no server reads.
    """
    directory = os.path.dirname(SYSTEM_FIFO_PATH)
    if os.path.dirname(path) == directory:
        return ""
    try:
        os.stat(SYSTEM_FIFO_PATH)
    except PermissionError:
        return (
            f"; {directory} exists but does not let this user in, so a server's FIFO there "
            f"cannot be used: run the workers in the server's --fifo-group"
        )
    except OSError:
        pass
    return ""


def _same_file(a: str, b: str) -> bool:
    """Whether paths ``a`` and ``b`` name one file (the same string, or a file both reach)."""
    if _absolute(a) == _absolute(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # either is missing
        return False


def _fifo(
    file_path: Union[str, os.PathLike[str], None],
    environ: Optional[Mapping[str, str]],
    uid: Optional[int],
    exists: Callable[[str], bool],
    system: tuple[str, ...],
) -> Tuple[str, Optional[int]]:
    """The FIFO's path, and the user whose per-user default it is (else None)."""
    if file_path is not None:
        return _absolute(os.fspath(file_path)), None
    env = os.environ if environ is None else environ
    for var in FIFO_ENV_VARS:
        value = env.get(var)
        if value:
            return _absolute(value), None
    uid = os.geteuid() if uid is None else uid
    if uid == 0 or any(exists(path) for path in system):
        return SYSTEM_FIFO_PATH, None
    return _absolute(default_fifo_path(uid, env)), uid


def _absolute(path: str) -> str:
    """``path`` against the working directory of now, unless it is absolute or empty.

    Joined, not normalised (``os.path.abspath`` would fold ``link/..`` into ``.``, where
    the kernel follows the link): the same file as ``path`` names now.
    """
    if not path or os.path.isabs(path):
        return path
    try:
        return os.path.join(os.getcwd(), path)
    except OSError:  # the working directory was removed: the path names nothing now
        return path

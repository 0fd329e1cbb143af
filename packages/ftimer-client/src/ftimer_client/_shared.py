"""Which channel a new client of this process gets (``channel_for``): the one its
route reaches, shared with every other client that sends to the same server with the
same protocol and transport.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import List, Optional, Tuple

from ._channel import Channel
from ._paths import Route, system_route

__all__ = ["channel_for"]

_shared: weakref.WeakValueDictionary[Tuple[object, ...], Channel] = weakref.WeakValueDictionary()
# Reentrant: a signal handler may make a client while its thread is in channel_for().
_shared_lock = threading.RLock()


def channel_for(route: Route, protocol: int, pid: Optional[int] = None) -> Channel:
    """Return the channel of this process for (``route``, ``protocol``), shared by every
    client that does not name a ``pid`` and reaches the same FIFO or socket (whatever the
    symlinks on the way), with the same transport; a client naming a ``pid`` gets a
    channel of its own.

    A client given no path also reaches the socket it prefers beside its FIFO: it shares
    with clients given either path. Their channel then prefers that socket too (the same
    server, over the transport the kernel vouches for). A per-user default channel that
    has never connected reaches the system daemon too, the route it moves to once that
    is there: it shares with clients made after the daemon appeared.

    Raises:
        ValueError: the pid breaks the schema.
    """
    if pid is not None:
        return Channel(route, protocol, pid)
    # Two channels to one server would each resync with a disarm_all of this process,
    # wiping the timers armed through the other.
    keys = _keys(route, protocol)
    with _shared_lock:
        found = (c for c in map(_shared.get, keys) if c is not None and _reaches(c, route))
        channel = next(found, None)
        if channel is None:
            channel = Channel(route, protocol)
        elif route.prefer is not None and channel.route.prefer is None:
            # One reference, read only when a connection opens: no lock needed (taking
            # the channel's here could wait on a delivery whose signal handler is here).
            channel.route = route
        moves_to = system_route(route, exists=lambda path: True)
        for key in keys + ([] if moves_to is None else _keys(moves_to, protocol)):
            other = _shared.get(key)
            if other is None or not _reaches(other, route):
                _shared[key] = channel
        return channel


def _keys(route: Route, protocol: int) -> List[Tuple[object, ...]]:
    """What ``route`` reaches, as keys of ``_shared``."""
    paths = [route.path] if route.prefer is None else [route.path, route.prefer]
    return [(os.path.realpath(path), route.transport, protocol) for path in paths]


def _reaches(channel: Channel, route: Route) -> bool:
    """Whether ``channel``, found under a key of ``route``'s, sends where ``route`` does:
    not if it is a per-user default that stays with a per-user server while ``route`` is
    the system daemon's."""
    return route.owner is not None or channel.route.owner is None or channel.may_move


def _after_fork_in_child() -> None:
    global _shared_lock
    # The parent's may have been held by another thread at the fork.
    _shared_lock = threading.RLock()


os.register_at_fork(after_in_child=_after_fork_in_child)

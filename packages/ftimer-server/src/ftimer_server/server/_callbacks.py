"""The user's callbacks of an embedded server, called from its loop's thread once the
table's lock is let go of: ``on_event`` (or those of its ``event_types``), torch's
``log_event`` and ``log_debug_info``, ``on_change``, and the reap steps and ``on_tick``
through ``call()``. Whatever a callback raises is logged and ignored; one that blocks is
named (``calling``) by a ``stop()`` that waits for it in vain.

With no ``on_event``, a server says what would otherwise go unseen (a timer of its own
process refused, lines it could not read), once a minute at most.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Callable, Dict, FrozenSet, Iterable, List, Optional, Set, Tuple, Type

from ftimer_server.core._events import (
    Armed,
    DecodeFailed,
    Disarmed,
    Event,
    Expired,
    Rejected,
    RejectReason,
)

from ._torch import LogEvent, request_of_timer, torch_log_event

__all__ = ["Callbacks", "event_types"]

logger = logging.getLogger("ftimer_server")

#: Refusals an embedded server with no ``on_event`` logs (at most once a minute): a timer
#: of the process that runs it, or of one above: torch's server enforces it, so code
#: written for torch's loses its watchdog here without them.
_OWN = frozenset((RejectReason.SERVER_PROCESS, RejectReason.SERVER_ANCESTOR))
_SAID_EVERY = 60.0


class Callbacks:
    """The callbacks a ``FileTimerServer`` was given, and what it says in their place.

    Raises:
        ValueError: ``types`` without ``on_event``.
    """

    def __init__(
        self,
        *,
        log_event: Optional[LogEvent],
        log_debug_info: Optional[Callable[[str, Dict[int, List[str]]], None]],
        on_event: Optional[Callable[[Event], None]],
        types: Optional[FrozenSet[type]],
        on_change: Optional[Callable[[], None]],
    ) -> None:
        if on_event is None and types is not None:
            raise ValueError("event_types needs on_event")
        self.log_event = log_event
        self._log_debug_info = log_debug_info
        self._on_event = on_event
        #: The event classes ``on_event`` gets (exact types); None: all.
        self.types = types
        self._on_change = on_change
        self._changes = 0  # the table's change count when on_change was last called
        #: The callback the loop's thread is in now (the argument's name, "log_event",
        #: ..., and the callback), if any: ``stop()`` names it when it waits in vain.
        self.calling: Optional[Tuple[str, Callable[..., object]]] = None
        self._own_said = -math.inf
        self._dropped_said = -math.inf

    @property
    def wants_timer_events(self) -> bool:
        """Whether ``on_event`` gets ``Armed`` and ``Disarmed`` (one per request: the
        core builds them only when they are wanted)."""
        types = self.types
        return self._on_event is not None and (types is None or Armed in types or Disarmed in types)

    def set_types(self, types: Optional[FrozenSet[type]]) -> None:
        """Raises ValueError: the server has no ``on_event``."""
        if self._on_event is None:
            raise ValueError("event_types needs on_event")
        self.types = types

    def debug_info(self, events: List[Event], run_id: str) -> None:
        """Hand torch's debug hook the timers among ``events`` that expired (by pid, as
        torch's requests), before the events themselves are delivered."""
        if self._log_debug_info is None:
            return
        expired: Dict[int, List[str]] = {}
        for event in events:
            if isinstance(event, Expired):
                timer = event.timer
                expired.setdefault(timer.pid, []).append(request_of_timer(timer).to_json())
        if expired:
            self.call("log_debug_info", self._log_debug_info, run_id, expired)

    def event(self, event: Event) -> None:
        """Deliver ``event`` to ``on_event`` (if of its types) and ``log_event``; with no
        ``on_event``, say what would go unseen."""
        on_event, types = self._on_event, self.types
        if on_event is not None and (types is None or type(event) in types):
            self.call("on_event", on_event, event)
        elif on_event is None and isinstance(event, Rejected) and event.reason in _OWN:
            self._say_own(event)
        elif on_event is None and isinstance(event, DecodeFailed):
            self._say_dropped(event)
        log_event = self.log_event
        if log_event is not None:
            self.call("log_event", torch_log_event, log_event, event, shown=log_event)

    def changed(self, changes: int, grown: bool) -> None:
        """Call ``on_change`` if the table's change count moved since it was last called
        (``changes``), or the journal has grown enough to be trimmed (``grown``)."""
        if self._on_change is not None and (changes != self._changes or grown):
            self._changes = changes
            self.call("on_change", self._on_change)

    def call(
        self,
        name: str,
        callback: Callable[..., object],
        *args: object,
        shown: Optional[Callable[..., object]] = None,
    ) -> None:
        """Call the user's ``callback`` (the argument ``name``; ``shown``: what the user
        gave, when ``callback`` wraps it); whatever it raises is logged and ignored,
        SystemExit too off the main thread, where it would end the loop's thread, and
        with it the watchdog, without a word. (In the main thread, ``run()``'s, it is how
        a signal handler ends the program.)"""
        self.calling = (name, callback if shown is None else shown)
        try:
            callback(*args)
        except (Exception, SystemExit) as e:
            if isinstance(e, SystemExit) and threading.current_thread() is threading.main_thread():
                raise
            logger.exception("%s callback failed", name)
        finally:
            self.calling = None

    def _say_own(self, event: Rejected) -> None:
        now = time.monotonic()
        if now - self._own_said < _SAID_EVERY:
            return
        self._own_said = now
        own = event.reason is RejectReason.SERVER_PROCESS
        whose = "this server's own" if own else "an ancestor's"
        logger.warning(
            "refused %s of scope %r for pid %d, %s process: a server never signals the "
            "process it runs in, or those above it; run it beside or above the processes "
            "it watches (in the agent, or the host's daemon)",
            event.request,
            event.scope_id,
            event.pid,
            whose,
        )

    def _say_dropped(self, event: DecodeFailed) -> None:
        # Once a minute at most: a server given no on_event (torch's agent) said nothing
        # of a request it could not read, and its worker ran unwatched.
        now = time.monotonic()
        if now - self._dropped_said < _SAID_EVERY:
            return
        self._dropped_said = now
        logger.warning(
            "dropped %d invalid line(s): %s: %s: %r; a worker whose requests are dropped "
            "is not watched (said once a minute at most; stats().decode_errors counts all)",
            event.lines,
            event.error,
            event.reason,
            event.excerpt or b"",
        )


def event_types(types: Optional[Iterable[Type[Event]]]) -> Optional[FrozenSet[type]]:
    """The exact event classes ``types`` stands for (a class: its subclasses too; Event:
    all); None for None.

    Raises:
        TypeError: one of them is not an ``Event`` class.
    """
    if types is None:
        return None
    given = frozenset(types)
    for t in given:
        if not (isinstance(t, type) and issubclass(t, Event)):
            raise TypeError(f"{t!r} is not an Event class")
    # The loop checks exact types.
    return frozenset(c for t in given for c in _with_subclasses(t))


def _with_subclasses(cls: type) -> Set[type]:
    found = {cls}
    subclasses: List[type] = type.__subclasses__(cls)
    for sub in subclasses:
        found |= _with_subclasses(sub)
    return found

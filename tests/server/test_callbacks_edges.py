"""Edge cases of an embedded server's callbacks (``Callbacks``), tested directly: what a
callback raises, ``event_types`` filtering, the warnings said in place of a missing
``on_event``, ``on_change``, and torch's ``log_event`` and ``log_debug_info``."""

from __future__ import annotations

import json
import logging
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest

from ftimer_protocol import FileTimerRequest
from ftimer_server.core._events import (
    Armed,
    DecodeFailed,
    Disarmed,
    Event,
    Expired,
    Reaped,
    Rejected,
    RejectReason,
    WorkerGone,
)
from ftimer_server.core._records import Timer
from ftimer_server.server import _callbacks, _torch
from ftimer_server.server._callbacks import Callbacks, event_types

PID = 4242
#: Not SIGKILL, torch's default: a request must carry the timer's own signal.
SIGNAL = 15


def callbacks(
    on_event: Optional[Callable[[Event], None]] = None,
    types: Optional[Any] = None,
    log_event: Optional[Callable[..., None]] = None,
    log_debug_info: Optional[Callable[..., None]] = None,
    on_change: Optional[Callable[[], None]] = None,
) -> Callbacks:
    return Callbacks(
        log_event=log_event,
        log_debug_info=log_debug_info,
        on_event=on_event,
        types=types,
        on_change=on_change,
    )


def timer(pid: int = PID, scope: str = "s", deadline: float = 100.0) -> Timer:
    return Timer(pid, scope, deadline, SIGNAL)


def rejected(reason: RejectReason = RejectReason.SERVER_PROCESS) -> Rejected:
    return Rejected(reason=reason, request="arm", pid=PID, scope_id="s")


def decode_failed() -> DecodeFailed:
    return DecodeFailed(error="bad", reason="junk", excerpt=b"x")


class Clock:
    """``time.monotonic`` of ``_callbacks``, moved by hand."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = 1000.0
        monkeypatch.setattr(_callbacks.time, "monotonic", lambda: self.now)


def warnings(caplog: pytest.LogCaptureFixture) -> List[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "ftimer_server" and r.levelno == logging.WARNING
    ]


def said(caplog: pytest.LogCaptureFixture, cb: Callbacks, *events: Event) -> List[str]:
    """The warnings said so far, once ``cb`` was given ``events`` in order."""
    with caplog.at_level(logging.WARNING, logger="ftimer_server"):
        for event in events:
            cb.event(event)
    return warnings(caplog)


def said_over_a_minute(
    event: Event, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> List[str]:
    """The warnings a server with no ``on_event`` says for ``event`` given to it at 0 s,
    59 s (asserted said only once by then) and 60 s."""
    clock = Clock(monkeypatch)
    cb = callbacks()
    said(caplog, cb, event)
    clock.now += 59.0
    assert len(said(caplog, cb, event)) == 1
    clock.now += 1.0
    return said(caplog, cb, event)


# --- call(): what a callback raises ---------------------------------------------------


def test_call_logs_and_ignores_an_exception_and_clears_calling(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A raising callback must not take the loop's thread (the watchdog) down with it,
    and ``stop()`` must not name it afterwards as the callback the loop is in."""
    cb = callbacks()

    def boom() -> None:
        raise RuntimeError("boom")

    with caplog.at_level(logging.ERROR, logger="ftimer_server"):
        cb.call("on_change", boom)
    assert cb.calling is None
    assert [r.getMessage() for r in caplog.records] == ["on_change callback failed"]


def test_call_ignores_system_exit_off_the_main_thread(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """sys.exit() in a callback run by a started server's thread would end that thread,
    and the watchdog with it, silently: it is logged and ignored."""
    cb = callbacks()
    escaped: List[BaseException] = []

    def leave() -> None:
        raise SystemExit(3)

    def run() -> None:
        try:
            cb.call("on_event", leave)
        except BaseException as e:  # what must not happen
            escaped.append(e)

    with caplog.at_level(logging.ERROR, logger="ftimer_server"):
        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
    assert escaped == []
    assert cb.calling is None
    assert [r.getMessage() for r in caplog.records] == ["on_event callback failed"]


def test_call_lets_system_exit_through_on_the_main_thread() -> None:
    """In the main thread (``run()``), SystemExit is how a signal handler ends the
    program: it goes through, and ``calling`` is still cleared."""
    cb = callbacks()

    def leave() -> None:
        raise SystemExit(3)

    with pytest.raises(SystemExit):
        cb.call("on_event", leave)
    assert cb.calling is None


def test_call_lets_keyboard_interrupt_through() -> None:
    """Ctrl-C in ``run()`` stops the server: a callback must not swallow it."""
    cb = callbacks()

    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cb.call("on_event", interrupted)
    assert cb.calling is None


def test_calling_names_the_callback_the_user_gave_while_it_runs() -> None:
    """``stop()`` names the callback that blocks: torch's ``log_event`` by the user's
    function, not ftimer's wrapper around it."""
    seen: List[Optional[Tuple[str, Any]]] = []

    def log_event(name: str, request: Any) -> None:
        seen.append(cb.calling)

    def on_event(event: Event) -> None:
        seen.append(cb.calling)

    cb = callbacks(on_event=on_event, log_event=log_event)
    cb.event(Expired(timer=timer(), late=0.0))
    assert seen == [("on_event", on_event), ("log_event", log_event)]
    assert cb.calling is None


# --- event(): on_event and event_types ------------------------------------------------


def test_event_types_filter_by_exact_type() -> None:
    """``types`` are exact classes (``event_types()`` expands subclasses): an event not
    among them is not delivered, one among them is."""
    got: List[Event] = []
    cb = callbacks(on_event=got.append, types=frozenset({Expired}))
    expired = Expired(timer=timer(), late=0.0)
    cb.event(Armed(timer=timer()))
    cb.event(expired)
    assert got == [expired]


def test_event_types_none_delivers_everything() -> None:
    got: List[Event] = []
    cb = callbacks(on_event=got.append)
    events = [Armed(timer=timer()), rejected(), decode_failed()]
    for e in events:
        cb.event(e)
    assert got == events


def test_types_need_on_event() -> None:
    with pytest.raises(ValueError, match="event_types needs on_event"):
        callbacks(types=frozenset({Expired}))
    cb = callbacks()
    with pytest.raises(ValueError, match="event_types needs on_event"):
        cb.set_types(frozenset({Expired}))
    assert cb.types is None


def test_set_types_changes_what_is_delivered() -> None:
    got: List[Event] = []
    cb = callbacks(on_event=got.append, types=frozenset({Expired}))
    cb.set_types(frozenset({Armed}))
    armed = Armed(timer=timer())
    cb.event(Expired(timer=timer(), late=0.0))
    cb.event(armed)
    cb.set_types(None)
    cb.event(armed)
    assert got == [armed, armed]


@pytest.mark.parametrize(
    ("types", "wanted"),
    [
        (None, True),
        (frozenset({Armed}), True),
        (frozenset({Disarmed}), True),
        (frozenset({Expired, Reaped}), False),
    ],
)
def test_wants_timer_events(types: Any, wanted: bool) -> None:
    """The core builds Armed/Disarmed (one per request) only when ``on_event`` gets
    them: asked for and not built, an ``on_event`` misses them."""
    assert callbacks(on_event=lambda e: None, types=types).wants_timer_events is wanted
    assert callbacks().wants_timer_events is False


# --- the warnings said in place of on_event --------------------------------------------


@pytest.mark.parametrize("reason", [RejectReason.SERVER_PROCESS, RejectReason.SERVER_ANCESTOR])
def test_own_refusal_warned_once_a_minute(
    reason: RejectReason, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """torch's agent gives no on_event: a timer of the server's own process (or an
    ancestor's) refused must be said, but not for every request of a tight loop."""
    said = said_over_a_minute(rejected(reason), monkeypatch, caplog)
    assert len(said) == 2
    whose = "this server's own" if reason is RejectReason.SERVER_PROCESS else "an ancestor's"
    assert whose in said[0]
    assert f"pid {PID}" in said[0]


def test_other_refusals_are_not_warned(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    Clock(monkeypatch)
    refused = [rejected(RejectReason.NO_SUCH_PROCESS), rejected(RejectReason.NOT_DESCENDANT)]
    assert said(caplog, callbacks(), *refused) == []


def test_undecodable_lines_warned_once_a_minute(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker whose requests are dropped runs unwatched: said, once a minute."""
    said = said_over_a_minute(decode_failed(), monkeypatch, caplog)
    assert len(said) == 2
    assert said[0].startswith("dropped 1 invalid line(s): bad: junk: b'x'")  # what was lost


def test_the_two_warnings_keep_their_own_minute(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """One warning said must not silence the other for a minute."""
    Clock(monkeypatch)
    events = [rejected(), decode_failed(), rejected(RejectReason.SERVER_ANCESTOR), decode_failed()]
    warned = said(caplog, callbacks(), *events)
    assert len(warned) == 2
    assert "this server's own" in warned[0]
    assert warned[1].startswith("dropped")


def test_first_warning_said_however_early(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """CLOCK_MONOTONIC starts near 0 at boot (or in a new time namespace): the first
    warning is said even then."""
    Clock(monkeypatch).now = 1.0
    assert len(said(caplog, callbacks(), rejected(), decode_failed())) == 2


def test_no_warning_when_on_event_is_given(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """With an ``on_event``, the user sees these events; even filtered out, they chose
    not to: nothing is said in their place."""
    Clock(monkeypatch)
    got: List[Event] = []
    cb = callbacks(on_event=got.append, types=frozenset({Expired}))
    assert said(caplog, cb, rejected(), decode_failed()) == []
    assert got == []


# --- on_change ------------------------------------------------------------------------


def test_on_change_only_when_changed_or_grown() -> None:
    """on_change (a checkpoint, often a file write) runs when the timers changed since
    it last ran, or the journal must be trimmed; not on every loop iteration."""
    calls: List[int] = []
    cb = callbacks(on_change=lambda: calls.append(1))
    cb.changed(0, False)
    assert calls == []
    cb.changed(1, False)
    cb.changed(1, False)
    assert len(calls) == 1
    cb.changed(1, True)
    assert len(calls) == 2
    cb.changed(1, False)
    cb.changed(2, False)
    assert len(calls) == 3


def test_on_change_raising_is_not_retried_every_iteration(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A change is reported once, even if on_change raised for it."""
    calls: List[int] = []

    def on_change() -> None:
        calls.append(1)
        raise OSError("disk full")

    cb = callbacks(on_change=on_change)
    with caplog.at_level(logging.ERROR, logger="ftimer_server"):
        cb.changed(1, False)
        cb.changed(1, False)
    assert len(calls) == 1
    assert cb.calling is None


# --- torch: log_event and log_debug_info ----------------------------------------------


def test_log_debug_info_gets_expired_timers_by_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's debug hook gets {pid: [request json]} of the timers that expired, and
    nothing else; not called when none did."""
    monkeypatch.setattr(_torch.time, "monotonic", lambda: 100.0)
    monkeypatch.setattr(_torch.time, "time", lambda: 5000.0)
    calls: List[Tuple[str, Dict[int, List[str]]]] = []
    cb = callbacks(log_debug_info=lambda run_id, expired: calls.append((run_id, expired)))
    cb.debug_info([Armed(timer=timer()), decode_failed()], "job")
    assert calls == []
    a, b, c = timer(7, "a", 90.0), timer(7, "b", 95.0), timer(8, "c", 99.0)
    events: List[Event] = [
        Expired(timer=a, late=1.0),
        Armed(timer=timer(9)),
        Expired(timer=b, late=1.0),
        WorkerGone(pid=10, start_time=None, timers=(timer(10),)),
        Expired(timer=c, late=1.0),
    ]
    cb.debug_info(events, "job")
    assert len(calls) == 1
    run_id, expired = calls[0]
    assert run_id == "job"
    assert {pid: [json.loads(r) for r in rs] for pid, rs in expired.items()} == {
        7: [
            json.loads(FileTimerRequest(7, "a", 4990.0, SIGNAL).to_json()),
            json.loads(FileTimerRequest(7, "b", 4995.0, SIGNAL).to_json()),
        ],
        8: [json.loads(FileTimerRequest(8, "c", 4999.0, SIGNAL).to_json())],
    }


def test_no_debug_hook_means_no_call(caplog: pytest.LogCaptureFixture) -> None:
    """A server given no log_debug_info (ftimer's own users) must not log an error for
    every expiry by calling the hook it does not have."""
    cb = callbacks()
    with caplog.at_level(logging.DEBUG, logger="ftimer_server"):
        cb.debug_info([Expired(timer=timer(), late=0.0)], "job")
    assert caplog.records == []
    assert cb.calling is None


def test_log_debug_info_raising_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    def hook(run_id: str, expired: Dict[int, List[str]]) -> None:
        raise RuntimeError("boom")

    cb = callbacks(log_debug_info=hook)
    with caplog.at_level(logging.ERROR, logger="ftimer_server"):
        cb.debug_info([Expired(timer=timer(), late=0.0)], "job")
    assert [r.getMessage() for r in caplog.records] == ["log_debug_info callback failed"]


def test_log_event_gets_torch_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's log_event gets "timer expired" and, for a signal delivered, "kill worker
    process", with torch's requests on the wall clock; other events are not torch's."""
    monkeypatch.setattr(_torch.time, "monotonic", lambda: 100.0)
    monkeypatch.setattr(_torch.time, "time", lambda: 5000.0)
    got: List[Tuple[str, Any]] = []
    cb = callbacks(log_event=lambda name, request: got.append((name, request)))
    reaped: Dict[str, Any] = {
        "pid": 7,
        "start_time": None,
        "signal": SIGNAL,
        "scope_id": "s",
        "late": 2.0,
        "timers": (),
    }
    for event in [
        Armed(timer=timer()),
        Expired(timer=timer(7, "s", 97.0), late=3.0),
        Reaped(delivered=True, **reaped),
        Reaped(delivered=False, **{**reaped, "scope_id": "missed"}),  # no signal went
        rejected(),
        decode_failed(),
    ]:
        cb.event(event)
    assert got == [
        ("timer expired", FileTimerRequest(7, "s", 4997.0, SIGNAL)),
        ("kill worker process", FileTimerRequest(7, "s", 4998.0, SIGNAL)),
    ]


def test_log_event_goes_with_on_event_and_its_filter() -> None:
    """log_event gets torch's events whatever on_event's types are."""
    names: List[str] = []
    got: List[Event] = []
    cb = callbacks(
        on_event=got.append,
        types=frozenset({Armed}),
        log_event=lambda name, request: names.append(name),
    )
    cb.event(Expired(timer=timer(), late=0.0))
    assert names == ["timer expired"]
    assert got == []


# --- event_types() --------------------------------------------------------------------


def test_event_types_none_is_all() -> None:
    assert event_types(None) is None


def test_event_types_expands_subclasses_recursively() -> None:
    """The loop checks exact types: a class given stands for its subclasses, at any
    depth, or an ``on_event`` asking for a base misses them."""

    class Mid(Expired, frozen=True, tag="mid_expired_for_test"):
        pass

    class Leaf(Mid, frozen=True, tag="leaf_expired_for_test"):
        pass

    assert event_types([Expired]) >= {Expired, Mid, Leaf}  # type: ignore[operator]
    assert event_types([Reaped, Armed]) == {Reaped, Armed}
    everything = event_types([Event])
    assert everything is not None
    assert {Event, Armed, Disarmed, Expired, Reaped, Rejected, DecodeFailed, Leaf} <= everything


@pytest.mark.parametrize("bad", [int, "Expired", Timer, None])
def test_event_types_refuses_what_is_not_an_event_class(bad: Any) -> None:
    with pytest.raises(TypeError):
        event_types([Expired, bad])


def test_event_types_takes_any_iterable_once() -> None:
    assert event_types(iter([Armed, Armed])) == {Armed}

"""What mutation testing of the signal a namespace's init is sent found no test
pinned. Only processes the test starts are signalled (SIGKILL at cleanup, through a
pidfd); _as_received itself signals nothing."""

from __future__ import annotations

import signal

import pytest
from tests.server.conftest import namespace_init, namespaces

from ftimer_server.server._signaller import _as_received

CATCHES = (
    "import signal, time; signal.signal(signal.SIGTERM, lambda *a: None);"
    "print('ready', flush=True); time.sleep(600)"
)


@namespaces
def test_a_namespaces_init_that_catches_the_signal_gets_it_as_sent() -> None:
    # Kills `... or catches_or_ignores(status, signal)` dropped from _as_received (a
    # container's init with a SIGTERM handler got SIGKILL: no graceful stop).
    with namespace_init(CATCHES) as (init, _):
        assert _as_received(init, signal.SIGTERM) == signal.SIGTERM
        assert _as_received(init, signal.SIGUSR1) == signal.SIGKILL  # (the contrast)


@namespaces
def test_a_namespaces_init_is_stopped_not_killed_by_a_stop_signal() -> None:
    # Kills `return SIGSTOP if signal in _STOPPING else SIGKILL` made `return SIGKILL`,
    # and SIGSTOP dropped from _AS_SENT (SIGSTOP itself then made SIGKILL): a stop
    # asked of a container's init killed the whole namespace.
    with namespace_init(CATCHES) as (init, _):
        assert _as_received(init, signal.SIGTSTP) == signal.SIGSTOP
        assert _as_received(init, signal.SIGSTOP) == signal.SIGSTOP


def test_the_servers_own_namespace_init_gets_the_signal_as_sent() -> None:
    # Kills `len(nspid) < 2 or` dropped from _as_received: pid 1 of the server's own
    # namespace (NSpid "1" alone) is no container below it; its signal is left alone.
    try:
        with open("/proc/1/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        pytest.skip("/proc/1/status unreadable")
    if status.get("NSpid", "").split() != ["1"]:
        pytest.skip("pid 1 not readable as this namespace's init")
    handled = int(status["SigCgt"], 16) | int(status["SigIgn"], 16) | int(status["SigBlk"], 16)
    free = [s for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGHUP,
                        signal.SIGALRM) if not handled & (1 << (s - 1))]  # fmt: skip
    if not free:
        pytest.skip("pid 1 handles every candidate signal")
    assert _as_received(1, free[0]) == free[0]

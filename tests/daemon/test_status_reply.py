"""``ftimer-server status`` given a reply that is not a status document: one error line
and exit 1, never a traceback."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterator
from typing import Any, Callable, Dict

import pytest

from ftimer_server.daemon._cli import format_status, main
from ftimer_server.daemon._control import ControlServer

from .test_presentation import status_doc

Serve = Callable[[Dict[str, Any]], str]


@pytest.fixture
def serve(tmp_path: pathlib.Path) -> Iterator[Serve]:
    """Answer status requests with a given document on a real control socket; return
    its path."""
    servers = []

    def start(doc: Dict[str, Any]) -> str:
        path = str(tmp_path / f"{len(servers)}.sock")
        server = ControlServer(path, lambda _: doc)
        server.start()
        servers.append(server)
        return path

    yield start
    for server in servers:
        server.stop()


NAN = float("nan")


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"timers": [{}]}, "Object missing required field `pid` - at `$.timers[0]`"),
        ({"uptime": "x"}, "Expected `float`, got `str` - at `$.uptime`"),
        ({"uptime": NAN}, "Expected `float` >= -1000000000000000.0 - at `$.uptime`"),
        ({"timers": "x"}, "Expected `array | null`, got `str` - at `$.timers`"),
        (
            {"timers": [{"pid": 1, "scope_id": "s", "signal": 9, "remaining": float("inf")}]},
            "Expected `float` <= 1000000000000000.0 - at `$.timers[0].remaining`",
        ),
        (
            {"timers": [{"pid": 1, "scope_id": "s", "signal": 9, "remaining": 1, "labels": 3}]},
            "Expected `object | null`, got `int` - at `$.timers[0].labels`",
        ),
        ({"pid": None}, "Expected `int`, got `null` - at `$.pid`"),
    ],
)
@pytest.mark.parametrize("as_json", [False, True])
def test_a_malformed_reply_is_one_line_and_exit_1(
    serve: Serve,
    capsys: pytest.CaptureFixture[str],
    overrides: Dict[str, Any],
    error: str,
    as_json: bool,
) -> None:
    path = serve(status_doc(**overrides))
    assert main(["status", "--control-socket", path, *(["--json"] if as_json else [])]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"ftimer-server: error: the server's reply could not be read: {error}\n"


def test_an_error_reply_is_not_a_status(serve: Serve, capsys: pytest.CaptureFixture[str]) -> None:
    path = serve({"error": "unknown request"})
    assert main(["status", "--control-socket", path]) == 1
    # It said "Object missing required field `version`".
    assert capsys.readouterr().err == (
        f"ftimer-server: error: the daemon on {path} refused the request: unknown request\n"
    )


def test_a_newer_daemons_extra_fields_are_ignored(
    serve: Serve, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = status_doc(future={"x": 1}, timers=[])
    path = serve(doc)
    assert main(["status", "--control-socket", path]) == 0
    assert capsys.readouterr().out == format_status(status_doc(timers=[]))
    assert os.path.exists(path)


def test_format_status_raises_value_error() -> None:
    with pytest.raises(ValueError, match=r"at `\$.uptime`"):
        format_status(status_doc(uptime="x"))


def test_a_daemon_out_of_descriptors_is_not_said_to_stop_reading(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The health check writes a marker through a descriptor of its own: out of them
    # (EMFILE), it said "NOT READING ITS FIFO" of a loop that went on reaping on time,
    # and a liveness probe would have restarted it.
    import errno

    from ftimer_server import FileTimerServer
    from ftimer_server.daemon._config import DaemonConfig
    from ftimer_server.daemon._status import status_document

    def no_descriptor(timeout: float = 10.0) -> None:
        raise OSError(errno.EMFILE, "Too many open files")

    fifo = tmp_path / "t.fifo"
    with FileTimerServer(fifo) as server:
        monkeypatch.setattr(server, "sync", no_descriptor)
        doc = status_document(server, DaemonConfig(fifo=str(fifo)), [], 0.0, False)
    assert doc["healthy"]
    assert not doc["caught_up"]

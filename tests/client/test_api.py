"""The public surface: exactly what __all__ says, torch-compatible signatures, validation."""

from __future__ import annotations

import inspect
import os
import re
import signal
from decimal import Decimal
from typing import Callable

import pytest
from tests.conftest import not_pid_1

import ftimer_client
from ftimer_client import (
    FileTimerClient,
    ServerStalled,
    ServerUnavailable,
    ServerUnavailableWarning,
    expires,
)
from ftimer_protocol import MessageTooLarge


def test_all_is_the_public_api() -> None:
    public = {n for n in dir(ftimer_client) if not n.startswith("_")} | {"__version__"}
    assert set(ftimer_client.__all__) == public
    assert len(ftimer_client.__all__) == len(set(ftimer_client.__all__))


def test_errors_are_what_torch_users_catch() -> None:
    assert issubclass(ServerUnavailable, BrokenPipeError)
    assert issubclass(ServerStalled, ServerUnavailable)
    assert not issubclass(ServerStalled, BlockingIOError)
    assert issubclass(ServerUnavailableWarning, RuntimeWarning)


def test_signatures_match_torch() -> None:
    params = list(inspect.signature(FileTimerClient).parameters.values())
    assert [p.name for p in params[:2]] == ["file_path", "signal"]
    assert params[1].default == signal.SIGKILL
    assert all(p.kind is p.KEYWORD_ONLY for p in params[2:])
    assert list(inspect.signature(FileTimerClient.acquire).parameters) == [
        "self",
        "scope_id",
        "expiration_time",
    ]
    assert list(inspect.signature(FileTimerClient.release).parameters) == ["self", "scope_id"]
    assert list(inspect.signature(expires).parameters) == ["after", "scope", "client"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"protocol": 3}, "protocol"),
        ({"on_unavailable": "retry"}, "on_unavailable"),
        ({"write_timeout": -1}, "write_timeout"),
        ({"write_timeout": float("nan")}, "write_timeout"),
        ({"write_timeout": float("inf")}, "write_timeout"),
        ({"signal": 65}, "signal"),
        ({"signal": "KILL"}, "signal"),
        # Messages in the user's terms, not the schema's regex or a message class name.
        ({"labels": {"1bad": "x"}}, "^label key '1bad' is not allowed: a key is a letter"),
        ({"labels": {"bad-key": "x"}}, "^label key 'bad-key' is not allowed"),
        ({"labels": {"job": "x" * 129}}, "^label 'job' is 129 characters long; the most is 128"),
        ({"labels": {f"k{i}": "" for i in range(17)}}, "^at most 16 labels, not 17"),
        ({"labels": {"job": 7}}, "^labels map strings to strings"),
        ({"pid": 0}, r"^pid must be the id of a process other than init \(2\.\."),
        pytest.param({"pid": 1}, "1 is init", marks=not_pid_1),
        ({"pid": -5}, "negative ids name process groups"),
        ({"pid": True}, "^pid must be"),
        ({"pid": float(os.getpid())}, "^pid must be"),  # this process's, but not an int
        # Torch's format has no labels: they were dropped without a word.
        ({"protocol": 1, "labels": {"job": "x"}}, "^labels need protocol 2"),
    ],
)
def test_bad_arguments_are_refused_at_construction(
    fifo_path: object, kwargs: dict, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        FileTimerClient(fifo_path, **kwargs)  # type: ignore[arg-type]


def test_negative_signal_means_report_only_as_torch_documents(fifo_path: object) -> None:
    client = FileTimerClient(fifo_path, -1)  # type: ignore[arg-type]
    assert client.signal == 0
    assert FileTimerClient(fifo_path, signal.SIGTERM).signal == 15  # type: ignore[arg-type]


def test_construction_does_no_io(fifo_path: object) -> None:
    # No FIFO exists: the client connects lazily, at its first message.
    client = FileTimerClient(fifo_path, labels={})  # type: ignore[arg-type]
    assert client.armed == frozenset()
    assert "FileTimerClient(" in repr(client)
    client.close()
    client.close()


@pytest.mark.parametrize("protocol", [1, 2])
@pytest.mark.parametrize(
    ("call", "message"),
    [
        # Python's own words before ("unsupported operand type(s) for +: 'float' and
        # 'str'"), where expires() and beat() named the argument.
        (lambda c: c.arm("s", "5"), "after must be a number of seconds"),
        (lambda c: c.arm("s", None), "not NoneType None"),
        (lambda c: c.arm("s", Decimal(1)), "not Decimal Decimal('1')"),
        (lambda c: c.arm("s", 1j), "after must be a number of seconds"),
        (lambda c: c.acquire("s", "5"), "expiration time must be a number of"),
    ],
)
def test_a_time_that_is_no_number_is_named(
    fifo_path: object,
    protocol: int,
    call: Callable[[FileTimerClient], None],
    message: str,
) -> None:
    client = FileTimerClient(fifo_path, protocol=protocol, on_unavailable="ignore")
    with pytest.raises(TypeError, match=re.escape(message)):
        call(client)


def test_a_scope_that_cannot_be_sent_is_named_alone(fifo_path: object) -> None:
    # A release named an arm with a made-up deadline ("cannot encode Arm(pid=...,
    # deadline=0.0, ...)"), and a scope one character too long had its message's size
    # counted as that of another message (4,192 bytes, for 4,231 one character shorter).
    client = FileTimerClient(fifo_path, on_unavailable="ignore")
    for protocol in (1, 2):  # torch's format named a release with a time of -1.0
        named = FileTimerClient(fifo_path, protocol=protocol, on_unavailable="ignore")
        with pytest.raises(ValueError, match=r"^scope '\\udc80' holds a lone surrogate \(at 0\)"):
            named.release("\udc80")
    for n, size in ((4096, 4231), (4097, 4232)):
        too_large = f"^framed message is {size} bytes"
        with pytest.raises(MessageTooLarge, match=too_large):
            client.arm("x" * n, 1)
        with pytest.raises(MessageTooLarge, match=too_large):
            client.release("x" * n)

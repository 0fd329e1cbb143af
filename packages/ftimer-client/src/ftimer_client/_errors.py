"""What the client raises or warns when its server cannot take a message.

``ServerUnavailable`` subclasses ``BrokenPipeError`` because that is what torch's
``FileTimerClient`` raises, so ``except BrokenPipeError`` written for torch keeps working.
"""

from __future__ import annotations

__all__ = ["ServerStalled", "ServerUnavailable", "ServerUnavailableWarning"]


class ServerUnavailable(BrokenPipeError):
    """The message could not be delivered: no server reads the FIFO, or the path is wrong.

    Raised when the policy is ``on_unavailable="raise"`` (the default).
    """


class ServerStalled(ServerUnavailable):
    """A server holds the FIFO open but has not drained it within ``write_timeout``."""


class ServerUnavailableWarning(RuntimeWarning):
    """Emitted once per outage when the policy is ``on_unavailable="warn"``."""

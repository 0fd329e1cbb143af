"""ftimer's server: reads timer requests from a FIFO and reaps workers whose timers expire.

Embed ``FileTimerServer`` in an agent (it is a drop-in for torch's), or run the
``ftimer-server`` daemon. See docs/server.md.
"""

from ._events import (
    Armed,
    DecodeFailed,
    Disarmed,
    Escalated,
    Event,
    Expired,
    Reaped,
    Rejected,
    RejectReason,
    WorkerGone,
)
from ._fifo import Fifo, FifoError, open_fifo
from ._policy import Policy
from ._process import ProcessInspector, SystemInspector
from ._records import Timer, Worker
from ._server import FileTimerServer
from ._signaller import OsSignaller, RecordingSignaller, Signaller
from ._stats import Stats
from ._torch import TorchRequest
from ._version import __version__

__all__ = [
    # the server
    "FileTimerServer",
    "Policy",
    "Stats",
    "Timer",
    "Worker",
    # events
    "Event",
    "Armed",
    "Disarmed",
    "Expired",
    "Reaped",
    "Escalated",
    "WorkerGone",
    "Rejected",
    "RejectReason",
    "DecodeFailed",
    # processes and signals
    "Signaller",
    "OsSignaller",
    "RecordingSignaller",
    "ProcessInspector",
    "SystemInspector",
    # the FIFO
    "Fifo",
    "FifoError",
    "open_fifo",
    # torch compatibility
    "TorchRequest",
    "__version__",
]

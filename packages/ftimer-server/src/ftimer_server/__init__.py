"""ftimer's server: reads timer requests from a FIFO and reaps workers whose timers expire.

Embed ``FileTimerServer`` in an agent (it is a drop-in for torch's), or run the
``ftimer-server`` daemon. See docs/server.md.
"""

from ftimer_protocol import FileTimerRequest

from ._version import __version__
from .core._events import (
    Armed,
    DecodeFailed,
    Disarmed,
    Escalated,
    Event,
    Expired,
    Reaped,
    Rejected,
    RejectReason,
    ResendsOver,
    Unkillable,
    WorkerGone,
)
from .core._incident import (
    Capture,
    ChildState,
    Frame,
    Group,
    Incident,
    ProcessFacts,
    ThreadStack,
)
from .core._policy import Policy
from .core._records import Descendant, Timer, Worker
from .core._stats import Stats
from .incidents._options import IncidentOptions
from .server._fifo import Fifo, FifoBusy, FifoError, open_fifo
from .server._process import ProcessInspector, SystemInspector
from .server._server import FileTimerServer, Lifecycle
from .server._signaller import OsSignaller, RecordingSignaller, Signaller

__all__ = [
    # the server
    "FileTimerServer",
    "Lifecycle",
    "Policy",
    "Stats",
    "Timer",
    "Worker",
    # incidents: why a reaped worker hung
    "IncidentOptions",
    "Incident",
    "Capture",
    "ThreadStack",
    "Frame",
    "Group",
    "ProcessFacts",
    "ChildState",
    # events
    "Event",
    "Armed",
    "Disarmed",
    "Expired",
    "Reaped",
    "Escalated",
    "Unkillable",
    "WorkerGone",
    "Rejected",
    "ResendsOver",
    "RejectReason",
    "DecodeFailed",
    # processes and signals
    "Signaller",
    "Descendant",
    "OsSignaller",
    "RecordingSignaller",
    "ProcessInspector",
    "SystemInspector",
    # the FIFO
    "Fifo",
    "FifoError",
    "FifoBusy",
    "open_fifo",
    # torch compatibility
    "FileTimerRequest",
    "__version__",
]

"""ftimer's worker-side client: arm a watchdog timer around a step, disarm it on exit.

    from ftimer_client import FileTimerClient, configure, expires

    configure(FileTimerClient())
    with expires(after=60):
        train_step()

A drop-in for ``torch.distributed.elastic.timer``'s ``FileTimerClient``,
``FileTimerRequest``, ``configure`` and ``expires``. See docs/client.md.
"""

from ftimer_protocol import FileTimerRequest

from ._client import POLICIES, FileTimerClient
from ._errors import ServerStalled, ServerUnavailable, ServerUnavailableWarning
from ._expires import TimerClient, configure, expires
from ._paths import resolve_fifo_path
from ._version import __version__

__all__ = [
    "FileTimerClient",
    "FileTimerRequest",
    "configure",
    "expires",
    "TimerClient",
    "POLICIES",
    "resolve_fifo_path",
    "ServerUnavailable",
    "ServerStalled",
    "ServerUnavailableWarning",
    "__version__",
]

"""ftimer's wire protocol: newline-delimited JSON messages of at most PIPE_BUF bytes.

Sans-I/O: nothing here opens, reads or writes anything. See docs/protocol.md.
"""

from ._codec import SUPPORTED_VERSIONS, decode, decode_value, encode
from ._errors import (
    LineTooLong,
    LocalProtocolError,
    MalformedMessage,
    MessageTooLarge,
    ProtocolError,
    RemoteProtocolError,
    UnsupportedVersion,
)
from ._limits import (
    MAX_LABEL_VALUE,
    MAX_LABELS,
    MAX_PID,
    MAX_SCOPE,
    MAX_SIGNAL,
    MAX_TIME,
    PIPE_BUF,
)
from ._messages import (
    Arm,
    Disarm,
    DisarmAll,
    DumpHook,
    Expire,
    Message,
    MessageV2,
    Sync,
    TimerRequestV1,
)
from ._paths import SYSTEM_FIFO_PATH, default_fifo_path
from ._stream import MESSAGE_START, DecodeResult, StreamDecoder, decode_line
from ._torch import FileTimerRequest
from ._version import __version__

__all__ = [
    # framing and codec
    "PIPE_BUF",
    "SUPPORTED_VERSIONS",
    "MESSAGE_START",
    "encode",
    "decode",
    "decode_value",
    "decode_line",
    "StreamDecoder",
    "DecodeResult",
    # messages
    "Message",
    "MessageV2",
    "TimerRequestV1",
    "FileTimerRequest",
    "Arm",
    "Disarm",
    "DisarmAll",
    "DumpHook",
    "Expire",
    "Sync",
    # where a server listens by default
    "SYSTEM_FIFO_PATH",
    "default_fifo_path",
    # limits
    "MAX_PID",
    "MAX_SIGNAL",
    "MAX_SCOPE",
    "MAX_TIME",
    "MAX_LABELS",
    "MAX_LABEL_VALUE",
    # errors
    "ProtocolError",
    "LocalProtocolError",
    "MessageTooLarge",
    "RemoteProtocolError",
    "MalformedMessage",
    "UnsupportedVersion",
    "LineTooLong",
    "__version__",
]

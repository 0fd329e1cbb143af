"""ftimer's wire protocol: newline-delimited JSON messages of at most PIPE_BUF bytes.

Sans-I/O: nothing here opens, reads or writes anything. See docs/protocol.md. Besides
the schema and the codec: where a server listens (the FIFO and the socket beside it) and
the pure helpers both sides share (``/proc/PID/stat`` parsing, signal names).
"""

from ._codec import (
    SUPPORTED_VERSIONS,
    V1_PREFIXES,
    V2_PREFIX,
    decode,
    decode_value,
    encode,
    surrogates_as_text,
    torch_request,
)
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
    LABEL_KEY_PATTERN,
    MAX_FD,
    MAX_LABEL_VALUE,
    MAX_LABELS,
    MAX_PID,
    MAX_SCOPE,
    MAX_SIGNAL,
    MAX_TIME,
    MAX_TOKEN,
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
from ._paths import (
    ENV_FIFO,
    ENV_SOCKET,
    ENV_TORCH_FIFO,
    FIFO_ENV_VARS,
    SYSTEM_FIFO_PATH,
    SYSTEM_SOCKET_PATH,
    default_fifo_path,
    default_socket_path,
    socket_path_for,
)
from ._procstat import (
    ProcStat,
    parse_proc_stat,
    parse_proc_status,
    parse_start_time,
    proc_status_field,
)
from ._signals import parse_signal, signal_name
from ._stream import MESSAGE_START, DecodeResult, StreamDecoder, decode_line
from ._torch import FileTimerRequest
from ._version import __version__

__all__ = [
    # framing and codec
    "PIPE_BUF",
    "SUPPORTED_VERSIONS",
    "MESSAGE_START",
    "V1_PREFIXES",
    "V2_PREFIX",
    "encode",
    "decode",
    "decode_value",
    "surrogates_as_text",
    "torch_request",
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
    # where a server listens by default, and the environment variables that say where
    "SYSTEM_FIFO_PATH",
    "SYSTEM_SOCKET_PATH",
    "default_fifo_path",
    "default_socket_path",
    "socket_path_for",
    "ENV_FIFO",
    "ENV_TORCH_FIFO",
    "ENV_SOCKET",
    "FIFO_ENV_VARS",
    # helpers clients and servers share (pure: the caller does the I/O)
    "ProcStat",
    "parse_proc_stat",
    "parse_proc_status",
    "parse_start_time",
    "proc_status_field",
    "parse_signal",
    "signal_name",
    # limits
    "MAX_PID",
    "MAX_SIGNAL",
    "MAX_SCOPE",
    "MAX_TIME",
    "MAX_TOKEN",
    "MAX_LABELS",
    "MAX_LABEL_VALUE",
    "LABEL_KEY_PATTERN",
    "MAX_FD",
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

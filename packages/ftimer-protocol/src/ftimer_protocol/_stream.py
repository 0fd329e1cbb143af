"""A sans-I/O streaming decoder for the newline-delimited message stream of a FIFO.

Many writers share one FIFO. Each valid message arrives whole (one atomic write of at
most PIPE_BUF bytes), but a writer that dies or misbehaves can leave bytes with no
newline in front of the next writer's message. The resynchronisation rule: a message
starts with ``{"version"``, and inside a message that sequence can only start its
``labels`` object (a label named ``version``, whose value is a string and so never
decodes as a message): a JSON string cannot contain an unescaped quote, and members added
later hold no object that starts with ``"version"`` (docs/protocol.md, evolution rule 7).
So when a line does not decode, the only message it can still hold starts at its last or
second-to-last ``{"version"``, tried in that order. Everything before it costs one error,
never the message. (An unknown member that breaks rule 7 is still read on a line of its
own; behind junk, its message may be lost with the junk.)
"""

from __future__ import annotations

from typing import List, Optional, Union

from ._codec import Buffer, decode_value
from ._errors import EXCERPT_BYTES, LineTooLong, RemoteProtocolError
from ._limits import PIPE_BUF
from ._messages import Message

__all__ = ["MESSAGE_START", "DecodeResult", "StreamDecoder", "decode_line"]

#: Every message begins with these bytes; the decoder resynchronises on them.
MESSAGE_START = b'{"version"'

#: What decoding a line gives: the message, or the error as a value (never raised).
DecodeResult = Union[Message, RemoteProtocolError]

# JSON's whitespace, newline aside: a line of only these holds no message, and no junk.
_BLANK = b" \t\r"


def decode_line(
    line: bytes, max_line: int = PIPE_BUF, *, overlong_excerpt: Optional[bytes] = None
) -> List[DecodeResult]:
    """Decode one complete line (without its newline) into results; never raises.

    Returns ``[]`` for a blank line (empty or JSON whitespace only), ``[message]`` for a
    valid one, ``[error]`` for a bad one, and ``[error, message]`` when a valid message
    follows junk on the same line.

    Args:
        line: the line's bytes, newline excluded.
        max_line: the longest line accepted, in bytes (torch may write ``PIPE_BUF``).
        overlong_excerpt: set by the stream decoder when it already dropped the start of
            this line for being too long; the excerpt is that start.
    """
    if overlong_excerpt is None and len(line) <= max_line:
        if not line.strip(_BLANK):
            return []
        result = decode_value(line, max_line)
        if not isinstance(result, RemoteProtocolError):
            return [result]
        out: List[DecodeResult] = [result]
    else:
        excerpt = line[:EXCERPT_BYTES] if overlong_excerpt is None else overlong_excerpt
        out = [LineTooLong(f"line longer than {max_line} bytes", excerpt)]
    # A line whose start was dropped (``overlong_excerpt``) was never decoded whole: a
    # message may start where what is left of it starts.
    message = _resync(line, max_line, first=0 if overlong_excerpt is not None else 1)
    if message is not None:
        out.append(message)
    return out


def _resync(line: bytes, max_line: int, first: int = 1) -> Optional[DecodeResult]:
    """The message the bad ``line`` ends with, if any (see the module's docstring),
    starting at ``first`` or later (at 0, it is the whole line, already decoded)."""
    end = len(line)
    for _ in range(2):
        start = line.rfind(MESSAGE_START, 0, end)
        if start < first or len(line) - start > max_line:
            return None
        result = decode_value(line[start:], max_line)
        if not isinstance(result, RemoteProtocolError):
            return result
        end = start
    return None


class StreamDecoder:
    """Turns chunks of a byte stream, split anywhere, into messages and error values.

    Memory is bounded: an unfinished line is kept only up to its last ``max_line`` bytes.

    Args:
        max_line: the longest line accepted, newline excluded; defaults to ``PIPE_BUF``,
            the longest line torch's client writes.
    """

    __slots__ = ("_buf", "_max_line", "_overlong")

    def __init__(self, max_line: int = PIPE_BUF) -> None:
        if max_line < len(MESSAGE_START):
            raise ValueError(f"max_line must be at least {len(MESSAGE_START)}")
        self._max_line = max_line
        self._buf = b""
        # Excerpt of the current line once it has grown past max_line, else None.
        self._overlong: Optional[bytes] = None

    @property
    def buffered(self) -> int:
        """Bytes held of a line whose newline has not arrived yet."""
        return len(self._buf)

    @property
    def unfinished(self) -> bytes:
        """The bytes held of a line whose newline has not arrived yet (its last
        ``max_line`` bytes, once it is longer)."""
        return self._buf

    def feed(self, data: Buffer) -> List[DecodeResult]:
        """Consume ``data`` and return the results of every line it completes, in order.

        Never raises on bad input: a bad line becomes a ``RemoteProtocolError`` value.
        """
        if not data:
            return []
        buf = self._buf + data if self._buf else bytes(data)
        lines = buf.split(b"\n")
        rest = lines.pop()
        out: List[DecodeResult] = []
        max_line = self._max_line
        if lines:
            first = 0
            if self._overlong is not None:
                out += decode_line(lines[0], max_line, overlong_excerpt=self._overlong)
                self._overlong = None
                first = 1
            for i in range(first, len(lines)):
                line = lines[i]
                if line:
                    out += decode_line(line, max_line)
        if len(rest) > max_line:
            if self._overlong is None:
                self._overlong = rest[:EXCERPT_BYTES]
            rest = rest[-max_line:]
        self._buf = rest
        return out

    def close(self) -> List[DecodeResult]:
        """End of stream: decode what is buffered as a final line and reset."""
        line, excerpt = self._buf, self._overlong
        self._buf, self._overlong = b"", None
        return decode_line(line, self._max_line, overlong_excerpt=excerpt)

"""The protocol's errors, rooted at ProtocolError and split by whose fault it is.

``LocalProtocolError``: this side tried to encode something invalid (a bug or a bad
argument in the caller). ``RemoteProtocolError``: a peer sent bytes that are not a valid
message. The stream decoder never raises the latter; it hands them back as values.
"""

from __future__ import annotations

from typing import Optional

from ._limits import PIPE_BUF

__all__ = [
    "LineTooLong",
    "LocalProtocolError",
    "MalformedMessage",
    "MessageTooLarge",
    "ProtocolError",
    "RemoteProtocolError",
    "UnsupportedVersion",
]

# How much of an offending line an error keeps, for logs.
EXCERPT_BYTES = 64


class ProtocolError(Exception):
    """Root of every error raised or reported by ftimer_protocol."""


class LocalProtocolError(ProtocolError, ValueError):
    """We tried to encode a message that breaks the schema."""


class MessageTooLarge(LocalProtocolError, RuntimeError):
    """The framed message (newline included) is larger than the atomic-write limit.

    Also a ``RuntimeError``: what torch's client raises for the same message, so that a
    program written for torch's API catches it unchanged.
    """

    def __init__(self, size: int, limit: int) -> None:
        what = "PIPE_BUF limit" if limit == PIPE_BUF else "limit"  # encode(limit=) sets another
        super().__init__(f"framed message is {size} bytes, over the {limit}-byte {what}")
        self.size = size
        self.limit = limit


class RemoteProtocolError(ProtocolError):
    """A peer sent a line that is not a valid message.

    Attributes:
        reason: what was wrong.
        excerpt: up to the first 64 bytes of the offending line, for logs.
        lines: how many consecutive lines this error stands for: 1 from ``decode()`` and
            ``StreamDecoder``; a reader may report a run of junk lines of one kind (a
            ``yes`` flood) as one error, with the excerpt of the first.
    """

    def __init__(self, reason: str, excerpt: Optional[bytes] = None, lines: int = 1) -> None:
        super().__init__(reason)
        self.reason = reason
        self.excerpt = excerpt
        self.lines = lines

    def __eq__(self, other: object) -> bool:
        # Value semantics, so decoded streams can be compared in tests and dedup'd in logs.
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, RemoteProtocolError)
        return (self.reason, self.excerpt, self.lines) == (other.reason, other.excerpt, other.lines)

    def __hash__(self) -> int:
        return hash((type(self), self.reason, self.excerpt, self.lines))

    def __repr__(self) -> str:
        lines = f", lines={self.lines}" if self.lines != 1 else ""
        return f"{type(self).__name__}({self.reason!r}, excerpt={self.excerpt!r}{lines})"


class MalformedMessage(RemoteProtocolError):
    """Not JSON, not an object, a field missing, of the wrong type or out of bounds."""


class UnsupportedVersion(RemoteProtocolError):
    """A well-formed message of a protocol version this side does not speak."""

    def __init__(self, version: object, excerpt: Optional[bytes] = None, lines: int = 1) -> None:
        super().__init__(f"unsupported protocol version {version!r}", excerpt, lines)
        self.version = version


class LineTooLong(RemoteProtocolError):
    """A line longer than the decoder's limit; its bytes were dropped."""

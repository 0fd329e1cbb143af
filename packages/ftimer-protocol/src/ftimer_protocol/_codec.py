"""encode() and decode(): one message to one framed line and back.

Dispatch is by the "version" member. A message written by ftimer starts with
``{"version":N,``; lines with that exact prefix take a single-parse fast path, anything
else is first parsed for its version alone.

A line that fails only for its lone surrogate escapes (``"\\udce9"``: what torch's client
writes for a scope naming a path that is not UTF-8) is read with each of them as text,
``\\xe9`` (docs/protocol.md, "Lone surrogates"); a version 1 line that fails only for its
``expiration_time`` (``Infinity``, ``NaN``, beyond the bound) is read as torch's server
reads it. Both looked at only once a line failed.
"""

from __future__ import annotations

import json
import numbers
import operator
import re
from collections.abc import Mapping
from json.encoder import encode_basestring_ascii
from typing import Any, Callable, Dict, Optional, Union

import msgspec

from ._errors import (
    EXCERPT_BYTES,
    LineTooLong,
    LocalProtocolError,
    MalformedMessage,
    MessageTooLarge,
    RemoteProtocolError,
    UnsupportedVersion,
)
from ._limits import MAX_TIME, PIPE_BUF
from ._messages import Message, MessageV2, TimerRequestV1

__all__ = [
    "SUPPORTED_VERSIONS",
    "V1_PREFIXES",
    "V2_PREFIX",
    "decode",
    "decode_value",
    "encode",
    "surrogates_as_text",
    "torch_request",
]

#: The protocol versions this package reads and writes.
SUPPORTED_VERSIONS = (1, 2)

Buffer = Union[bytes, bytearray, memoryview]

_encoder = msgspec.json.Encoder()
_v1_decoder = msgspec.json.Decoder(TimerRequestV1)
_v2_decoder = msgspec.json.Decoder(MessageV2)


class _Envelope(msgspec.Struct):
    version: Any = msgspec.UNSET


_envelope_decoder = msgspec.json.Decoder(_Envelope)
#: What decoding a line may raise: msgspec's errors, and RecursionError for JSON nested
#: deeper than it recurses (``{"version":[[[[...``, a 1 KiB line).
_DECODE_ERRORS = (msgspec.ValidationError, msgspec.DecodeError, RecursionError)
#: How every version 2 line this encoder writes begins: a reader may decode a line that
#: begins so with the version 2 schema at once (a fast path), without reading its version.
V2_PREFIX = b'{"version":2,'
# JSON's white space; a line whose first other byte is not "{" holds no JSON object.
_WHITESPACE = b" \t\r\n"
NOT_AN_OBJECT = "not a JSON object"
NO_VERSION = 'no "version" member'

#: How version 1 lines begin: torch's ``json.dumps`` and this encoder; a reader may decode
#: a line that begins so with the version 1 schema at once. Any other line is first
#: parsed for its version alone.
V1_PREFIXES = (b'{"version": 1,', b'{"version":1,')
_by_version: Dict[Any, Callable[[bytes], Message]] = {
    1: _v1_decoder.decode,
    2: _v2_decoder.decode,
}
# A run of JSON escapes of UTF-16 surrogates, or any other escape: matched from the left,
# so that an escaped backslash followed by "u" (the text ``\udce9``) is never taken for one.
_ESCAPES = re.compile(rb"(?:\\u[dD][89a-fA-F][0-9a-fA-F]{2})+|\\.", re.DOTALL)
_SURROGATE = re.compile("[\ud800-\udfff]")
_TIME_MEMBER = rb'"expiration_time"[ \t\r\n]*:[ \t\r\n]*'
_VALUE_ENDS = rb"(?=[ \t\r\n]*[,}])"
#: What torch's client writes for an infinite or NaN time (``json.dumps``), not JSON.
_NOT_A_NUMBER = re.compile(_TIME_MEMBER + rb"-?(?:Infinity|NaN)" + _VALUE_ENDS)
#: Where msgspec stopped, in its error: "JSON is malformed: invalid character (byte 60)".
_AT_BYTE = re.compile(r"\(byte (\d+)\)$")
#: A version 1 line's time: its member, and its value (a number, or what torch's client
#: writes for an infinite or NaN one).
_TORCH_TIME = re.compile(_TIME_MEMBER + rb"(-?(?:Infinity|NaN|[0-9][0-9.eE+-]*))" + _VALUE_ENDS)
#: How a reader takes a time beyond the bound: torch's server never expires it (a timer
#: at the bound) or, below it, releases.
_NEVER, _RELEASE = repr(float(MAX_TIME)).encode(), b"-1.0"
#: Escapes of the letters of "version" (U+0065 to U+0076): a member name that may spell it.
_LETTER_ESCAPE = re.compile(rb"\\u00[67]")
#: A character outside ASCII: only ever inside a JSON string of an encoded message.
_NON_ASCII = re.compile("[^\x00-\x7f]+")


def _ascii_escape(match: re.Match[str]) -> str:
    return encode_basestring_ascii(match.group())[1:-1]


def encode(message: Message, *, limit: int = PIPE_BUF) -> bytes:
    """Return ``message`` as one framed line: compact JSON and a trailing newline.

    Args:
        message: a ``TimerRequestV1`` (torch's format) or a version 2 message.
        limit: the largest framed size allowed, newline included; defaults to the
            platform's ``PIPE_BUF`` so that one ``write()`` of the result is atomic.

    Raises:
        MessageTooLarge: the framed line would be larger than ``limit`` bytes.
        LocalProtocolError: the message breaks the schema (a field out of bounds, of the
            wrong type, a NaN time, ...) or is not a message at all.
    """
    # Typed as the union: each decoder's stubs name only its own result type.
    check: Callable[[Buffer], Message]
    try:
        body = _encoder.encode(message)
    # UnicodeEncodeError: a string holding a lone surrogate, which UTF-8 cannot carry.
    except (TypeError, UnicodeEncodeError, msgspec.EncodeError) as e:
        raise LocalProtocolError(f"cannot encode {message!r}: {e}") from None
    if type(message) is TimerRequestV1:
        check = _v1_decoder.decode
        if not body.isascii():
            # torch's server decodes its FIFO with the locale's encoding, and its client
            # writes ASCII only (json.dumps): any other character as a \uXXXX escape,
            # counted as such against PIPE_BUF.
            body = _NON_ASCII.sub(_ascii_escape, body.decode()).encode()
        line = body + b"\n"
    else:
        check = _v2_decoder.decode
        line = b"".join((V2_PREFIX, memoryview(body)[1:], b"\n"))
    if len(line) > limit:
        raise MessageTooLarge(len(line), limit)
    # The schema is checked by decoding what we are about to send with the decoder every
    # reader uses: what we emit is exactly what we accept.
    try:
        if check(body) != message:
            raise LocalProtocolError(f"{message!r} does not survive a round trip")
    except msgspec.ValidationError as e:
        raise LocalProtocolError(f"invalid {type(message).__name__}: {e}") from None
    except msgspec.DecodeError as e:
        raise LocalProtocolError(f"cannot encode {message!r}: {e}") from None
    return line


def decode(line: Buffer) -> Message:
    """Decode one line (a trailing newline is allowed) into a message.

    Unknown members are ignored, so an older reader accepts a newer writer's additions.

    Raises:
        LineTooLong: the line, newline excluded, is longer than ``PIPE_BUF`` bytes (no
            writer may send it).
        UnsupportedVersion: the line is a JSON object whose "version" this reader does not
            speak.
        MalformedMessage: anything else wrong: not JSON, not an object, no version, a
            member missing, of the wrong type or out of bounds.
    """
    result = decode_value(line)
    if isinstance(result, RemoteProtocolError):
        raise result
    return result


def decode_value(line: Buffer, max_line: int = PIPE_BUF) -> Union[Message, RemoteProtocolError]:
    """``decode()`` without raising: the message, or the error as a value.

    The error is never raised, so it holds no traceback (no frames kept alive). A line
    that cannot be a message is refused without parsing: one that holds no JSON object
    (``yes`` output, binary junk), or no ``"version"`` member name (which every message
    spells out as it is). A line that fails only for lone surrogate escapes is read with
    each of them as text (see ``surrogates_as_text``).
    """
    if type(line) is not bytes:
        line = bytes(line)
    if len(line) > max_line and len(line) - line.endswith(b"\n") > max_line:
        return LineTooLong(f"line longer than {max_line} bytes", line[:EXCERPT_BYTES])
    return _decoded(line)


def _decoded(line: bytes) -> Union[Message, RemoteProtocolError]:
    """``decode_value()`` of a line of any length."""
    if line.startswith(V2_PREFIX):
        decoder: Callable[[bytes], Message] = _v2_decoder.decode
    elif line.startswith(V1_PREFIXES):
        decoder = _v1_decoder.decode
    elif line.lstrip(_WHITESPACE)[:1] != b"{":
        return MalformedMessage(NOT_AN_OBJECT, line[:EXCERPT_BYTES])
    elif b'"version"' not in line:
        return MalformedMessage(NO_VERSION, line[:EXCERPT_BYTES])
    else:
        try:
            version = _envelope_decoder.decode(line).version
        except _DECODE_ERRORS as e:
            return _refused(line, e)
        if line.count(b'"version"') > 1 or _LETTER_ESCAPE.search(line):  # maybe two
            version = _first_version(line, version)
        if version is msgspec.UNSET:
            return MalformedMessage(NO_VERSION, line[:EXCERPT_BYTES])
        slow = _by_version.get(version) if type(version) is int else None
        if slow is None:
            return UnsupportedVersion(version, line[:EXCERPT_BYTES])
        decoder = slow
    try:
        return decoder(line)
    except _DECODE_ERRORS as e:
        return _refused(line, e)


def _first_version(line: bytes, last: Any) -> Any:
    """The first "version" member of the object ``line`` holds (msgspec's envelope gives
    the ``last``): a reader reads the version first, and the fast paths dispatch on it
    (their decoders then take a later one as an unknown member, or refuse it)."""
    try:  # bytes that are not UTF-8 in a string msgspec skipped: kept, as text
        text = line.decode("utf-8", "surrogateescape")
        members = json.loads(text, object_pairs_hook=list)  # every object as its pairs
    except (ValueError, RecursionError):
        return last
    return next((value for name, value in members if name == "version"), last)


def _refused(line: bytes, error: Exception) -> Union[Message, RemoteProtocolError]:
    """The ``MalformedMessage`` of ``line``, which failed to decode with ``error``; or its
    message, if it decodes once each lone surrogate escape in it is read as text (see
    ``surrogates_as_text``). msgspec refuses those escapes, which JSON allows and torch's
    client writes (``json.dumps`` of a scope naming a path that is not UTF-8)."""
    if b"\\ud" in line or b"\\uD" in line:
        fixed = _ESCAPES.sub(_escapes_as_text, line)
        if fixed != line:
            # It holds none now: only the time's retry is left. Its length is the line's
            # as sent (a high surrogate's text is longer than its escape).
            result = _decoded(fixed)
            if not isinstance(result, RemoteProtocolError):
                return result
            return MalformedMessage(str(error), line[:EXCERPT_BYTES])
    # Version 1 lines only, refused for their time: other junk costs no second parse.
    if not line.startswith(V2_PREFIX) and _time_at_fault(line, str(error)):
        request = _with_torch_time(line)
        if request is not None:
            return request
    return MalformedMessage(str(error), line[:EXCERPT_BYTES])


def _time_at_fault(line: bytes, error: str) -> bool:
    """Whether msgspec's ``error`` may be about the ``expiration_time`` of ``line``: its
    value out of bounds, or a constant JSON lacks where it stopped (a look at those bytes
    alone: junk costs no search through it)."""
    if error.endswith("`$.expiration_time`"):
        return True
    at = _AT_BYTE.search(error)
    if at is None:
        return False
    where = int(at.group(1))
    # The member's name may be any amount of JSON white space before the value: look
    # back to the last name before where msgspec stopped, and match from there.
    start = line.rfind(b'"expiration_time"', 0, where)
    if start < 0:
        return False
    found = _NOT_A_NUMBER.match(line, start)
    return found is not None and found.end() >= where


def _with_torch_time(line: bytes) -> Optional[TimerRequestV1]:
    """The version 1 request of ``line``, which msgspec refused, if only its
    ``expiration_time`` was at fault: ``Infinity``, ``-Infinity`` and ``NaN``, which
    torch's client writes (``json.dumps``) and JSON lacks, or a number beyond the
    protocol's bound (``time.time() + sys.maxsize``). None otherwise.

    The time is read as torch's server reads it (``torch_request``), written back in its
    place, and the line decoded again as any other: all else in it is judged as in a
    line that needs no retry."""
    times = _TORCH_TIME.findall(line)
    if len(times) != 1:  # none, or in objects of unknown members too
        return None
    try:
        time = float(times[0])  # inf for 1e400, which msgspec refuses
    except ValueError:  # "1.2.3"
        return None
    if -MAX_TIME <= time <= MAX_TIME:
        return None  # within the bound: not what msgspec refused
    # NaN compares false: torch's server never finds it due, nor below zero.
    read_as = _RELEASE if time < -MAX_TIME else _NEVER
    try:
        return _v1_decoder.decode(_TORCH_TIME.sub(rb'"expiration_time":' + read_as, line))
    except _DECODE_ERRORS:
        return None


def torch_request(fields: Mapping[str, Any]) -> TimerRequestV1:
    """The version 1 request of torch's ``fields`` (``pid``, ``scope_id``,
    ``expiration_time``, ``signal``; others are ignored), with the time read as torch's
    server reads it: one it never expires (infinite, NaN, or beyond the protocol's
    ``MAX_TIME``) arms at ``MAX_TIME``, and one below ``-MAX_TIME`` releases.

    Raises:
        MalformedMessage: a field is missing, of the wrong type or out of bounds.
    """
    fields = dict(fields, version=1)
    for name in ("pid", "expiration_time", "signal"):
        if name in fields:
            fields[name] = _plain_number(fields[name])
    time = fields.get("expiration_time")
    if isinstance(time, (int, float)) and not -MAX_TIME <= time <= MAX_TIME:
        # NaN compares false: torch's server never finds it due, nor below zero.
        fields["expiration_time"] = -1.0 if time < -MAX_TIME else MAX_TIME
    try:
        return msgspec.convert(fields, TimerRequestV1)
    except msgspec.ValidationError as e:
        raise MalformedMessage(str(e), repr(fields).encode()[:EXCERPT_BYTES]) from None


def _plain_number(value: Any) -> Any:
    """``value`` as the plain ``int`` or ``float`` torch's server computes with: a numpy
    scalar (``np.float64`` is a subclass of float, ``np.int64`` is no int at all), any
    other subclass of float or integer type, which torch's server keeps and ``kill()``s
    with, and which the schema would refuse; anything else (a bool, a str) as it is."""
    if type(value) in (int, float) or isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral):
        return operator.index(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def _escapes_as_text(match: re.Match[bytes]) -> bytes:
    """A run of surrogate escapes with each lone surrogate in it as text; any other
    escape unchanged."""
    escapes = match.group()
    if len(escapes) < 6:  # another escape
        return escapes
    # JSON reads a high surrogate's escape followed by a low one's as one character.
    text = (
        escapes.decode("unicode_escape")
        .encode("utf-16-le", "surrogatepass")
        .decode("utf-16-le", "surrogatepass")
    )
    return encode_basestring_ascii(surrogates_as_text(text))[1:-1].encode()


def surrogates_as_text(text: str) -> str:
    """``text`` with each lone surrogate in it (which UTF-8 cannot carry) written as
    text: for U+DC80..U+DCFF, which is how Python holds byte NN of a path that is not
    UTF-8 (``os.fsdecode``), ``\\xNN``, as ``backslashreplace`` writes that byte; for
    any other, ``\\uXXXX``. What a decoder reads for torch's escape of one, and what
    ftimer's client writes for a default scope (a file name): both name one scope."""
    return _SURROGATE.sub(_surrogate_text, text)


def _surrogate_text(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"

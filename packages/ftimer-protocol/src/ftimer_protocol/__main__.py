"""``python -m ftimer_protocol``: a self-check that encodes, splits and decodes a stream."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from . import (
    PIPE_BUF,
    Arm,
    Disarm,
    DisarmAll,
    Expire,
    Message,
    StreamDecoder,
    TimerRequestV1,
    __version__,
    encode,
)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the self-check; ``--help`` says what it does (argparse exits 2 on anything else)."""
    argparse.ArgumentParser(
        prog="python -m ftimer_protocol",
        description="Encode one message of each kind, split the stream into 7-byte reads "
        "after a line of junk, decode it, and check that every message comes back "
        "(exit status 0) and the junk is reported.",
    ).parse_args(argv)
    messages: list[Message] = [
        TimerRequestV1(pid=4242, scope_id="train.py#12", expiration_time=1.7e9, signal=9),
        Arm(pid=4242, scope_id="step", deadline=1234.5, signal=15, labels={"rank": "0"}),
        Expire(pid=4242, scope_id="step", signal=6),
        Disarm(pid=4242, scope_id="step", start_time=987654),
        DisarmAll(pid=4242),
    ]
    stream = b"".join(encode(m) for m in messages)
    junk = b"\x00garbage with no newline"
    stream = junk + stream
    decoder = StreamDecoder()
    results = [r for i in range(0, len(stream), 7) for r in decoder.feed(stream[i : i + 7])]
    print(f"ftimer-protocol {__version__}, PIPE_BUF={PIPE_BUF}")
    for r in results:
        print(f"  {r!r}")
    ok = results[1:] == messages and len(results) == len(messages) + 1
    print("self-check:", "ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Protocol encode/decode throughput: ftimer's codec against torch's json.dumps/json.loads."""

from __future__ import annotations

import json
import statistics
import time
from typing import Any, Callable, Dict, List

from ftimer_protocol import Arm, StreamDecoder, TimerRequestV1, encode

N = 20_000


def _rate(fn: Callable[[], Any], n: int) -> float:
    start = time.perf_counter()
    fn()
    return n / (time.perf_counter() - start)


def run(quick: bool) -> List[Dict[str, Any]]:
    """Messages per second, median of interleaved repetitions."""
    reps = 3 if quick else 9
    v1 = TimerRequestV1(pid=4242, scope_id="train.py#57", expiration_time=1.7e9, signal=9)
    v2 = Arm(pid=4242, scope_id="train.py#57", deadline=81234.5, signal=9, start_time=12345)
    as_dict = {
        "version": 1,
        "pid": 4242,
        "scope_id": "train.py#57",
        "expiration_time": 1.7e9,
        "signal": 9,
    }
    v1_stream = encode(v1) * N
    v2_stream = encode(v2) * N
    torch_stream = (json.dumps(as_dict) + "\n") * N

    def torch_decode() -> None:
        # torch's server: readline() then json.loads per line.
        for line in torch_stream.splitlines():
            json.loads(line)

    cases = {
        "encode v1": lambda: [encode(v1) for _ in range(N)],
        "encode v2": lambda: [encode(v2) for _ in range(N)],
        "encode torch": lambda: [json.dumps(as_dict) + "\n" for _ in range(N)],
        "decode v1": lambda: StreamDecoder().feed(v1_stream),
        "decode v2": lambda: StreamDecoder().feed(v2_stream),
        "decode torch": torch_decode,
    }
    samples: Dict[str, List[float]] = {name: [] for name in cases}
    for _ in range(reps):  # interleaved, so drift hits every case alike
        for name, fn in cases.items():
            samples[name].append(_rate(fn, N))
    med = {name: statistics.median(s) for name, s in samples.items()}
    rows = []
    for op in ("encode", "decode"):
        for version in ("v1", "v2"):
            rows.append(
                {
                    "group": "protocol",
                    "metric": f"{op} {version} (msgs/s)",
                    "unit": "msgs/s",
                    "ftimer": med[f"{op} {version}"],
                    "torch": med[f"{op} torch"],
                    "better": "higher",
                    "note": "torch: json.dumps/json.loads of the same dict"
                    + ("; ftimer validates every message" if op == "encode" else ""),
                }
            )
    return rows

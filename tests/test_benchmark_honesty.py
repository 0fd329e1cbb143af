"""The benchmark's own arithmetic, as the brief asks it measured: every target a ratio of
the same run (machines differ about 3x in absolute times), and a p99 that is the same
statistic in both columns of a row. Its measurements themselves are `nox -s bench`'s."""

from __future__ import annotations

import pathlib
import sys
from typing import Any, Dict, List, Tuple

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent / "benchmarks"))

import bench_server
import run

BLOCK = "us per expires block, explicit scope, ftimer v2"
DEFAULT_SCOPE = "us per expires block, default scope, ftimer v2"


def verdicts(
    group: str, metric: str, ftimer: float, torch: float, **extra: Any
) -> List[Tuple[str, bool]]:
    row: Dict[str, Any] = {
        "group": group, "metric": metric, "unit": "x", "ftimer": ftimer, "torch": torch,
        "better": "lower", **extra,
    }  # fmt: skip
    return [(c["target"], c["met"]) for c in run.check_targets([row]) if c["met"] is not None]


@pytest.mark.parametrize(
    ("metric", "ftimer", "torch", "floor"),
    [
        (BLOCK, 3.44, 31.3, 1.06),  # 9.1x torch (a run docs/benchmarks.md shows): not met
        (BLOCK, 4.9, 60.0, 1.0),  # 12x torch, but 4.9x the floor
        (DEFAULT_SCOPE, 5.0, 60.0, 1.0),  # 12x torch, where a default scope asks 15x
    ],
)
def test_a_client_block_is_judged_against_torch_and_the_floor_of_its_run(
    metric: str, ftimer: float, torch: float, floor: float
) -> None:
    # Only "<= 5 us" and "<= 6 us" were checked: each of these was reported met.
    judged = verdicts("client", metric, ftimer, torch, floor=floor)
    assert judged
    assert not all(met for _, met in judged), judged


def test_a_client_block_within_its_ratios_is_met() -> None:
    judged = verdicts("client", BLOCK, 2.0, 40.0, floor=1.0)
    assert judged
    assert all(met for _, met in judged), judged


def test_reap_latency_is_judged_against_torchs() -> None:
    # 0.769 ms against torch's 2.73 ms: 3.5x, under "<= 2 ms" alone reported met.
    judged = verdicts("reap latency", "median, 1k other timers armed", 0.769, 2.73)
    assert not all(met for _, met in judged), judged


def test_p99_is_the_same_statistic_for_either_number_of_samples() -> None:
    # round(0.99 * (n - 1)) took ftimer's second worst of 60 and torch's worst of 20.
    assert bench_server._percentile([float(i) for i in range(20)], 0.99) == 19.0
    assert bench_server._percentile([float(i) for i in range(60)], 0.99) == 59.0
    assert bench_server._percentile([float(i) for i in range(200)], 0.99) == 197.0

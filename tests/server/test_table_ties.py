"""Equal deadlines expire in arming order, whichever ``settle()`` put them in the heap."""

from __future__ import annotations

import random

from ftimer_server import Timer
from ftimer_server.core._table import TimerTable


def test_ties_go_by_arming_order_within_and_across_settles() -> None:
    table = TimerTable()
    armed = []  # (deadline, pid) in arming order
    for batch in range(6):
        for i in range(5):
            pid = 100 + 5 * batch + i
            # Two deadlines, interleaved: ties within the batch and with earlier batches.
            deadline = 5.0 if i % 2 else 7.0
            table.arm(Timer(pid, "s", deadline, 9))
            armed.append((deadline, pid))
        table.arm(Timer(999, f"other-{batch}", 6.0 + batch / 10, 0))
        table.settle()
    expected = [pid for _, pid in sorted(armed, key=lambda a: a[0])]  # stable: arming order
    assert [e.pid for e in table.expire(10.0) if e.pid != 999] == expected


def test_ties_match_a_stable_sort_of_random_arms() -> None:
    rng = random.Random(7)
    table = TimerTable()
    armed = []
    for n in range(2000):
        pid = 1000 + n
        deadline = float(rng.randrange(20))
        table.arm(Timer(pid, "s", deadline, 9))
        armed.append((deadline, pid))
        if rng.random() < 0.1:
            table.settle()
    expected = [pid for _, pid in sorted(armed, key=lambda a: a[0])]  # stable: arming order
    assert [e.pid for e in table.expire(100.0)] == expected

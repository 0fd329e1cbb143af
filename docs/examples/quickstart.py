"""The worker of docs/quickstart.md: three steps on time, then one that hangs.

docs/quickstart.md shows the region between the ``--8<--`` markers (tests/test_docs.py
checks the copy), and tests/daemon/test_quickstart.py runs it against a real daemon.
"""

# --8<-- [start:worker]
import time

from ftimer_client import FileTimerClient, configure, expires

configure(FileTimerClient())  # the daemon's default FIFO
for step in range(5):
    with expires(after=2):  # reap me if this step takes more than 2 s
        time.sleep(0.5 if step < 3 else 60)  # the fourth step hangs
    print("step", step, "done", flush=True)
# --8<-- [end:worker]

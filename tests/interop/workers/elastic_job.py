"""A torchrun worker whose first attempt hangs on one rank inside a collective.

Run by torchrun (see tests/interop/test_torchrun_job.py):
``elastic_job.py --client {ftimer,torch} --out DIR [--hang-after S] [--step-after S]
[--hang-attempts N]``.

Every rank wraps its step in ``expires(...)`` with the timer client named by
``--client``, on the FIFO in ``TORCHELASTIC_TIMER_FILE``. In attempt 0, rank 1 enters an
all_reduce on a two-rank group that rank 0 never joins, under a short timer
(``--hang-after``), while every other rank waits for it in an all_reduce over the whole
world: a collective hang. Once the timer server reaps rank 1 the others fail in gloo and
the agents restart the group; attempt 1 runs the same step, which completes. With
``--hang-attempts N`` rank 1 hangs in each of the first N attempts instead of only the
first (a job that never recovers).

Each rank records what it did as JSON files in ``--out``: ``a{attempt}-r{rank}-start.json``
(pid, agent pid, the agent's restart count) before the step and
``a{attempt}-r{rank}-done.json`` (the all_reduce's result) after it, each with its
wall-clock ``time``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import sys
import time
from typing import Any, Dict, List

import torch
import torch.distributed as dist

HUNG_RANK = 1


def record(out: pathlib.Path, name: str, **fields: Any) -> None:
    """Write one JSON record atomically (the test polls for these files)."""
    tmp = out / f".{name}.tmp"
    tmp.write_text(json.dumps({**fields, "time": time.time()}))
    tmp.rename(out / f"{name}.json")


def timer_module(client: str) -> Any:
    """The timer API the job uses: ftimer's names, or torch's own."""
    if client == "ftimer":
        import ftimer_client

        return ftimer_client
    from torch.distributed.elastic import timer

    return timer


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--client", choices=["ftimer", "torch"], required=True)
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--hang-after", type=float, default=2.0)
    parser.add_argument("--step-after", type=float, default=60.0)
    parser.add_argument("--hang-attempts", type=int, default=1)
    args = parser.parse_args(argv)

    env: Dict[str, str] = dict(os.environ)
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    timer = timer_module(args.client)
    timer.configure(timer.FileTimerClient(env["TORCHELASTIC_TIMER_FILE"]))

    # The agent's store outlives a restart, and so do the peer addresses the previous
    # attempt's process group left in it: a group built on env:// after a restart reads
    # them and fails ("Gloo connectFullMesh failed ... Connection refused") or hangs in
    # its init. A prefix per attempt gives every attempt a clean namespace.
    # TORCHELASTIC_RESTART_COUNT cannot name the attempt: an agent that restarts its
    # workers because another node re-joined the rendezvous, before its own workers have
    # failed, does not count a restart, so the two agents' counts differ. The workers
    # count attempts in the store instead: each worker of an attempt adds one.
    timeout = datetime.timedelta(seconds=30)
    agent_store = dist.TCPStore(
        env["MASTER_ADDR"], int(env["MASTER_PORT"]), world, is_master=False, timeout=timeout
    )
    attempt = (agent_store.add("elastic_job/arrivals", 1) - 1) // world
    store = dist.PrefixStore(f"attempt-{attempt}/", agent_store)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    pair = dist.new_group([0, HUNG_RANK])

    tag = f"a{attempt}-r{rank}"
    record(
        args.out,
        f"{tag}-start",
        pid=os.getpid(),
        agent_pid=os.getppid(),
        restart_count=int(env["TORCHELASTIC_RESTART_COUNT"]),
    )
    value = torch.ones(1)
    if attempt < args.hang_attempts and rank == HUNG_RANK:
        with timer.expires(after=args.hang_after):
            dist.all_reduce(value, group=pair)  # rank 0 never joins: hangs here
    else:
        with timer.expires(after=args.step_after):
            dist.all_reduce(value)
    record(args.out, f"{tag}-done", pid=os.getpid(), sum=value.item())
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

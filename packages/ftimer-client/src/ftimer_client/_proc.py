"""Facts about processes read from the system: start times and torchrun's labels."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Dict, Optional, Union

from ftimer_protocol import MAX_LABEL_VALUE, parse_start_time, proc_status_field

__all__ = ["default_labels", "process_of_thread", "process_start_time"]

# Environment variables torchrun sets in every worker, and the label each one becomes.
_RANK_LABELS = (("RANK", "rank"), ("LOCAL_RANK", "local_rank"))
# The rendezvous run id: the server finds the peers of a stuck rank by this label.
_JOB = ("TORCHELASTIC_RUN_ID", "job")


def process_start_time(pid: Union[int, str] = "self") -> Optional[int]:
    """Return the start time of process ``pid`` in clock ticks since boot, or None.

    None when ``/proc`` is missing (macOS) or the process does not exist.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return parse_start_time(f.read())
    except OSError:
        return None


def process_of_thread(pid: int) -> Optional[int]:
    """The process whose thread ``pid`` is, if it is a thread's id other than its
    process's (``/proc/PID/status``); None for a process, or where ``/proc`` cannot
    tell."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            tgid = int(proc_status_field(f.read(), "Tgid") or pid)
    except (OSError, ValueError):
        return None
    return None if tgid == pid else tgid


def default_labels(environ: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """Labels a client sends by default: ``rank`` and ``local_rank`` from torchrun's
    ``RANK`` and ``LOCAL_RANK`` environment variables, where they are set to an integer
    (decimal digits, 16 at most), and ``job`` from its ``TORCHELASTIC_RUN_ID`` where it
    is not empty (cut to the protocol's bound on a label value).
    """
    env = os.environ if environ is None else environ
    labels = {}
    for var, label in _RANK_LABELS:
        value = env.get(var, "")
        # isascii: "²".isdigit() is true, and is no rank.
        if value.isascii() and value.isdecimal() and len(value) <= 16:
            labels[label] = value
    var, label = _JOB
    # os.environ holds bytes that are not UTF-8 as lone surrogates, which no JSON encoder
    # writes: they become "?", so an odd run id never fails a client.
    run_id = env.get(var, "").encode("utf-8", "replace").decode("utf-8")
    if run_id:
        labels[label] = run_id[:MAX_LABEL_VALUE]
    return labels

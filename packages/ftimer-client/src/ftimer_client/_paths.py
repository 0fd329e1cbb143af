"""Which FIFO a client writes to when it is not told: a pure function of its inputs."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Callable, Optional, Union

from ftimer_protocol import SYSTEM_FIFO_PATH, default_fifo_path

__all__ = ["ENV_VARS", "resolve_fifo_path"]

#: Environment variables naming the FIFO, in order of precedence.
ENV_VARS = ("FTIMER_FIFO", "TORCHELASTIC_TIMER_FILE")


def resolve_fifo_path(
    file_path: Union[str, os.PathLike[str], None] = None,
    *,
    environ: Optional[Mapping[str, str]] = None,
    uid: Optional[int] = None,
    exists: Callable[[str], bool] = os.path.exists,
) -> str:
    """Return the FIFO path a client should use.

    The first of: ``file_path``; ``$FTIMER_FIFO``; ``$TORCHELASTIC_TIMER_FILE``; the
    system daemon's ``/run/ftimer/timer.fifo`` for root, and for another user when that
    path exists (a worker next to a root daemon); else the per-user default of
    ``ftimer_protocol.default_fifo_path()``.

    Args:
        file_path: an explicit path; wins when given.
        environ: the environment to read; defaults to ``os.environ``.
        uid: the effective user id; defaults to this process's.
        exists: tells whether a path exists (injected for tests).
    """
    if file_path is not None:
        return os.fspath(file_path)
    env = os.environ if environ is None else environ
    for var in ENV_VARS:
        value = env.get(var)
        if value:
            return value
    uid = os.geteuid() if uid is None else uid
    if uid == 0 or exists(SYSTEM_FIFO_PATH):
        return SYSTEM_FIFO_PATH
    return default_fifo_path(uid, env)

"""Where a server puts its FIFO by default, so clients and servers agree without settings.

A pure function of the user id and the environment: no file system access.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Optional

__all__ = ["SYSTEM_FIFO_PATH", "default_fifo_path"]

#: The FIFO of a daemon running as root.
SYSTEM_FIFO_PATH = "/run/ftimer/timer.fifo"


def default_fifo_path(
    uid: Optional[int] = None, environ: Optional[Mapping[str, str]] = None
) -> str:
    """Return the documented default FIFO path of a server running as ``uid``.

    root: ``/run/ftimer/timer.fifo``; another user: ``$XDG_RUNTIME_DIR/ftimer/timer.fifo``
    when ``XDG_RUNTIME_DIR`` is set (an absolute path), else ``/tmp/ftimer-<uid>/timer.fifo``
    (the server creates that directory 0700 and refuses one owned by someone else).

    Args:
        uid: the server's effective user id; defaults to this process's.
        environ: the environment to read; defaults to ``os.environ``.
    """
    uid = os.geteuid() if uid is None else uid
    env = os.environ if environ is None else environ
    if uid == 0:
        return SYSTEM_FIFO_PATH
    runtime_dir = env.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(runtime_dir):
        return os.path.join(runtime_dir, "ftimer", "timer.fifo")
    return f"/tmp/ftimer-{uid}/timer.fifo"

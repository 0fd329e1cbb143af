"""``python -m ftimer_server``: the same command line as ``ftimer-server``."""

from __future__ import annotations

import sys

from .daemon._cli import main

if __name__ == "__main__":
    sys.exit(main())

"""ftimer's worker-side client (skeleton: filled in by the client issue)."""

from ._version import __version__

__all__ = ["__version__"]

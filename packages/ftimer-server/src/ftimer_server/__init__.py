"""ftimer's server (skeleton: filled in by the server issues)."""

from ._version import __version__

__all__ = ["__version__"]

"""Each package's public API is exactly what its __all__ says."""

from __future__ import annotations

import importlib
import importlib.resources
import types

import pytest

PACKAGES = ["ftimer_protocol", "ftimer_client", "ftimer_server"]


@pytest.mark.parametrize("name", PACKAGES)
def test_all_is_exactly_the_public_names(name: str) -> None:
    package = importlib.import_module(name)
    exported = set(package.__all__)
    assert len(exported) == len(package.__all__), "duplicates in __all__"
    missing = [n for n in exported if not hasattr(package, n)]
    assert not missing, f"{name}.__all__ names what does not exist: {missing}"
    public = {
        n
        for n, value in vars(package).items()
        if not n.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public - exported == set(), f"public but not in {name}.__all__"


@pytest.mark.parametrize("name", PACKAGES)
def test_version_and_typed_marker(name: str) -> None:
    package = importlib.import_module(name)
    assert package.__version__
    files = importlib.resources.files(name)
    assert (files / "py.typed").is_file()

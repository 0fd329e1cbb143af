"""The layers of ftimer_server: the core touches no operating system and reads no clock,
and imports only point down (daemon -> server -> core)."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

import ftimer_server

PACKAGE = pathlib.Path(ftimer_server.__file__).parent
#: Standard modules through which code reaches the operating system or the clock.
OS_MODULES = {
    "os",
    "select",
    "selectors",
    "signal",
    "socket",
    "subprocess",
    "resource",
    "fcntl",
    "termios",
    "threading",
    "time",
    "logging",
}
LAYERS = ["core", "incidents", "server", "daemon"]  # each may import those before it only


def imports(path: pathlib.Path) -> set[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved)."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                found.add(f"{base}.{node.module}" if node.module else base)
            else:
                found.add(node.module or "")
    return found


@pytest.mark.parametrize("path", sorted((PACKAGE / "core").glob("*.py")), ids=lambda p: p.name)
def test_the_core_touches_no_operating_system(path: pathlib.Path) -> None:
    used = {name.split(".")[0] for name in imports(path)}
    assert used & OS_MODULES == set()


@pytest.mark.parametrize("layer", LAYERS)
def test_imports_point_down(layer: str) -> None:
    above = {f"ftimer_server.{name}" for name in LAYERS[LAYERS.index(layer) + 1 :]}
    for path in (PACKAGE / layer).glob("*.py"):
        for name in imports(path):
            assert not any(name == a or name.startswith(a + ".") for a in above), (path, name)


def test_the_server_loads_no_crypto() -> None:
    # `secrets` for sync()'s tokens loaded hashlib's OpenSSL: 4 MB more resident memory
    # in every server (nox -s bench: 23 MB idle became 27 MB).
    crypto = "{'hashlib', '_hashlib', 'ssl'}"
    code = f"import sys, ftimer_server; print(sorted({crypto} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout == "[]\n"

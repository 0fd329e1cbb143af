"""Development sessions. `nox` with no arguments runs what CI runs."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import sys
import tempfile

import nox

ROOT = pathlib.Path(__file__).parent
PACKAGES = ["packages/ftimer-protocol", "packages/ftimer-client", "packages/ftimer-server"]
EDITABLE = [arg for pkg in PACKAGES for arg in ("-e", pkg)]
TEST_DEPS = ["pytest>=8", "hypothesis>=6.100", "pytest-timeout>=2.3"]
# CPU build, installed only in the sessions that compare with torch; numpy because torch
# warns at import without it.
TORCH = ["torch==2.13.0", "numpy"]

nox.options.sessions = ["lint", "typecheck", "tests", "interop"]
nox.options.error_on_missing_interpreters = True


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check over the whole tree."""
    session.install("ruff==0.17.6")  # pinned: formatting changes between releases
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the three packages (configured in pyproject.toml)."""
    session.install("mypy==2.4.1", "prometheus_client>=0.17", *EDITABLE)
    session.run("mypy")


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite except the torch interop tests. Extra args go to pytest."""
    session.install(*TEST_DEPS, *EDITABLE, "-e", "packages/ftimer-server[metrics]")
    session.run("pytest", "-m", "not interop", *session.posargs)


@nox.session
def interop(session: nox.Session) -> None:
    """Tests against the real torch 2.13 (fails, never skips, if torch cannot be installed)."""
    session.install(*TEST_DEPS, *EDITABLE, "-e", "packages/ftimer-server[metrics]", *TORCH)
    session.run("pytest", "-m", "interop", *session.posargs, env={"FTIMER_REQUIRE_TORCH": "1"})


@nox.session
def build(session: nox.Session) -> None:
    """Build every wheel and sdist; check the client wheel pulls in nothing but its protocol."""
    session.install("build>=1.0")
    dist = ROOT / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    for pkg in PACKAGES:
        session.run("python", "-m", "build", "--outdir", str(dist), pkg)
    with tempfile.TemporaryDirectory() as tmp:
        venv = pathlib.Path(tmp) / "venv"
        session.run(sys.executable, "-m", "venv", str(venv), external=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip"]
        # The two wheels by path, so nothing of ours can come from an index.
        wheels = [
            str(next(dist.glob(f"{name}-*.whl"))) for name in ("ftimer_client", "ftimer_protocol")
        ]
        session.run(*pip, "install", "-q", *wheels, external=True)
        out = session.run(*pip, "list", "--format=json", external=True, silent=True)
        installed = {p["name"].lower() for p in json.loads(str(out))}
        installed -= {"pip", "setuptools", "wheel"}
        expected = {"ftimer-client", "ftimer-protocol", "msgspec"}
        if installed != expected:
            session.error(f"client wheel pulled in {sorted(installed)}, not {sorted(expected)}")
        session.log(f"client wheel installs exactly {sorted(installed)}")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks side by side with torch 2.13. `nox -s bench -- --quick` for a short run."""
    session.install(*EDITABLE, *TORCH, "matplotlib")
    session.run("python", "tests/benchmarks/run.py", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: a server reaps a stuck worker and leaves a punctual one alone."""
    session.install(*EDITABLE)
    session.run("python", "docs/examples/demo.py", *session.posargs, env={"PYTHONUNBUFFERED": "1"})


@nox.session
def dev(session: nox.Session) -> None:
    """Print the path of a ready development environment (all packages, test tools, ruff, mypy)."""
    session.install(*TEST_DEPS, *EDITABLE, "-e", "packages/ftimer-server[metrics]", "ruff", "mypy")
    session.log(f"environment ready: {os.path.dirname(session.bin)}")

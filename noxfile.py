"""Development sessions. `nox` with no arguments runs what CI runs."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from typing import Dict, List, Optional

import nox

ROOT = pathlib.Path(__file__).parent
PACKAGES = ["packages/ftimer-protocol", "packages/ftimer-client", "packages/ftimer-server"]


def editable(server_extras: str = "") -> List[str]:
    """pip's arguments installing the three packages editable, the server with
    ``server_extras`` (``"metrics,pyspy"``)."""
    protocol, client, server = PACKAGES
    extras = f"[{server_extras}]" if server_extras else ""
    return ["-e", protocol, "-e", client, "-e", server + extras]


EDITABLE = editable()
TEST_DEPS = ["pytest>=8", "hypothesis>=6.100", "pytest-timeout>=2.3"]
LINT = ["ruff"]
TYPECHECK = ["mypy", "prometheus_client>=0.17"]
# CPU build, installed only in the sessions that compare with torch; numpy because torch
# warns at import without it.
TORCH = ["torch==2.13.0", "numpy"]
# The documentation site (mkdocs.yml): the API reference is rendered from the docstrings.
DOCS = ["mkdocs>=1.6", "mkdocs-material>=9.5", "mkdocstrings[python]>=0.26"]
BUILD = ["build>=1.0", "twine>=5"]
# Exact versions of everything the sessions install, so that a new release of a tool or
# of msgspec cannot turn CI red overnight. The packages' own dependency ranges stay open
# for users; `nox -s lock` refreshes this file on purpose.
CONSTRAINTS = ROOT / ".ci" / "constraints.txt"

nox.options.sessions = ["lint", "typecheck", "tests", "interop", "chaos", "docs"]
nox.options.error_on_missing_interpreters = True


def install(session: nox.Session, *args: str) -> None:
    """``pip install`` under the committed constraints, on the Python they were locked
    on; on another, whose wheels their exact versions may lack (msgspec 0.23 has none for
    3.9), the newest releases that Python takes, with a warning."""
    if sys.version_info < (3, 9):  # noqa: UP036 - nox may run on an older Python than ours
        session.error(
            f"ftimer needs Python 3.9 or newer; this nox runs on {sys.version.split()[0]}: "
            "make the venv with a newer python3"
        )
    locked = re.search(r"on Python (\d+\.\d+)", CONSTRAINTS.read_text())
    running = f"{sys.version_info[0]}.{sys.version_info[1]}"  # the sessions use nox's Python
    if locked and locked.group(1) == running:
        session.install("-c", str(CONSTRAINTS), *args)
        return
    session.warn(
        f"{CONSTRAINTS.relative_to(ROOT)} was locked on Python "
        f"{locked.group(1) if locked else '?'}, not {running}: installing the newest "
        "releases that Python takes instead (fine for trying ftimer; CI runs the locked ones)"
    )
    session.install(*args)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check over the whole tree."""
    install(session, *LINT)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the three packages (configured in pyproject.toml)."""
    install(session, *TYPECHECK, *EDITABLE)
    session.run("mypy")


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite except the torch interop tests. Extra args go to pytest."""
    install(session, *TEST_DEPS, *editable("metrics,pyspy"))
    env: Dict[str, str] = {}
    promtool = _promtool(session)
    if promtool is not None:
        env["PATH"] = f"{promtool}{os.pathsep}{os.environ.get('PATH', '')}"
    session.run("pytest", "-m", "not interop", *session.posargs, env=env)


def _promtool(session: nox.Session) -> Optional[pathlib.Path]:
    """Where promtool is, fetched once from the distribution's archive when apt-get can
    (Prometheus is not on PyPI); None leaves the alert rules' tests to skip, saying why.
    Only the package's files are unpacked: nothing is installed, no service started."""
    if shutil.which("promtool"):
        return None
    bin_dir = pathlib.Path(session.cache_dir).resolve() / "promtool" / "usr" / "bin"
    if (bin_dir / "promtool").exists():
        return bin_dir
    if not shutil.which("apt-get") or not shutil.which("dpkg"):
        session.log("promtool: no apt-get here; the alert rules' tests will skip")
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run(
                ["apt-get", "download", "-q", "prometheus"], cwd=tmp, check=True, timeout=300
            )
            (deb,) = pathlib.Path(tmp).glob("prometheus_*.deb")
            subprocess.run(["dpkg", "-x", str(deb), str(bin_dir.parent.parent)], check=True)
        except (OSError, ValueError, subprocess.SubprocessError) as e:
            session.log(f"promtool: could not fetch it ({e}); the alert rules' tests will skip")
            return None
    return bin_dir


def need_torch(session: nox.Session) -> None:
    """Stop, saying why, on a Python torch 2.13 has no release for (pip would only say
    that no version matches)."""
    if sys.version_info < (3, 10):
        session.error(
            f"torch 2.13 needs Python 3.10 or newer; this nox runs on {sys.version.split()[0]} "
            "(ftimer's packages run on 3.9: the other sessions do)"
        )


@nox.session
def interop(session: nox.Session) -> None:
    """Tests against the real torch 2.13 (fails, never skips, if torch cannot be installed)."""
    need_torch(session)
    install(session, *TEST_DEPS, *editable("metrics,pyspy"), *TORCH)
    session.run("pytest", "-m", "interop", *session.posargs, env={"FTIMER_REQUIRE_TORCH": "1"})


@nox.session
def chaos(session: nox.Session) -> None:
    """Fault injection against the real daemon in a private PID namespace (kill -9 and
    restart, SIGSTOP, a full pipe, junk floods, writers dying mid-line, hostile pids,
    damaged state): one table, under 5 minutes (docs/reliability.md). `-- --quick` for
    one round. Skipped, with the reason, where unshare cannot make the namespace."""
    install(session, *EDITABLE)
    reason = str(session.run("python", "tests/chaos/run.py", "--probe", silent=True)).strip()
    if reason:
        session.skip(f"the chaos run needs a private PID namespace: {reason}")
    session.run("python", "tests/chaos/run.py", *session.posargs, env={"PYTHONUNBUFFERED": "1"})


@nox.session
def docs(session: nox.Session) -> None:
    """The documentation site (mkdocs.yml) built with --strict into site/: a broken link,
    a page missing from the navigation or a docstring that does not render fails. Then
    tests/test_docs_site.py checks the built site: every public name of the three
    packages in its API reference, nothing private. `mkdocs serve` previews it."""
    # ruff formats the signatures of the API reference.
    install(session, *DOCS, *LINT, *TEST_DEPS, *EDITABLE)
    site = ROOT / "site"
    # mkdocs-material 9.7+ prints a notice at every build that it reaches end of life in
    # 2027 (its successor is Zensical): known, and not worth a screen of every CI log.
    env = {"NO_MKDOCS_2_WARNING": "1"}
    session.run("mkdocs", "build", "--strict", "--clean", "--site-dir", str(site), env=env)
    session.run("pytest", "tests/test_docs_site.py", env={"FTIMER_SITE_DIR": str(site)})


@nox.session
def build(session: nox.Session) -> None:
    """Build every wheel and sdist and check their metadata with twine (the README renders
    as the long description) and that each wheel carries the license's text; check the
    client wheel pulls in nothing but its protocol."""
    install(session, *BUILD)
    dist = ROOT / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    for pkg in PACKAGES:
        session.run("python", "-m", "build", "--outdir", str(dist), pkg)
    session.run("twine", "check", "--strict", *sorted(str(p) for p in dist.iterdir()))
    for wheel in dist.glob("*.whl"):
        with zipfile.ZipFile(wheel) as zf:
            if not any(name.endswith(".dist-info/licenses/LICENSE") for name in zf.namelist()):
                session.error(f"{wheel.name} does not carry the license's text")
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
    need_torch(session)
    install(session, *editable("pyspy"), *TORCH, "matplotlib")
    session.run("python", "tests/benchmarks/run.py", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: a server reaps a stuck worker and leaves a punctual one alone."""
    install(session, *editable("pyspy"))
    session.run("python", "docs/examples/demo.py", *session.posargs, env={"PYTHONUNBUFFERED": "1"})


@nox.session
def dev(session: nox.Session) -> None:
    """Print the path of a ready development environment (all packages, test tools, ruff, mypy)."""
    install(session, *TEST_DEPS, *editable("metrics,pyspy"), *LINT, *TYPECHECK)
    session.log(f"environment ready: {os.path.dirname(session.bin)}")


@nox.session
def lock(session: nox.Session) -> None:
    """Refresh .ci/constraints.txt with the newest releases of everything the sessions
    install. Run it on purpose, then run `nox` and commit the file if all passes."""
    session.install(
        *LINT,
        *TYPECHECK,
        *TEST_DEPS,
        *editable("metrics,pyspy"),
        *TORCH,
        *BUILD,
        *DOCS,
        "matplotlib",
    )
    out = session.run("python", "-m", "pip", "freeze", "--exclude-editable", silent=True)
    pins = sorted(line for line in str(out).splitlines() if "==" in line)
    python = session.run(
        "python", "-c", "import platform; print(platform.python_version())", silent=True
    )
    header = [
        "# Exact versions of every tool and dependency the nox sessions install (CI included).",
        f"# Generated by `nox -s lock` on Python {str(python).strip()}; refresh on purpose,",
        "# then run `nox` before committing it. Not edited by hand.",
    ]
    CONSTRAINTS.write_text("\n".join([*header, *pins]) + "\n")
    session.log(f"wrote {len(pins)} pins to {CONSTRAINTS.relative_to(ROOT)}")

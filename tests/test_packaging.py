"""What the three distributions declare: the protocol version the client and the server
need, the license's text, the build backend and the msgspec each Python needs.

Building and installing the wheels is `nox -s build`'s (it checks their metadata and what
the client pulls in); these read the files the build reads.
"""

from __future__ import annotations

import pathlib
import re
import sys
from typing import Any, Dict, List

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the server's own dependency there
    import tomli as tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent
DISTRIBUTIONS = ["ftimer-protocol", "ftimer-client", "ftimer-server"]


def pyproject(dist: str) -> Dict[str, Any]:
    with open(ROOT / "packages" / dist / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def protocol_version() -> List[int]:
    text = (ROOT / "packages/ftimer-protocol/src/ftimer_protocol/_version.py").read_text()
    m = re.search(r'__version__ = "(\d+)\.(\d+)\.(\d+)(?:\.dev\d+)?"', text)
    assert m, text
    return [int(part) for part in m.groups()]


@pytest.mark.parametrize("dist", ["ftimer-client", "ftimer-server"])
def test_the_protocol_floor_is_the_version_with_what_they_import(dist: str) -> None:
    # They said >=1 while importing names added in later minors: pip kept an installed
    # 1.0 or 1.1, and `import ftimer_client` failed.
    major, minor, _ = protocol_version()
    (spec,) = [d for d in pyproject(dist)["project"]["dependencies"] if "ftimer-protocol" in d]
    assert spec == f"ftimer-protocol>={major}.{minor},<{major + 1}"


def test_names_the_protocol_adds_come_with_a_new_minor_version() -> None:
    # The client and the server import what the protocol adds at once: added under
    # [Unreleased], it is in no version their floor can name.
    text = (ROOT / "CHANGELOG.md").read_text()
    section = text.split("## ftimer-protocol", 1)[1].split("### [Unreleased]", 1)[1]
    unreleased = section.split("\n### [", 1)[0]
    assert "#### Added" not in unreleased, (
        "ftimer-protocol has Added entries under [Unreleased]: give it its next minor "
        "version, and the client's and server's floor with it"
    )


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_each_distribution_ships_the_license_text(dist: str) -> None:
    # hatchling takes LICENSE from the distribution's own folder; without it only the
    # license's name reached the metadata.
    license_file = ROOT / "packages" / dist / "LICENSE"
    assert license_file.is_file()
    assert license_file.read_text() == (ROOT / "LICENSE").read_text()
    assert pyproject(dist)["project"]["license"] == "MIT"


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_the_build_backend_writes_license_expressions(dist: str) -> None:
    # Before hatchling 1.27 the metadata was version 2.1, with a License-Expression the
    # package index refuses there (it came with metadata 2.4).
    (requirement,) = pyproject(dist)["build-system"]["requires"]
    m = re.fullmatch(r"hatchling>=(\d+)\.(\d+)", requirement)
    assert m, requirement
    assert (int(m[1]), int(m[2])) >= (1, 27)


@pytest.mark.parametrize("dist", ["ftimer-protocol", "ftimer-server"])
def test_msgspec_is_one_that_builds_on_each_python(dist: str) -> None:
    # msgspec 0.18 does not compile on Python 3.13, which the classifiers name.
    deps = pyproject(dist)["project"]["dependencies"]
    msgspec = sorted(d for d in deps if d.startswith("msgspec"))
    assert msgspec == ["msgspec>=0.18", "msgspec>=0.19; python_version >= '3.13'"]
    classifiers = pyproject(dist)["project"]["classifiers"]
    assert "Programming Language :: Python :: 3.13" in classifiers

"""Code the docs show is the code the tests run.

A block of a page under docs/ that follows a comment
``<!-- include: PATH#REGION -->`` must be, byte for byte, the lines of PATH (relative to
the repository) between ``# --8<-- [start:REGION]`` and ``# --8<-- [end:REGION]``.
"""

from __future__ import annotations

import pathlib
import re
from typing import List, Tuple

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
INCLUDE = re.compile(
    r"<!-- include: (?P<path>\S+)#(?P<region>[\w-]+) -->\n+```\w*\n(?P<body>.*?)```", re.S
)


def includes() -> List[Tuple[str, str, str, str]]:
    """(page, path, region, the page's copy) of every include in docs/."""
    found = []
    for page in sorted((ROOT / "docs").glob("*.md")):
        for m in INCLUDE.finditer(page.read_text()):
            found.append((page.name, m["path"], m["region"], m["body"]))
    return found


def region(path: pathlib.Path, name: str) -> str:
    text = path.read_text()
    start, end = f"# --8<-- [start:{name}]\n", f"# --8<-- [end:{name}]\n"
    assert text.count(start) == 1, f"{path}: no single {start!r}"
    assert text.count(end) == 1, f"{path}: no single {end!r}"
    return text.split(start, 1)[1].split(end, 1)[0]


def test_the_torchelastic_agent_example_is_included() -> None:
    # The page's agent once lacked a line the tested agent had, and crashed (issue 16).
    assert ("torchelastic.md", "tests/interop/workers/ftimer_agent.py", "agent") in [
        (page, path, name) for page, path, name, _ in includes()
    ]


@pytest.mark.parametrize(("page", "path", "name", "copy"), includes())
def test_included_code_is_the_tested_file(page: str, path: str, name: str, copy: str) -> None:
    assert copy == region(ROOT / path, name), (
        f"docs/{page} shows an outdated copy of {path}#{name}: paste the region again"
    )

"""The documentation site (mkdocs.yml) and the changelog.

The site tests read a built site: the one `nox -s docs` built (``FTIMER_SITE_DIR``), or
one they build themselves where mkdocs is installed; elsewhere (``nox -s tests``) they are
skipped, since the docs session runs them. The changelog tests need nothing.

What they hold: every name of each package's ``__all__`` is an object of that package's
API reference page (with its anchor, and in the search index), nothing private is, the
navigation is in the order a newcomer reads, the README is the home page with its links
working, and the changelog has each distribution's current version; documented attributes
and docstring sections render, and signatures show numbers as written and no expression
that sets an attribute in ``__init__``.
"""

from __future__ import annotations

import html.parser
import importlib
import json
import os
import pathlib
import re
import subprocess
import sys
import zlib
from typing import Dict, List, Optional, Set, Tuple

import pytest
from packaging.version import Version

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = {
    "ftimer-protocol": "ftimer_protocol",
    "ftimer-client": "ftimer_client",
    "ftimer-server": "ftimer_server",
}
#: The navigation, in the order a newcomer reads.
NEWCOMER_ORDER = [
    "What it is",
    "Quick start",
    "The client",
    "The server",
    "Deploying the daemon",
    "TorchElastic",
    "Incidents",
    "The protocol",
    "Benchmarks",
    "Reliability",
    "API reference",
    "Changelog",
]


# --- the changelog -------------------------------------------------------------------


def current_version(dist: str) -> str:
    package = PACKAGES[dist]
    text = (ROOT / "packages" / dist / "src" / package / "_version.py").read_text()
    m = re.search(r'^__version__ = "([^"]+)"$', text, re.M)
    assert m, f"no __version__ in {dist}"
    return m[1]


def changelog_sections() -> Dict[str, List[str]]:
    """distribution -> its version headings (``### [...]``), in order."""
    sections: Dict[str, List[str]] = {}
    current = None
    for line in (ROOT / "CHANGELOG.md").read_text().splitlines():
        if m := re.fullmatch(r"## (\S+)", line):
            current = m[1]
            sections[current] = []
        elif (m := re.match(r"### \[([^\]]+)\]", line)) and current is not None:
            sections[current].append(m[1])
    return sections


def test_the_changelog_has_each_distributions_current_version_first() -> None:
    # Between versions the repository carries the next one with ".dev0", so that a build
    # of it never says it is the last one: what it adds is under [Unreleased], above the
    # last version's section.
    sections = changelog_sections()
    assert list(sections) == list(PACKAGES)
    for dist, versions in sections.items():
        current = Version(current_version(dist))
        assert versions[0] == "Unreleased", f"CHANGELOG.md: {dist} starts with {versions[0]}"
        if current.is_devrelease:
            assert Version(versions[1]) < Version(current.base_version), (
                f"CHANGELOG.md: {dist} {current} is not of a version after [{versions[1]}]"
            )
        else:
            assert versions[1] == str(current), (
                f"CHANGELOG.md: {dist} is at {current}; [{current}] must follow [Unreleased]"
            )


def test_changelog_entries_are_keep_a_changelog_kinds() -> None:
    kinds = {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"}
    text = (ROOT / "CHANGELOG.md").read_text()
    used = re.findall(r"^#### (.+)$", text, re.M)
    assert used
    assert set(used) <= kinds, set(used) - kinds


# --- the built site ------------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    built = os.environ.get("FTIMER_SITE_DIR")
    if built:
        return pathlib.Path(built)
    pytest.importorskip("mkdocs", reason="mkdocs is not installed: `nox -s docs` runs these")
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    return out


def inventory(site: pathlib.Path) -> List[Tuple[str, str, int, str]]:
    """(name, role, priority, page) of every object in objects.inv (Sphinx's format)."""
    data = (site / "objects.inv").read_bytes()
    header = data.split(b"\n", 4)
    assert header[0] == b"# Sphinx inventory version 2"
    entries = []
    for line in zlib.decompress(header[4]).decode().splitlines():
        m = re.fullmatch(r"(\S+)\s+(\S+)\s+(-?\d+)\s+(\S+)\s+.*", line)
        assert m, line
        entries.append((m[1], m[2], int(m[3]), m[4].split("#")[0]))
    return entries


def rendered(site: pathlib.Path) -> List[Tuple[str, str, str]]:
    """(name, role, page) of every Python object rendered with a heading of its own."""
    return [
        (n, r, page) for n, r, prio, page in inventory(site) if r.startswith("py:") and prio == 1
    ]


class Anchors(html.parser.HTMLParser):
    """The ids and the visible text of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: Set[str] = set()
        self.text: List[str] = []

    def handle_starttag(self, tag: str, attrs: List[Tuple[str, Optional[str]]]) -> None:
        self.ids |= {v for k, v in attrs if k == "id" and v}

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def page(site: pathlib.Path, path: str) -> Anchors:
    parser = Anchors()
    parser.feed((site / path / "index.html").read_text())
    return parser


@pytest.mark.parametrize("dist", list(PACKAGES))
def test_every_public_name_is_in_its_api_page(site: pathlib.Path, dist: str) -> None:
    package = PACKAGES[dist]
    names = importlib.import_module(package).__all__
    objects = {name: path for name, _, path in rendered(site)}
    anchors = page(site, f"api/{dist}").ids
    search = {
        doc["location"]
        for doc in json.loads((site / "search" / "search_index.json").read_text())["docs"]
    }
    for name in names:
        full = f"{package}.{name}"
        assert objects.get(full) == f"api/{dist}/", f"{full} is not on api/{dist}/"
        assert full in anchors, f"api/{dist}/ has no anchor {full}"
        assert f"api/{dist}/#{full}" in search, f"{full} is not in the search index"


def test_nothing_private_is_rendered(site: pathlib.Path) -> None:
    exported = {
        package: set(importlib.import_module(package).__all__) for package in PACKAGES.values()
    }
    objects = rendered(site)
    assert objects
    for name, role, _ in objects:
        package, top, *rest = name.split(".")
        assert top in exported[package], f"{name} ({role}) is rendered but not in __all__"
        for part in rest:
            private = part.startswith("_") and not (part.startswith("__") and part.endswith("__"))
            assert not private, f"{name} is rendered"
            assert part not in ("__init__", "__slots__", "__hash__", "__eq__"), name
    for dist in PACKAGES:
        text = "".join(page(site, f"api/{dist}").text)
        leaked = re.findall(r"\bftimer_\w+(?:\.\w+)*\._[a-z]\w*", text)
        assert not leaked, f"api/{dist}/ shows private paths: {sorted(set(leaked))}"
        # A private name alone: a base class (``Bases: _V2``), a helper a docstring names
        # (``_refused``, ``incidents/_stack_formats``).
        named = re.findall(r"(?<![\w.])_[A-Za-z]\w*", text)
        assert not named, f"api/{dist}/ names private objects: {sorted(set(named))}"
        # Nor in a tooltip: a type's full path (``ftimer_protocol._codec.Buffer``).
        html_text = (site / "api" / dist / "index.html").read_text()
        titles = re.findall(r'title="([^"]*)"', html_text)
        hidden = [t for t in titles if re.search(r"(?:^|[./])_[A-Za-z]", t)]
        assert not hidden, f"api/{dist}/ has tooltips naming private paths: {sorted(set(hidden))}"


def test_the_servers_attributes_are_in_the_reference(site: pathlib.Path) -> None:
    # An agent reads file_path (docs/torchelastic.md); an attribute with no docstring is
    # not rendered at all.
    objects = {name for name, _, _ in rendered(site)}
    for attr in ("file_path", "run_id", "max_interval", "stop_timeout"):
        assert f"ftimer_server.FileTimerServer.{attr}" in objects, attr


def test_docstring_sections_are_recognised(site: pathlib.Path) -> None:
    # "Raises (on entering):" is no section griffe knows: it rendered as plain text.
    for dist in PACKAGES:
        text = "".join(page(site, f"api/{dist}").text)
        unknown = re.findall(r"\b(?:Args|Raises|Returns|Yields|Attributes) \([^)]*\):", text)
        assert not unknown, f"api/{dist}/ shows section headings as text: {unknown}"


def test_signatures_show_numbers_as_written_and_no_init_expressions(site: pathlib.Path) -> None:
    text = " ".join("".join(page(site, "api/ftimer-server").text).split())
    assert "fifo_mode: int = 0o600" in text
    assert "fifo_mode: int = 384" not in text
    # An attribute set in __init__: its type, not what sets it (a private constant).
    assert "run_id: str torch's job id" in text
    assert "STOP_TIMEOUT" not in text


def test_the_navigation_is_in_the_order_a_newcomer_reads() -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML comes with mkdocs: `nox -s docs`")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    titles = [next(iter(entry)) for entry in config["nav"]]
    assert titles == NEWCOMER_ORDER


def test_the_readme_is_the_home_page_and_its_links_work(site: pathlib.Path) -> None:
    home = page(site, ".")
    text = " ".join("".join(home.text).split())
    assert "A per-host watchdog timer for worker processes" in text
    html_text = (site / "index.html").read_text()
    readme = (ROOT / "README.md").read_text()
    for target in sorted(set(re.findall(r"\]\(docs/([\w-]+)\.md", readme))):
        assert f'href="{target}/' in html_text, f"the home page does not link {target}"
        assert (site / target / "index.html").is_file()
    for dist in PACKAGES:
        assert f'href="api/{dist}/"' in html_text, f"the home page does not link api/{dist}"


def test_links_to_repository_files_become_their_paths(site: pathlib.Path) -> None:
    # docs/reliability.md links ../tests/chaos/workers.py, which is no page of the site.
    assert (
        "<code>tests/chaos/workers.py</code>" in (site / "reliability" / "index.html").read_text()
    )


def test_the_changelog_is_a_page(site: pathlib.Path) -> None:
    text = "".join(page(site, "changelog").text)
    for dist in PACKAGES:
        assert f"{dist}" in text
        assert current_version(dist) in text

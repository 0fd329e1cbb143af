"""mkdocs hooks (mkdocs.yml): the README is the site's home page and CHANGELOG.md its
changelog, both as they are in the repository; the API reference is each package's
``__all__``; links that leave docs/ keep working.

An API page names its package in a comment, ``<!-- api: ftimer_protocol -->``; the hook
puts there one mkdocstrings block per name of the package's ``__all__``, in its order,
under the topic comments that group it (``# messages``), so the reference is exactly the
public API: a name added to ``__all__`` appears, a name removed goes, nothing else shows.

The pages under docs/ are also read on a forge, where a link to ``../tests/x.py`` opens
the file. On the site there is no such page: such a link becomes the file's repository
path in code (or a link into the repository, once ``repo_url`` is set), so a reader still
knows where to look. A link to a file that does not exist is left alone, for mkdocs to
report (a failure under --strict). Links inside code blocks are never touched.

A name in a signature or a type that has no page of its own (a private type alias such
as ``Buffer``, a parameter's private class) is shown as text with a tooltip of its full
path, which names a private module: the tooltip goes, the name stays.
"""

from __future__ import annotations

import ast
import io
import posixpath
import re
import tokenize
from pathlib import Path
from typing import Any, List, Optional, Tuple

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
DOCS = "docs"
#: Repository files shown as pages: (file, page).
GENERATED = {"README.md": "index.md", "CHANGELOG.md": "changelog.md"}
#: A distribution's folder (or its README) is its API reference page.
PACKAGES = {
    f"packages/{name}": f"api/{name}.md"
    for name in ("ftimer-protocol", "ftimer-client", "ftimer-server")
}
FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"(?<!!)\[(?P<text>[^\]\n]*)\]\((?P<target>[^)\s]+)\)")
API = re.compile(r"^<!-- api: (?P<package>\w+) -->$", re.M)
#: The tooltip autorefs gives a name it found no page for, when that name's path is private.
PRIVATE_TOOLTIP = re.compile(r'<span title="[\w.]*\._[A-Za-z][\w.]*">')


def on_files(files: Files, config: Any) -> Files:
    """Add the README and the changelog as pages."""
    for source, page in GENERATED.items():
        text = (ROOT / source).read_text(encoding="utf-8")
        content = rewrite_links(text, source, config)
        files.append(File.generated(config, page, content=content))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """Links of a docs/ page that leave docs/."""
    if page.file.generated_by is not None:  # already rewritten in on_files
        return markdown
    markdown = API.sub(lambda m: api_reference(m["package"]), markdown)
    return rewrite_links(markdown, f"{DOCS}/{page.file.src_uri}", config)


def on_post_page(output: str, page: Any, config: Any) -> str:
    """No tooltip naming a private path on an API page."""
    if not page.file.src_uri.startswith("api/"):
        return output
    return PRIVATE_TOOLTIP.sub("<span>", output)


def api_reference(package: str) -> str:
    """The mkdocstrings blocks of every name in ``package.__all__``, by topic."""
    out = []
    groups = public_names(package)
    for topic, names in groups:
        if topic:
            out.append(f"## {topic[0].upper()}{topic[1:]}\n")
        level = 3 if topic else 2
        for name in names:
            out.append(f"::: {package}.{name}\n    options:\n      heading_level: {level}\n")
    return "\n".join(out)


def public_names(package: str) -> List[Tuple[str, List[str]]]:
    """``package.__all__`` read from its source (nothing is imported), as (topic, names)
    pairs: a comment line inside the list starts a topic."""
    init = next(ROOT.glob(f"packages/*/src/{package}/__init__.py"))
    source = init.read_text(encoding="utf-8")
    node = next(
        n
        for n in ast.parse(source).body
        if isinstance(n, ast.Assign) and [getattr(t, "id", None) for t in n.targets] == ["__all__"]
    )
    assert isinstance(node.value, ast.List)
    assert node.end_lineno is not None
    lines = range(node.lineno, node.end_lineno + 1)
    groups: List[Tuple[str, List[str]]] = [("", [])]
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.start[0] not in lines:
            continue
        if tok.type == tokenize.COMMENT:
            groups.append((tok.string.lstrip("# ").strip(), []))
        elif tok.type == tokenize.STRING:
            groups[-1][1].append(ast.literal_eval(tok.string))
    return [(topic, names) for topic, names in groups if names]


def rewrite_links(markdown: str, source: str, config: Any) -> str:
    """``markdown`` of the repository file ``source``, with its links rewritten for the
    page it becomes (``GENERATED``, or itself under docs/)."""
    page = GENERATED.get(source, source[len(DOCS) + 1 :])
    out = []
    fenced = False
    for line in markdown.splitlines(keepends=True):
        if FENCE.match(line.lstrip()):
            fenced = not fenced
        if fenced:
            out.append(line)
        else:
            out.append(LINK.sub(lambda m: _link(m, source, page, config), line))
    return "".join(out)


def _link(m: re.Match[str], source: str, page: str, config: Any) -> str:
    target = m["target"]
    if "://" in target or target.startswith(("#", "mailto:")):
        return m[0]
    path, _, anchor = target.partition("#")
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(source), path))
    new = _site_target(resolved, page)
    if new is None:
        return _outside(m["text"], resolved, config) or m[0]
    return f"[{m['text']}]({new}{'#' + anchor if anchor else ''})"


def _site_target(resolved: str, page: str) -> Optional[str]:
    """Where a link to the repository path ``resolved`` goes on the site, relative to
    ``page``; None for a path outside docs/ that is no page."""
    if resolved in PACKAGES or resolved.removesuffix("/README.md") in PACKAGES:
        in_docs = PACKAGES[resolved.removesuffix("/README.md")]
    elif resolved in GENERATED:
        in_docs = GENERATED[resolved]
    elif resolved.startswith(f"{DOCS}/"):
        in_docs = resolved[len(DOCS) + 1 :]
    else:
        return None
    return posixpath.relpath(in_docs, posixpath.dirname(page) or ".")


def _outside(text: str, resolved: str, config: Any) -> Optional[str]:
    """A link to a repository file outside docs/: its path, or a link into the repository."""
    if resolved.startswith("..") or not (ROOT / resolved).exists():
        return None  # left for mkdocs to report
    repo = config.get("repo_url")
    if repo:
        return f"[{text}]({repo.rstrip('/')}/blob/main/{resolved})"
    if text.strip("`") == resolved:
        return f"`{resolved}`"
    return f"{text} (`{resolved}`)"

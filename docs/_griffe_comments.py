"""griffe extensions (mkdocs.yml): ``#:`` comments document the attribute below them,
every enum member is listed, and signatures show what a reader of the API needs.

The packages document constants and enum members the way Sphinx reads them, with ``#:``
comment lines just above the assignment (``RejectReason.RESERVED_PID``, ``PIPE_BUF``).
griffe reads only docstrings, so without this the API reference would show such a name
with no text, or (for an enum member) not at all. An enum member with no comment is
documented by its value, so that every member of an enum is listed.

``Signatures``: griffe renders a number from its value, so a mode the code and the docs
write ``0o600`` would show as ``384``; it shows the source text instead. And an attribute
set in ``__init__`` would show the expression that sets it (``run_id = run_id``, a
private constant's name): it shows the attribute's name and type only.

``PublicBases``: a class whose base is private (the messages' ``_V2``) shows that base's
own bases instead, so that no private name is shown as a base.
"""

from __future__ import annotations

import ast
from typing import Any, List, Union

import griffe


class HashColonComments(griffe.Extension):
    """Give an attribute that has no docstring the ``#:`` lines just above it."""

    def on_attribute_instance(
        self, *, node: Any, attr: griffe.Attribute, agent: Any, **kwargs: Any
    ) -> None:
        code = getattr(agent, "code", None)  # the source of a visited (not inspected) module
        lineno = getattr(node, "lineno", None)
        if attr.docstring is not None or not isinstance(node, ast.AST) or not code or not lineno:
            return
        lines = code.splitlines()
        comment = []
        i = lineno - 2  # the line above, 0-based
        while i >= 0 and lines[i].lstrip().startswith("#:"):
            comment.append(lines[i].lstrip()[2:].strip())
            i -= 1
        if comment:
            text = "\n".join(reversed(comment))
        elif _in_enum(attr) and attr.value is not None:
            text = f"``{attr.value}``"
        else:
            return
        attr.docstring = griffe.Docstring(text, lineno=i + 2, endlineno=lineno - 1, parent=attr)


def _in_enum(attr: griffe.Attribute) -> bool:
    parent = attr.parent
    if not isinstance(parent, griffe.Class):
        return False
    return any(str(base).split(".")[-1].endswith("Enum") for base in parent.bases)


class Signatures(griffe.Extension):
    """Numbers as written in defaults; no value for an attribute set in ``__init__``."""

    def on_attribute_instance(self, *, attr: griffe.Attribute, **kwargs: Any) -> None:
        if "instance-attribute" in attr.labels and "class-attribute" not in attr.labels:
            attr.value = None

    def on_function_instance(
        self, *, node: Any, func: griffe.Function, agent: Any, **kwargs: Any
    ) -> None:
        code = getattr(agent, "code", None)
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or not code:
            return
        args = node.args
        positional = [*args.posonlyargs, *args.args]
        defaults = list(zip(positional[len(positional) - len(args.defaults) :], args.defaults))
        defaults += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
        for arg, default in defaults:
            if not isinstance(default, ast.Constant) or type(default.value) is not int:
                continue
            written = ast.get_source_segment(code, default)
            if written and written != str(default.value) and arg.arg in func.parameters:
                func.parameters[arg.arg].default = written


class PublicBases(griffe.Extension):
    """A private base class is replaced by its own bases (``Arm``: ``Struct``, not ``_V2``)."""

    def on_class_members(self, *, cls: griffe.Class, **kwargs: Any) -> None:
        cls.bases = _public_bases(cls)


def _public_bases(cls: griffe.Class) -> List[Union[str, griffe.Expr]]:
    bases: List[Union[str, griffe.Expr]] = []
    for base in cls.bases:
        path = base.canonical_path if isinstance(base, griffe.Expr) else str(base)
        name = path.rsplit(".", 1)[-1]
        if not name.startswith("_") or name.startswith("__"):
            bases.append(base)
            continue
        module = cls.module  # the class's own module is not in the collection yet
        try:
            private = module.members[name] if path == f"{module.path}.{name}" else None
            private = private or cls.modules_collection[path]
        except (KeyError, griffe.AliasResolutionError):
            continue  # unknown: shown as no base rather than as a private name
        if isinstance(private, griffe.Class):
            bases.extend(_public_bases(private))
    return bases

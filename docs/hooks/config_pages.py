"""Configuration reference pages, rendered from the pydantic models so they never go stale.

``config_page(title, root, intro)`` takes a root model (``FederationConfig``,
``DeviceProfile``) and returns one Markdown page: a section per model reachable from the
root (the root first, then breadth first), each with the YAML paths where it is used and a
table of its fields: name, type (with its bounds), default, and the description. A
description is the field's ``Field(description=...)`` when it has one, otherwise the
comment on the field's line and the comment lines right above it in the model's source.
Pure: reads the models' source through ``inspect``, no files of its own, no printing.
"""

from __future__ import annotations

import ast
import inspect
import io
import json
import textwrap
import tokenize
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
from markdown_text import escape_cell, escape_markdown
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

_BOUNDS = (
    (annotated_types.Gt, "gt", ">"),
    (annotated_types.Ge, "ge", "≥"),
    (annotated_types.Lt, "lt", "<"),
    (annotated_types.Le, "le", "≤"),
    (annotated_types.MinLen, "min_length", "length ≥ {}"),
    (annotated_types.MaxLen, "max_length", "length ≤ {}"),
)


@dataclass(frozen=True)
class FieldDoc:
    """One row of a model's table, as Markdown cell contents."""

    name: str
    type: str
    default: str
    description: str


def models_under(root: type[BaseModel]) -> list[tuple[type[BaseModel], list[str]]]:
    """Every model reachable from ``root`` through its fields, breadth first, each with the
    YAML paths where it appears (``algorithm.distill``, ``prototypes[].model``); the root's
    path is the empty string."""
    order: list[type[BaseModel]] = [root]
    paths: dict[type[BaseModel], list[str]] = {root: [""]}
    queue = [(root, "")]
    while queue:
        model, prefix = queue.pop(0)
        for name, info in model.model_fields.items():
            for sub, suffix in _models_in(info.annotation):
                path = f"{prefix}.{name}{suffix}".lstrip(".")
                if sub not in paths:
                    order.append(sub)
                    paths[sub] = []
                    queue.append((sub, path))
                if path not in paths[sub]:
                    paths[sub].append(path)
    return [(m, paths[m]) for m in order]


def _models_in(annotation: Any, suffix: str = "") -> Iterator[tuple[type[BaseModel], str]]:
    """The models inside a type, with ``[]`` appended per list level around them."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation, suffix
        return
    origin = get_origin(annotation)
    inner = f"{suffix}[]" if origin in (list, tuple, set) else suffix
    for arg in get_args(annotation):
        yield from _models_in(arg, inner)


def anchor(model: type[BaseModel]) -> str:
    """The section id of a model (its class name, lower case)."""
    return model.__name__.lower()


def type_cell(annotation: Any) -> str:
    """A type as Markdown: ``int``, ``"adam" | "sgd"``, a link for a model."""
    if annotation is type(None):
        return "`null`"
    if annotation is Any:
        return "any"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"[{annotation.__name__}](#{anchor(annotation)})"
    origin = get_origin(annotation)
    args = get_args(annotation)
    if origin is Literal:
        return " \\| ".join(f"`{json.dumps(a)}`" for a in args)
    if origin in (Union, types.UnionType):
        return " \\| ".join(type_cell(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        inner = ", ".join(type_cell(a) for a in args)
        return f"`{name}`[{inner}]" if args else f"`{name}`"
    return f"`{getattr(annotation, '__name__', str(annotation))}`"


def bounds(info: FieldInfo) -> str:
    """The field's numeric and length bounds as text (``> 0``, ``≥ 0, < 0.5``)."""
    out = []
    for meta in info.metadata:
        for kind, attr, sign in _BOUNDS:
            if isinstance(meta, kind):
                value = getattr(meta, attr)
                out.append(sign.format(value) if "{}" in sign else f"{sign} {value:g}")
    return ", ".join(out)


def default_cell(info: FieldInfo) -> str:
    """The default as YAML would spell it, ``required`` when there is none, or a pointer to
    the nested model's own defaults."""
    if info.default_factory is not None:
        value = info.default_factory()  # type: ignore[call-arg]
    elif info.default is PydanticUndefined:
        return "required"
    else:
        value = info.default
    if isinstance(value, BaseModel):
        return f"see [{type(value).__name__}](#{anchor(type(value))})"
    return f"`{json.dumps(value, ensure_ascii=False)}`"


def source_comments(model: type[BaseModel]) -> dict[str, str]:
    """Field name -> its comment text in ``model``'s own class body: the comment lines
    right above the field (no blank line between) and the comment on its line(s)."""
    try:
        source = textwrap.dedent(inspect.getsource(model))
    except (OSError, TypeError):  # built dynamically: no source to read
        return {}
    comments = _comments_by_line(source)
    body = ast.parse(source).body[0]
    if not isinstance(body, ast.ClassDef):
        return {}
    found = {}
    for node in body.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above: list[str] = []
        line = node.lineno - 1
        while line in comments and comments[line][1]:  # whole-line comments directly above
            above.insert(0, comments[line][0])
            line -= 1
        trailing = [
            comments[n][0]
            for n in range(node.lineno, (node.end_lineno or node.lineno) + 1)
            if n in comments and not comments[n][1]
        ]
        text = " ".join(above + trailing).strip()
        if text:
            found[node.target.id] = text
    return found


def _comments_by_line(source: str) -> dict[int, tuple[str, bool]]:
    """Line number -> (comment text without ``#``, whether the comment is the whole line)."""
    lines = source.splitlines()
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            whole = not lines[row - 1][:col].strip()
            out[row] = (tok.string.lstrip("#").strip(), whole)
    return out


def field_docs(model: type[BaseModel]) -> list[FieldDoc]:
    """A row per field of ``model``, in declaration order (inherited fields included)."""
    comments: dict[str, str] = {}
    for cls in reversed(model.__mro__):
        if isinstance(cls, type) and issubclass(cls, BaseModel) and cls is not BaseModel:
            comments.update(source_comments(cls))
    rows = []
    for name, info in model.model_fields.items():
        typ = type_cell(info.annotation)
        limit = bounds(info)
        if limit:
            typ = f"{typ}, {escape_cell(limit)}"
        description = info.description or comments.get(name, "")
        rows.append(
            FieldDoc(
                name=name,
                type=typ,
                default=default_cell(info),
                description=escape_cell(description),
            )
        )
    return rows


def model_section(model: type[BaseModel], paths: list[str]) -> str:
    """One model: heading, where it is used, its docstring, its field table."""
    lines = [f"## {model.__name__} {{ #{anchor(model)} }}", ""]
    shown = [f"`{p}`" for p in paths if p]
    if shown:
        lines += [f"Used at: {', '.join(shown)}.", ""]
    doc = inspect.getdoc(model)
    if doc and model.__doc__:  # its own docstring, not one inherited from a base
        lines += [escape_markdown(doc), ""]
    lines += ["| field | type | default | description |", "|---|---|---|---|"]
    for row in field_docs(model):
        lines.append(f"| `{row.name}` | {row.type} | {row.default} | {row.description} |")
    lines.append("")
    return "\n".join(lines)


def config_page(title: str, root: type[BaseModel], intro: str = "") -> str:
    """The whole reference page of one configuration file format."""
    lines = [f"# {title}", ""]
    if intro:
        lines += [intro, ""]
    lines += [
        "Generated from the configuration models when the site is built. Unknown keys are "
        "errors; a bad file is rejected with every problem listed as `field.path: message`.",
        "",
    ]
    for model, paths in models_under(root):
        lines.append(model_section(model, paths))
    return "\n".join(lines).rstrip() + "\n"

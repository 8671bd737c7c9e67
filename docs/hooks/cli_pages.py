"""CLI reference pages, rendered from the typer apps themselves so they never go stale.

``cli_page(prog, app)`` takes a program name (``takfl-coordinator``) and its ``typer.Typer``
and returns one Markdown page: the program's help, then for the program and every
subcommand (depth first, in registration order) its usage line and a table of its
arguments and options with their help, type, range and default, as ``--help`` prints them.
Pure: no files, no printing; importing the app is the caller's business.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import typer
from markdown_text import code_cell, escape_cell, escape_markdown


@dataclass(frozen=True)
class CommandDoc:
    """One command of a CLI: its full name (``takfl-coordinator serve``), the click-level
    command object, and the context it is rendered in (carries the parent chain)."""

    path: str
    command: Any
    ctx: Any


def walk(prog: str, app: typer.Typer) -> Iterator[CommandDoc]:
    """Every visible command of ``app``, the root first, then its subcommands depth first
    in registration order. A single-command app yields just the root."""
    root = typer.main.get_command(app)
    yield from _walk(prog, root, None)


def _walk(path: str, command: Any, parent: Any) -> Iterator[CommandDoc]:
    ctx = command.context_class(command, info_name=path.rsplit(" ", 1)[-1], parent=parent)
    yield CommandDoc(path=path, command=command, ctx=ctx)
    for name, sub in getattr(command, "commands", {}).items():
        if not getattr(sub, "hidden", False):
            yield from _walk(f"{path} {name}", sub, ctx)


def help_paragraphs(text: str | None) -> str:
    """A command's docstring as Markdown paragraphs (dedented, prose escaped)."""
    if not text:
        return ""
    return escape_markdown(inspect.cleandoc(text))


def param_rows(doc: CommandDoc) -> list[tuple[str, str]]:
    """(names with metavar, help with type/default/range notes) for every visible
    parameter of the command, ``--help`` included, as ``--help`` lists them."""
    rows = []
    for param in doc.command.get_params(doc.ctx):
        if getattr(param, "hidden", False):
            continue
        record = param.get_help_record(doc.ctx)
        if record is None:  # an argument without help text
            record = (param.make_metavar(doc.ctx) if _takes_ctx(param) else param.name, "")
        rows.append(record)
    return rows


def _takes_ctx(param: Any) -> bool:
    return "ctx" in inspect.signature(param.make_metavar).parameters


def command_section(doc: CommandDoc, level: int) -> str:
    """One command as Markdown: heading, help, usage block, parameter table."""
    lines = [f"{'#' * level} `{doc.path}`", ""]
    body = help_paragraphs(doc.command.help)
    if body:
        lines += [body, ""]
    usage = doc.command.get_usage(doc.ctx)
    lines += ["```text", usage, "```", ""]
    rows = param_rows(doc)
    if rows:
        lines += ["| argument or option | description |", "|---|---|"]
        lines += [f"| `{code_cell(n)}` | {escape_cell(h)} |" for n, h in rows]
        lines.append("")
    subs = [n for n, c in getattr(doc.command, "commands", {}).items() if not c.hidden]
    if subs:
        links = ", ".join(f"[`{n}`](#{anchor(f'{doc.path} {n}')})" for n in subs)
        lines += [f"Commands: {links}.", ""]
    return "\n".join(lines)


def anchor(path: str) -> str:
    """The heading id Python-Markdown's toc gives ``# `path` ``: lower case, runs of
    anything but word characters and hyphens collapsed to one hyphen."""
    return "-".join(path.lower().split())


def cli_page(prog: str, app: typer.Typer, intro: str = "") -> str:
    """The whole reference page of one program (see the module docstring)."""
    docs = list(walk(prog, app))
    lines = [f"# `{prog}`", ""]
    if intro:
        lines += [intro, ""]
    lines += [
        "Generated from the program's own command definitions when the site is built; "
        f"`{prog} --help` (and `--help` after any command) prints the same.",
        "",
    ]
    for i, doc in enumerate(docs):
        if i == 0:
            lines += [_root_section(doc)]
        else:
            lines += [command_section(doc, level=2)]
    return "\n".join(lines).rstrip() + "\n"


def _root_section(doc: CommandDoc) -> str:
    """The program itself: its help and usage without a heading of its own."""
    section = command_section(doc, level=2)
    return section.split("\n", 2)[2]  # drop the heading line and the blank after it

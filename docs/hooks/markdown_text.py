"""Escaping of generated text for Markdown: prose, table cells, code spans in cells."""

from __future__ import annotations


def escape_markdown(text: str, in_table: bool = False) -> str:
    """Prose safe in Markdown: angle brackets as entities, emphasis and link brackets
    escaped, and pipes too ``in_table``. Code spans (between backticks; reStructuredText's
    double backticks count as one) keep their text, apart from pipes in a table."""
    parts = text.replace("``", "`").split("`")
    out = []
    for i, part in enumerate(parts):
        if i % 2 == 0:  # outside a code span
            part = (
                part.replace("&", "&amp;")
                .replace("<", "&lt;")
                .replace(">", "&gt;")
                .replace("*", "\\*")
                .replace("[", "\\[")
                .replace("]", "\\]")
            )
        out.append(part.replace("|", "\\|") if in_table else part)
    return "`".join(out)


def escape_cell(text: str) -> str:
    """Text for one Markdown table cell: one line, escaped as ``escape_markdown``."""
    return escape_markdown(" ".join(text.split()), in_table=True)


def code_cell(text: str) -> str:
    """Text for a code span inside a table cell: one line, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")

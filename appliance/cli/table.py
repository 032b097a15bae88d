"""Printing tables for people on a terminal, and for pipes, serial consoles and dumb terminals.

On a colour terminal the commands draw rich tables. Everywhere else (stdout
not a terminal, ``TERM=dumb``, or ``hotsite --plain``) they print plain text,
like ``systemctl`` or ``kubectl``: whitespace-aligned columns, no box
characters, no trailing blanks, no line wider than the terminal (80 columns
when nobody says; ``COLUMNS`` does), long cells wrapped at word boundaries,
never inside a word when the words fit (no ``consecuti``/``ve``).

The commands keep building rich renderables (one description of each screen);
:func:`to_plain` reads those renderables back as text for the plain path.
"""

from __future__ import annotations

import os
import shutil
import sys
import textwrap
from collections.abc import Iterable, Sequence
from typing import Any

import click
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

GAP = 2  # blanks between columns
DEFAULT_WIDTH = 80

_plain_forced = False


def set_plain(plain: bool) -> None:
    """Force plain output even on a terminal (the global ``--plain`` option)."""
    global _plain_forced
    _plain_forced = plain


def plain_wanted(stream: Any = None) -> bool:
    """Plain unless stdout is a terminal that can draw (not ``TERM=dumb``) and nobody said ``--plain``."""
    stream = stream or sys.stdout
    if _plain_forced or os.environ.get("TERM") == "dumb":
        return True
    isatty = getattr(stream, "isatty", None)
    return not (isatty and isatty())


def width() -> int:
    """The terminal's width; off a terminal ``COLUMNS`` if set, else 80."""
    if sys.stdout.isatty():
        return shutil.get_terminal_size((DEFAULT_WIDTH, 24)).columns
    try:
        return max(20, int(os.environ.get("COLUMNS", "")))
    except ValueError:
        return DEFAULT_WIDTH


def emit(*renderables: RenderableType) -> None:
    """Print renderables: rich on a terminal, plain text elsewhere."""
    if plain_wanted():
        for renderable in renderables:
            click.echo(to_plain(renderable, width()))
    else:
        console = Console(highlight=False)
        for renderable in renderables:
            console.print(renderable)


def _text(cell: Any) -> str:
    if cell is None:
        return ""
    if isinstance(cell, Text):
        return cell.plain
    return str(cell)


def to_plain(renderable: RenderableType, max_width: int = DEFAULT_WIDTH) -> str:
    """A renderable (Text, str, Table, Group of them) as plain lines of at most *max_width* columns."""
    if isinstance(renderable, Group):
        return "\n".join(to_plain(r, max_width) for r in renderable.renderables)
    if isinstance(renderable, Table):
        return plain_table(renderable, max_width)
    return "\n".join(_wrap(_text(renderable), max_width))


def plain_table(table: Table, max_width: int = DEFAULT_WIDTH) -> str:
    """A rich table as aligned whitespace columns, wrapped at word boundaries to fit *max_width*."""
    headers = [_text(c.header) for c in table.columns]
    rows = [
        list(row) for row in zip(*([_text(cell) for cell in c.cells] for c in table.columns), strict=True)
    ]
    lines: list[str] = []
    if table.title:
        lines.append(_text(table.title))
    lines += layout(headers, rows, max_width)
    return "\n".join(lines)


def layout(
    headers: Sequence[str], rows: Iterable[Sequence[str]], max_width: int = DEFAULT_WIDTH
) -> list[str]:
    """Lines of a table: each column as wide as it needs, the widest shrunk (at word boundaries) to fit."""
    cells = [[" ".join(str(cell).split()) for cell in row] for row in rows]
    widths = _fit(headers, cells, max_width)
    out = _line([[h] for h in headers], widths)
    for row in cells:
        out += _line([_wrap(cell, w) for cell, w in zip(row, widths, strict=True)], widths)
    return out


def _fit(headers: Sequence[str], rows: list[list[str]], max_width: int) -> list[int]:
    columns = list(zip(headers, *rows, strict=True)) if rows else [(h,) for h in headers]
    natural = [max(len(v) for v in col) for col in columns]
    floor = [
        max([len(headers[i])] + [len(w) for v in col[1:] for w in v.split()]) for i, col in enumerate(columns)
    ]
    widths = list(natural)
    budget = max_width - GAP * (len(widths) - 1)
    while sum(widths) > budget:
        shrinkable = [i for i, w in enumerate(widths) if w > floor[i]]
        if not shrinkable:  # even the longest words do not fit: let the widest column break words
            widest = max(range(len(widths)), key=lambda i: widths[i])
            widths[widest] = max(1, widths[widest] - (sum(widths) - budget))
            break
        widest = max(shrinkable, key=lambda i: widths[i])
        widths[widest] -= 1
    return widths


def _wrap(text: str, width: int) -> list[str]:
    if width <= 0:
        return [text]
    out: list[str] = []
    for paragraph in text.splitlines() or [""]:
        out += textwrap.wrap(paragraph, width, break_on_hyphens=False) or [""]
    return out


def _line(cells: list[list[str]], widths: list[int]) -> list[str]:
    height = max(len(c) for c in cells)
    lines = []
    for n in range(height):
        parts = [(c[n] if n < len(c) else "").ljust(w) for c, w in zip(cells, widths, strict=True)]
        lines.append((" " * GAP).join(parts).rstrip())
    return lines

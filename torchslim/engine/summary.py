"""The summary as the terminal shows it: the full table where it fits, a compact one where it does not.

The full table has a column per figure and is about 160 characters wide. In a narrower terminal
its columns are printed in blocks that fit, one block under the other, each led by the stage
names, and the notes are wrapped under a hanging indent: no row is broken by the terminal.
"""

from __future__ import annotations

import os
import shutil
import sys
import textwrap

from tabulate import tabulate

from .report import Report

_NOTE = "note: "


def summary(report: Report, width: int | None = None) -> str:
    """The report's table and notes for a terminal ``width`` columns wide (default: the terminal's,
    if stdout is one or ``COLUMNS`` is set; otherwise no limit, as for a file or a pipe)."""
    width = terminal_width() if width is None else width
    table = report.table().split(f"\n{_NOTE}")[0]
    if width is not None and max(len(line) for line in table.splitlines()) > width:
        table = compact_table(report, width)
    return table + "".join(f"\n{_wrap(note, width)}" for note in report.notes)


def terminal_width() -> int | None:
    """Columns of the terminal stdout writes to, or None when stdout is not a terminal."""
    if "COLUMNS" in os.environ or sys.stdout.isatty():
        return shutil.get_terminal_size().columns
    return None


def compact_table(report: Report, width: int) -> str:
    """The table cut into blocks of columns ``width`` wide, one under the other, each starting with the stage."""
    grid = _grid(report)
    columns = [list(column) for column in zip(*grid, strict=True)]
    stage, figures = columns[0], columns[1:]
    blocks: list[list[list[str]]] = []
    block: list[list[str]] = []
    for column in figures:
        if block and _width([stage, *block, column]) > width:
            blocks.append(block)
            block = []
        block.append(column)
    blocks.append(block)
    return "\n\n".join(_render([stage, *block]) for block in blocks)


def _grid(report: Report) -> list[list[str]]:
    # The public table in tab-separated form: its columns stay those of report.table(), whatever they become.
    text = report.table("tsv").split(f"\n{_NOTE}")[0]
    return [[cell.strip() for cell in line.split("\t")] for line in text.splitlines() if line.strip()]


def _render(columns: list[list[str]]) -> str:
    headers = [column[0] for column in columns]
    rows = [list(row) for row in zip(*(column[1:] for column in columns), strict=True)]
    return tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True)


def _width(columns: list[list[str]]) -> int:
    return max(len(line) for line in _render(columns).splitlines())


def _wrap(note: str, width: int | None) -> str:
    if width is None:
        return _NOTE + note
    return textwrap.fill(
        note,
        width=max(width, 40),
        initial_indent=_NOTE,
        subsequent_indent=" " * len(_NOTE),
        break_on_hyphens=False,
        break_long_words=False,
    )

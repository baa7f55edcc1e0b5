"""Tables as figures: a PNG (matplotlib's table on an empty axis), Markdown, and the JSON behind them.

A table is a mapping {"title", "columns": [names], "rows": [{name: value}], "row_label": the key of the first
column, optional "notes": [lines]}; values are numbers (written with 3 decimals), strings or None ("–").
Used for the paper's tables (docs/math.md §7): Persona, Hamiltonian cycles, the UltraFeedback aggregate, the
ablations and the Footnote-3 statistics.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from figures._style import atomic_write, house_style, save_figure

__all__ = ["format_cell", "markdown_table", "table_figure"]


def format_cell(value: Any, digits: int = 3) -> str:
    """A table cell: floats with `digits` decimals, None as "–", anything else as str."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _cells(table: Mapping[str, Any], digits: int) -> tuple[list[str], list[list[str]]]:
    key = table["row_label"]
    header = [key, *table["columns"]]
    body = [[format_cell(row.get(c), digits) for c in header] for row in table["rows"]]
    return header, body


def markdown_table(table: Mapping[str, Any], digits: int = 3) -> str:
    """The table as GitHub Markdown: the title as a heading, the notes below the table."""
    header, body = _cells(table, digits)
    lines = [f"### {table.get('title', '')}", "", "| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in body]
    if table.get("notes"):
        lines += [""] + [f"- {n}" for n in table["notes"]]
    return "\n".join(lines) + "\n"


def table_figure(
    table: Mapping[str, Any], png_path: str | os.PathLike[str], digits: int = 3
) -> tuple[Path, Path, Path]:
    """Draws the table and writes the PNG, the JSON (the table itself) and the Markdown next to each other.

    Args:
      table: {"title", "columns", "rows", "row_label", optional "notes"}.
      png_path: where the PNG goes; the .json and .md share its stem.
      digits: decimals of float cells.

    Returns:
      (png path, json path, md path).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    header, body = _cells(table, digits)
    widths = [max(len(header[j]), *(len(r[j]) for r in body)) if body else len(header[j]) for j in range(len(header))]
    total = sum(widths) or 1
    notes = list(table.get("notes", ()))
    with house_style():
        fig = Figure(figsize=(min(2.0 + 0.11 * total, 22.0), 0.9 + 0.32 * (len(body) + 1) + 0.22 * len(notes)))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        ax.axis("off")
        drawn = ax.table(
            cellText=body or [["" for _ in header]],
            colLabels=header,
            colWidths=[w / total for w in widths],
            loc="upper center",
            cellLoc="right",
        )
        drawn.auto_set_font_size(False)
        drawn.set_fontsize(8)
        drawn.scale(1.0, 1.3)
        for (r, c), cell in drawn.get_celld().items():
            if r == 0:
                cell.set_text_props(weight="bold")
            if c == 0:
                cell.set_text_props(ha="left")
        ax.set_title(table.get("title", ""), fontsize=10)
        if notes:
            fig.text(0.01, 0.01, "\n".join(notes), fontsize=7, va="bottom", ha="left", wrap=True)
        png, js = save_figure(fig, png_path, dict(table))
    md = Path(png).with_suffix(".md")
    text = markdown_table(table, digits)

    def write_md(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    atomic_write(md, write_md)
    return png, js, md

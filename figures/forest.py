"""Figure: the controlled Persona study as a forest plot (docs/math.md §6.2.2; `rmdyn experiment persona --preset
controlled`).

One row per (group, headline cell): left, each reward type's mean accuracy with its bootstrap interval (½ marked:
chance); right, EX-RM − IM-RM with its paired interval (0 marked: no difference). PNG + JSON (every plotted
interval).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from figures._style import EX_COLOR, IM_COLOR, REF_COLOR, house_style, new_figure, save_figure

__all__ = ["forest_figure"]

_COLORS = {"EX-RM": EX_COLOR, "IM-RM": IM_COLOR}
_DIFF = "EX-RM − IM-RM"


def _rows(table: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """(label, row) of every headline cell of every group (its "headline" list), in table order."""
    out = []
    for group, g in table["groups"].items():
        for cell in g["headline"]:
            out.append((f"{group}: {cell}" if len(table["groups"]) > 1 else cell, g["cells"][cell]))
    return out


def forest_figure(table: Mapping[str, Any], png_path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Draws `experiments.studies.persona.controlled_report.interval_table`'s headline cells; writes PNG + JSON.

    Returns:
      (png path, json path).
    """
    rows = _rows(table)
    has_diff = any(_DIFF in r for _, r in rows)
    with house_style():
        fig, axes = new_figure(2 if has_diff else 1, panel_size=(4.8, 0.9 + 0.32 * len(rows)))
        ax = axes[0]
        ys = list(range(len(rows)))[::-1]
        labels = [k for k in _COLORS if any(k in r for _, r in rows)]
        for j, label in enumerate(labels):
            offset = 0.12 * (j - (len(labels) - 1) / 2)
            for y, (_, row) in zip(ys, rows, strict=True):
                iv = row.get(label)
                if iv is None:
                    continue
                err = [[iv["mean"] - iv["low"]], [iv["high"] - iv["mean"]]]
                ax.errorbar(iv["mean"], y + offset, xerr=err, fmt="o", ms=4, color=_COLORS[label], capsize=2,
                            label=label if y == ys[0] else None)  # fmt: skip
        ax.axvline(0.5, color=REF_COLOR, lw=0.7, ls="--")
        ax.set_xlim(-0.02, 1.02)
        ax.set_yticks(ys, [name for name, _ in rows], fontsize=7)
        ax.set_xlabel(f"accuracy ({table['level']:.0%} bootstrap interval)")
        ax.legend(fontsize=7, loc="lower right")
        if has_diff:
            ax = axes[1]
            for y, (_, row) in zip(ys, rows, strict=True):
                iv = row.get(_DIFF)
                if iv is not None:
                    ax.errorbar(iv["mean"], y, xerr=[[iv["mean"] - iv["low"]], [iv["high"] - iv["mean"]]], fmt="s",
                                ms=4, color=REF_COLOR, capsize=2)  # fmt: skip
            ax.axvline(0.0, color=REF_COLOR, lw=0.7, ls="--")
            ax.set_yticks(ys, [""] * len(ys))
            ax.set_xlabel("EX-RM − IM-RM (paired by seed and prompt)")
        fig.suptitle("controlled Persona design: accuracy on same-opening pairs", fontsize=9)
        data = {"level": table["level"], "n_boot": table["n_boot"], "rows": [{"cell": n, **r} for n, r in rows]}
        return save_figure(fig, png_path, data)

"""Figures of the paper's experiments (docs/math.md §7): training curves and the Figure-2-style UltraFeedback chart.

Data in (plain mappings, e.g. from `rmdyn figures`), PNG + JSON out (`figures._style.save_figure`).

- `training_curves_figure`: accuracy along training, one panel per evaluation (e.g. Persona's paraphrased
  responses on training / test prompts), one line per run. docs/math.md §9: the IM-RM's paraphrase accuracy
  collapses only late in training, so the whole curve is what to look at, not one point.
- `ultrafeedback_figure`: per evaluation set the EX-RM and IM-RM accuracies side by side, grouped by category
  (in-distribution, token-level shift, domain shift), each pair marked by its outcome (EX-RM win, tie, IM-RM
  win under the recorded tie rule); one row of panels per model (or other group).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dynamics.reward_types import reward_color
from figures._style import EX_COLOR, IM_COLOR, REF_COLOR, house_style, save_figure

__all__ = ["OUTCOME_COLORS", "training_curves_figure", "ultrafeedback_figure"]

#: Colours of the outcome markers of `ultrafeedback_figure`.
OUTCOME_COLORS = {"ex": "#2ca02c", "tie": "0.6", "im": "#9467bd"}
_LINESTYLES = ("-", "--", ":", "-.")


def _grid(n: int, cols: int, size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(size[0] * cols, size[1] * rows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(rows, cols, i + 1) for i in range(n)]


def training_curves_figure(data: Mapping[str, Any], png_path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Accuracy (ties ½) along training, one panel per evaluation, one line per run.

    Args:
      data: {"title": str, "x": "epoch" or "step", "panels": {panel title: {run label: {"x": [...], "y": [...],
        "kind": reward kind (colour)}}}}.
      png_path: where the PNG goes; the JSON (this `data`) goes next to it.

    Returns:
      (png path, json path).
    """
    panels = data["panels"]
    with house_style():
        fig, axes = _grid(len(panels), 4, (3.6, 2.9))
        for ax, (title, lines) in zip(axes, panels.items(), strict=True):
            styles: dict[str, int] = {}
            for label, line in lines.items():
                kind = line.get("kind", "")
                k = styles[kind] = styles.get(kind, -1) + 1
                ax.plot(line["x"], line["y"], marker="o", ms=2.5, lw=1.3, label=label,
                        color=reward_color(kind, REF_COLOR), ls=_LINESTYLES[k % len(_LINESTYLES)])  # fmt: skip
            ax.axhline(0.5, color=REF_COLOR, lw=0.8, ls=":")
            ax.set(title=title, xlabel=data.get("x", "epoch"), ylabel="accuracy (ties = ½)", ylim=(-0.03, 1.03))
        if axes:
            axes[0].legend(loc="best", fontsize=7)
        fig.suptitle(data.get("title", "Accuracy along training"), fontsize=10)
        return save_figure(fig, png_path, dict(data))


def ultrafeedback_figure(data: Mapping[str, Any], png_path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Figure 2 of the paper, for the given runs: EX-RM vs IM-RM accuracy per set, grouped by category.

    Args:
      data: {"title", "tie_rule": {"description"}, "comparisons": [SetComparison dicts: "set", "category",
        "group", "explicit", "implicit", "acc_ex", "acc_im", "band", "winner"], "set_labels": {set: label}}.
        Only comparisons of "EX-RM" against "IM-RM" are drawn (the ablations have their own tables).
      png_path: where the PNG goes; the JSON (this `data`) goes next to it.

    Returns:
      (png path, json path).
    """
    comps = [c for c in data["comparisons"] if (c["explicit"], c["implicit"]) == ("EX-RM", "IM-RM")]
    groups = list(dict.fromkeys(c["group"] for c in comps)) or [""]
    categories = list(dict.fromkeys(c["category"] for c in comps)) or ["(no comparisons)"]
    labels = data.get("set_labels", {})
    with house_style():
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch

        widths = [max(1, len({c["set"] for c in comps if c["category"] == cat})) for cat in categories]
        fig = Figure(figsize=(1.2 * sum(widths) + 2.0, 2.9 * len(groups) + 0.6), layout="constrained")
        FigureCanvasAgg(fig)
        spec = fig.add_gridspec(len(groups), len(categories), width_ratios=widths)
        for gi, group in enumerate(groups):
            for ci, category in enumerate(categories):
                ax = fig.add_subplot(spec[gi, ci])
                mine = [c for c in comps if c["group"] == group and c["category"] == category]
                x = np.arange(len(mine))
                ax.bar(x - 0.18, [c["acc_ex"] for c in mine], 0.36, color=EX_COLOR, label="EX-RM")
                ax.bar(x + 0.18, [c["acc_im"] for c in mine], 0.36, color=IM_COLOR, label="IM-RM")
                for xi, c in zip(x, mine, strict=True):
                    top = max(c["acc_ex"], c["acc_im"]) + 0.06
                    ax.plot([xi], [min(top, 1.08)], marker="s", ms=7, color=OUTCOME_COLORS[c["winner"]])
                ax.axhline(0.5, color=REF_COLOR, lw=0.8, ls=":")
                ax.set_xticks(x, [labels.get(c["set"], c["set"]) for c in mine], rotation=30, ha="right")
                ax.set_ylim(0.0, 1.12)
                title = category if not group else f"{category}\n{group}"
                ax.set_title(title, fontsize=9)
                if ci == 0:
                    ax.set_ylabel("accuracy (ties = ½)")
        handles = [
            Patch(color=EX_COLOR, label="EX-RM"),
            Patch(color=IM_COLOR, label="IM-RM"),
            *(Line2D([], [], marker="s", ls="", color=OUTCOME_COLORS[k], label=name)
              for k, name in (("ex", "EX-RM win"), ("tie", "tie"), ("im", "IM-RM win"))),
        ]  # fmt: skip
        fig.legend(handles=handles, loc="outside lower center", ncol=5, fontsize=8)
        rule = data.get("tie_rule", {}).get("description", "")
        fig.suptitle(f"{data.get('title', 'EX-RM vs IM-RM')}\n{rule}", fontsize=9)
        return save_figure(fig, png_path, dict(data))

"""Figure: likelihood displacement after one step (docs/math.md §12; `rmdyn displacement`).

Left: predicted against actual Δ ln π(y+) and Δ ln π(y−) of every training pair (when a real step was run), with
the diagonal. Right: the length-normalised CHES of each pair against its predicted Δ ln π(y+); the pairs whose
chosen log-likelihood is predicted to fall are marked. PNG + JSON (every plotted number).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from figures._style import IM_COLOR, REF_COLOR, house_style, new_figure, save_figure

__all__ = ["displacement_figure"]

FALL_COLOR = "#9467bd"


def displacement_figure(
    result: Any, png_path: str | os.PathLike[str], *, title: str | None = None
) -> tuple[Path, Path]:
    """Draws a `dynamics.displacement.Displacement` (or its `to_dict()`) and writes PNG + JSON.

    Returns:
      (png path, json path).
    """
    d: Mapping[str, Any] = result if isinstance(result, Mapping) else result.to_dict()
    chosen, rejected = np.asarray(d["chosen"], np.float64), np.asarray(d["rejected"], np.float64)
    ln_ches = np.asarray(d["ln_ches"], np.float64)
    has_actual = d.get("actual_chosen") is not None
    with house_style():
        fig, axes = new_figure(2 if has_actual else 1, panel_size=(4.4, 3.6))
        if has_actual:
            ax = axes[0]
            a_c, a_r = np.asarray(d["actual_chosen"]), np.asarray(d["actual_rejected"])
            ax.scatter(a_c, chosen, s=14, color=IM_COLOR, label="y+ (chosen)")
            ax.scatter(a_r, rejected, s=14, marker="x", color=REF_COLOR, label="y− (rejected)")
            lim = float(np.max(np.abs(np.concatenate([a_c, a_r, chosen, rejected])))) * 1.05 or 1.0
            ax.plot([-lim, lim], [-lim, lim], color=REF_COLOR, lw=0.7)
            ax.axhline(0, color=REF_COLOR, lw=0.5)
            ax.axvline(0, color=REF_COLOR, lw=0.5)
            ax.set_xlabel("actual Δ ln π (nats, one real step)")
            ax.set_ylabel("predicted Δ ln π (nats, first order)")
            ax.legend(fontsize=7)
        ax = axes[-1]
        falls = chosen < 0
        ax.scatter(ln_ches[~falls], chosen[~falls], s=14, color=IM_COLOR, label="Δ ln π(y+) ≥ 0")
        ax.scatter(ln_ches[falls], chosen[falls], s=14, color=FALL_COLOR, label="Δ ln π(y+) < 0 (displaced)")
        ax.axhline(0, color=REF_COLOR, lw=0.6)
        ax.set_xlabel("length-normalised CHES")
        ax.set_ylabel("predicted Δ ln π(y+) (nats)")
        ax.legend(fontsize=7)
        meta = d.get("meta", {})
        default = (
            f"likelihood displacement, one {meta.get('optimizer', 'sgd')} step, η = {meta.get('lr', float('nan')):g}, "
            f"params {meta.get('params', '?')}"
        )
        fig.suptitle(title or default, fontsize=9)
        data = {k: d.get(k) for k in ("chosen", "rejected", "actual_chosen", "actual_rejected", "ln_ches", "ches")}
        return save_figure(fig, png_path, {**data, "summary": d.get("summary"), "meta": meta})

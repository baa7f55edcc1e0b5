"""Figure: likelihood displacement after one step (docs/math.md §12; `rmdyn displacement`).

Left: predicted against actual Δ ln π(y+) and Δ ln π(y−) of every training pair (when a real step was run), with
the diagonal. Along a run (`dynamics.displacement_run`), next: the mean Δ ln π(y+) and Δ ln π(y−) over the pairs at
every checkpoint, actual (solid) and predicted (dashed). Right: the length-normalised CHES of each pair against its
predicted Δ ln π(y+); the pairs whose chosen log-likelihood is predicted to fall are marked. PNG + JSON (every
plotted number).
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
    has_path = d.get("path_steps") is not None
    with house_style():
        fig, axes = new_figure(1 + has_actual + has_path, panel_size=(4.4, 3.6))
        if has_path:
            _path_panel(axes[1], d, len(chosen))
        if has_actual:
            ax = axes[0]
            a_c, a_r = np.asarray(d["actual_chosen"]), np.asarray(d["actual_rejected"])
            ax.scatter(a_c, chosen, s=14, color=IM_COLOR, label="y+ (chosen)")
            ax.scatter(a_r, rejected, s=14, marker="x", color=REF_COLOR, label="y− (rejected)")
            lim = float(np.max(np.abs(np.concatenate([a_c, a_r, chosen, rejected])))) * 1.05 or 1.0
            ax.plot([-lim, lim], [-lim, lim], color=REF_COLOR, lw=0.7)
            ax.axhline(0, color=REF_COLOR, lw=0.5)
            ax.axvline(0, color=REF_COLOR, lw=0.5)
            ax.set_xlabel("actual Δ ln π (nats, " + ("over the run)" if has_path else "one real step)"))
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
        steps = f"{meta['steps']} {meta.get('optimizer')} steps" if has_path else f"one {meta.get('optimizer')} step"
        default = (
            f"likelihood displacement, {steps}, η = {meta.get('lr', float('nan')):g}, params {meta.get('params', '?')}"
        )
        fig.suptitle(title or default, fontsize=9)
        keys = ("chosen", "rejected", "actual_chosen", "actual_rejected", "ln_ches", "ches", "path_steps")
        data = {k: d.get(k) for k in keys}
        if has_path:
            data["path_mean"] = _path_means(d, len(chosen))
        return save_figure(fig, png_path, {**data, "summary": d.get("summary"), "meta": meta})


def _path_means(d: Mapping[str, Any], n: int) -> dict[str, list[float]]:
    """Mean cumulative Δ ln π over the N pairs' chosen (rows :n) and rejected (rows n:2n) responses, per checkpoint."""
    out = {}
    for kind in ("predicted", "actual"):
        path = np.asarray(d[f"path_{kind}"], np.float64)
        out[f"{kind}_chosen"] = path[:, :n].mean(axis=1).tolist()
        out[f"{kind}_rejected"] = path[:, n : 2 * n].mean(axis=1).tolist()
    return out


def _path_panel(ax: Any, d: Mapping[str, Any], n: int) -> None:
    steps, means = np.asarray(d["path_steps"]), _path_means(d, n)
    for side, color in (("chosen", IM_COLOR), ("rejected", REF_COLOR)):
        ax.plot(
            steps,
            means[f"actual_{side}"],
            color=color,
            marker="o",
            ms=3,
            label=f"y{'+' if side == 'chosen' else '−'} actual",
        )
        ax.plot(
            steps,
            means[f"predicted_{side}"],
            color=color,
            ls="--",
            label=f"y{'+' if side == 'chosen' else '−'} predicted",
        )
    ax.axhline(0, color=REF_COLOR, lw=0.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mean Δ ln π since step 0 (nats)")
    ax.legend(fontsize=7)

"""Figure: first-order prediction against a real optimizer step, over a sweep of learning rates (docs/math.md §3).

Data in (`dynamics.step_check.StepCheckResult`s or their `to_dict()`), PNG + JSON out.

- One panel per reward type: actual Δr / η against predicted Δr / η for every unseen pair and every η, coloured by
  η (log colour scale), with the line y = x. Dividing by η puts every learning rate on one linear scale (the
  prediction is linear in η); points leave the diagonal where O(η²) takes over (large η) or where float32
  rounding of r' − r does (small η).
- A last panel: max over pairs of |actual − predicted| against η, log-log, one line per reward type, with a slope-2
  guide (the residual of a first-order prediction is O(η²)).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from figures._style import EX_COLOR, IM_COLOR, REF_COLOR, house_style, new_figure, save_figure

__all__ = ["step_scatter_figure"]

_OTHER_COLORS = ["#2ca02c", "#9467bd", "#8c564b", "#e377c2"]


def _as_dict(result: Any) -> Mapping[str, Any]:
    return result if isinstance(result, Mapping) else result.to_dict()


def _color(name: str, reward: str, k: int) -> str:
    tag = (reward or name).upper()
    if tag.startswith("EX"):
        return EX_COLOR
    if tag.startswith("IM"):
        return IM_COLOR
    return _OTHER_COLORS[k % len(_OTHER_COLORS)]


def step_scatter_figure(results: Mapping[str, Any], png_path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Draws predicted vs actual Δr per reward type and the residual's scaling in η; writes PNG + JSON.

    Args:
      results: name (e.g. "EX-RM", "IM-RM") → `StepCheckResult` or its `to_dict()`: needs "lrs" [n_lr],
        "predicted" and "actual" [n_lr, n_unseen]; "stats", "residual_slope" and "meta" are copied if present.
      png_path: where to write the PNG; the JSON goes next to it.

    Returns:
      (png path, json path).

    Raises:
      ValueError: no result, or arrays of inconsistent shapes.
    """
    from matplotlib.colors import LogNorm

    if not results:
        raise ValueError("step_scatter_figure needs at least one result")
    data: dict[str, dict[str, Any]] = {}
    for name, result in results.items():
        d = _as_dict(result)
        lrs = np.asarray(d["lrs"], dtype=np.float64)
        pred, act = (np.asarray(d[k], dtype=np.float64) for k in ("predicted", "actual"))
        if pred.shape != act.shape or pred.ndim != 2 or pred.shape[0] != lrs.shape[0]:
            raise ValueError(f"{name}: predicted {pred.shape}, actual {act.shape} for {lrs.shape[0]} learning rates")
        data[name] = {
            "lrs": lrs,
            "predicted": pred,
            "actual": act,
            "max_abs_residual": np.abs(act - pred).max(axis=1),
            "max_abs_predicted": np.abs(pred).max(axis=1),
            "stats": d.get("stats"),
            "residual_slope": d.get("residual_slope"),
            "meta": d.get("meta", {}),
        }
    all_lrs = np.concatenate([d["lrs"] for d in data.values()])
    norm = LogNorm(vmin=all_lrs.min(), vmax=max(all_lrs.max(), all_lrs.min() * 1.0001))

    with house_style():
        fig, axes = new_figure(len(data) + 1, panel_size=(4.2, 3.8))
        for ax, (name, d) in zip(axes, data.items(), strict=False):
            x = d["predicted"] / d["lrs"][:, None]
            y = d["actual"] / d["lrs"][:, None]
            colors = np.broadcast_to(d["lrs"][:, None], x.shape)
            sc = ax.scatter(x.ravel(), y.ravel(), c=colors.ravel(), cmap="viridis", norm=norm, s=14,
                            edgecolors="none", alpha=0.85)  # fmt: skip
            lo = float(min(x.min(), y.min()))
            hi = float(max(x.max(), y.max()))
            pad = 0.05 * (hi - lo or 1.0)
            ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color=REF_COLOR, lw=0.9, ls="--", label="y = x")
            meta = d["meta"]
            ax.set(xlabel="predicted Δr / η (first order)", ylabel="actual Δr / η (real step)")
            ax.set_title(f"{name}: params {meta.get('params', '?')}, {meta.get('optimizer', '?')}")
            slope = (d["residual_slope"] or {}).get("slope_of_max")
            if slope is not None:
                ax.text(0.03, 0.97, f"residual slope {float(slope):.2f}", transform=ax.transAxes, va="top",
                        fontsize=8)  # fmt: skip
            ax.legend(loc="lower right")
            fig.colorbar(sc, ax=ax, label="η", shrink=0.9)

        ax = axes[-1]
        for k, (name, d) in enumerate(data.items()):
            color = _color(name, str(d["meta"].get("reward", "")), k)
            keep = d["max_abs_residual"] > 0
            ax.plot(d["lrs"][keep], d["max_abs_residual"][keep], "o-", color=color, label=f"{name}: max |residual|")
            ax.plot(d["lrs"], d["max_abs_predicted"], ":", color=color, lw=1.0, label=f"{name}: max |predicted|")
        # slope-2 guide through the largest-η point of the first series with a nonzero residual
        anchors = [(d["lrs"][-1], d["max_abs_residual"][-1]) for d in data.values() if d["max_abs_residual"][-1] > 0]
        if anchors:
            x0, y0 = anchors[0]
            xs = np.array([all_lrs.min(), all_lrs.max()])
            ax.plot(xs, y0 * (xs / x0) ** 2, color=REF_COLOR, lw=1.0, ls="--", label="slope 2 (O(η²))")
        ax.set(xscale="log", yscale="log", xlabel="learning rate η", ylabel="max over pairs of |Δr|")
        ax.set_title("Residual |actual − predicted|")
        ax.legend(loc="upper left", fontsize=7)
        fig.suptitle("One real step against the first-order Δr (docs/math.md §3)", fontsize=10)
        out_all = {
            "results": data,
            "figure": {
                "slope_2_guide_anchor": [float(a) for a in anchors[0]] if anchors else None,
                "scatter": "actual Δr / η vs predicted Δr / η, colour = η (log), dashed y = x",
                "last_panel": "max over pairs |actual − predicted| vs η (log-log), dotted max |predicted|, "
                "dashed slope-2 guide",
            },
        }
        return save_figure(fig, png_path, out_all)

"""Figure: the IM-RM's token-level coefficients ρ_{k,l} and the hidden similarities (docs/math.md §3.2, Eq. (5)).

Data in (a `dynamics.rho.RhoResult` or its `to_dict()`), PNG + JSON out. A 2 × 3 grid: rows v = y+ and v = y−;
columns ρ_{k,l}(v), ⟨h_{x̄,ȳ<k}, h_{x,v<l}⟩ and their product, whose double sum is the kernel term of Eq. (5)
(before β²). Unseen tokens ȳ_k run down the y axis, training tokens v_l along the x axis. Every panel uses a
diverging colormap centred at 0 with symmetric limits, so red is "pushes r(ȳ) the way of v" and blue the opposite.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from figures._style import house_style, save_figure

__all__ = ["readable_token", "rho_figure"]

CMAP = "RdBu_r"
_ANNOTATE_MAX_CELLS = 400  # write the value in each cell up to this many cells per panel


def readable_token(token: str) -> str:
    """A token string for an axis label: newline as "\\n", tab as "\\t", spaces as "␣"."""
    return token.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t").replace(" ", "␣")


def _heatmap(ax: Any, fig: Any, values: np.ndarray, rows: Sequence[str], cols: Sequence[str], title: str) -> None:
    lim = float(np.max(np.abs(values))) if values.size else 0.0
    lim = lim if lim > 0 else 1.0
    image = ax.imshow(values, cmap=CMAP, vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
    ax.set_xticks(np.arange(len(cols)), [readable_token(t) for t in cols], rotation=60, ha="right", fontsize=7)
    ax.set_yticks(np.arange(len(rows)), [readable_token(t) for t in rows], fontsize=7)
    ax.grid(False)
    ax.set_title(title, fontsize=9)
    if values.size <= _ANNOTATE_MAX_CELLS:
        fmt = "{:.2f}" if lim < 10 else "{:.0f}"
        for (k, l), v in np.ndenumerate(values):
            ax.text(l, k, fmt.format(v), ha="center", va="center", fontsize=5,
                    color="white" if abs(v) > 0.6 * lim else "black")  # fmt: skip
    fig.colorbar(image, ax=ax, shrink=0.85, pad=0.02)


def rho_figure(result: Any, png_path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Draws the ρ / ⟨h, h'⟩ / product grid for one unseen pair against y+ and y− and writes PNG + JSON.

    Args:
      result: a `RhoResult`, or the mapping from its `to_dict()` (e.g. a loaded rho.json).
      png_path: where to write the PNG; the JSON (every plotted number, the sums) goes next to it.

    Returns:
      (png path, json path).

    Raises:
      KeyError: a needed field is missing from a dict.
      ValueError: a matrix whose shape does not match the token lists.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data: Mapping[str, Any] = result if isinstance(result, Mapping) else result.to_dict()
    unseen = list(data["unseen_tokens"])
    sides = (("chosen", "y+"), ("rejected", "y−"))
    panels: dict[str, dict[str, np.ndarray]] = {}
    for key, _ in sides:
        p = data[key]
        mats = {name: np.asarray(p[name], dtype=np.float64) for name in ("rho", "hidden_similarity", "product")}
        for name, m in mats.items():
            if m.shape != (len(unseen), len(p["tokens"])):
                raise ValueError(
                    f"{key}.{name} has shape {m.shape}, expected ({len(unseen)}, {len(p['tokens'])}) "
                    "(unseen tokens × training tokens)"
                )
        panels[key] = mats
    beta, g, lr = float(data["beta"]), float(data["bt_weight"]), float(data["lr"])
    k_plus, k_minus = float(data["kernel_chosen"]), float(data["kernel_rejected"])
    delta = float(data["delta_reward_closed_form"])
    meta = data.get("meta", {})
    excluded = bool(data.get("closing_tokens_excluded", False))
    sums: dict[str, dict[str, float]] = {}

    with house_style():
        n_k = len(unseen)
        n_l = max(len(data[key]["tokens"]) for key, _ in sides)
        fig = Figure(figsize=(max(12.0, 3 * (1.2 + 0.34 * n_l)), 2 * (1.6 + 0.28 * n_k) + 0.9), layout="constrained")
        FigureCanvasAgg(fig)
        for r, (key, v) in enumerate(sides):
            mats, cols = panels[key], data[key]["tokens"]
            sums[key] = {name: float(m.sum()) for name, m in mats.items()}
            vm = "+" if key == "chosen" else "-"
            titles = (
                rf"$\rho_{{k,l}}(y^{vm})$   Σ = {sums[key]['rho']:.3g}",
                rf"$\langle h_{{\bar x,\bar y_{{<k}}}}, h_{{x,y^{vm}_{{<l}}}}\rangle$   Σ = "
                f"{sums[key]['hidden_similarity']:.4g}",
                rf"$\langle h, h'\rangle\,\rho_{{k,l}}(y^{vm})$   ΣΣ = {sums[key]['product']:.4g}",
            )
            for c, name in enumerate(("rho", "hidden_similarity", "product")):
                ax = fig.add_subplot(2, 3, 3 * r + c + 1)
                _heatmap(ax, fig, mats[name], unseen, cols, titles[c])
                if c == 0:
                    ax.set_ylabel(f"unseen ȳ_k (vs {v})")
                if r == 1:
                    ax.set_xlabel("training token v_l")
        unseen_text = meta.get("unseen_response", "ȳ")
        closing = "closing tokens excluded" if excluded else "closing tokens included"
        fig.suptitle(
            f"IM-RM ρ for ȳ = {unseen_text!r}   ({closing})\n"
            f"K(u,y+) = β²ΣΣ = {k_plus:.4g},  K(u,y−) = {k_minus:.4g},  g = σ(r−−r+) = {g:.4g},  "
            f"Δr = η·g·(K+ − K−) = {delta:.4g}  (η = {lr:g}, β = {beta:g}; Eq. (5), Assumption 1)",
            fontsize=10,
        )
        out = dict(data)
        out["figure"] = {
            "rows": ["y+ (chosen)", "y- (rejected)"],
            "columns": ["rho", "hidden_similarity", "product"],
            "y": "unseen response tokens (k)",
            "x": "training response tokens (l)",
            "colormap": f"{CMAP}, symmetric limits per panel",
            "sums": sums,
        }
        return save_figure(fig, png_path, out)

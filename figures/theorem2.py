"""Figure: the Theorem-2 simulation (docs/math.md §5 and §7, "the Theorem-2 simulation" diagnostic figure).

Data in (a `theory.Theorem2Result` or its `to_dict()` / JSON), PNG + JSON out. Three panels over the GD step t
(log axis, t ≥ 1), each a mean over seeds with a min–max band:

1. cos(u(t), u*): the EX-RM head turning towards the max-margin direction;
2. accuracy on evaluation pairs of unseen tokens: EX-RM (tending to u*'s accuracy, dashed) against IM-RM (flat
   at ½, ties), with the IM-RM's training accuracy for contrast;
3. the training BT loss of both, as log10.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from figures._style import EX_COLOR, IM_COLOR, REF_COLOR, band, house_style, new_figure, save_figure

__all__ = ["theorem2_figure"]


def _series(data: Mapping[str, Any], name: str) -> np.ndarray:
    """A recorded series as float [S, G] (JSON writes non-finite values as strings)."""
    return np.asarray(data[name], dtype=np.float64)


def theorem2_figure(data: Any, png_path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Draws the Theorem-2 figure and writes it with the numbers it shows.

    Args:
      data: a `theory.Theorem2Result`, or the mapping from its `to_dict()` (e.g. a loaded results JSON). Needs
        "steps" [G] and the [S, G] series "cos_u_star", "acc_unseen_ex", "acc_unseen_im", "train_acc_im",
        "log_loss_ex", "log_loss_im", and "u_star_acc_unseen" [S].
      png_path: where to write the PNG; the JSON goes next to it with suffix .json.

    Returns:
      (png path, json path).

    Raises:
      KeyError: a needed series is missing from `data`.
    """
    if not isinstance(data, Mapping):
        data = data.to_dict()
    steps = np.asarray(data["steps"], dtype=np.float64)
    keep = steps >= 1  # log axis
    t = steps[keep]
    cos = _series(data, "cos_u_star")[:, keep]
    acc_ex = _series(data, "acc_unseen_ex")[:, keep]
    acc_im = _series(data, "acc_unseen_im")[:, keep]
    train_im = _series(data, "train_acc_im")[:, keep]
    u_star_acc = float(np.nanmean(np.asarray(data["u_star_acc_unseen"], dtype=np.float64)))
    log10_ex = _series(data, "log_loss_ex")[:, keep] / math.log(10)
    log10_im = _series(data, "log_loss_im")[:, keep] / math.log(10)
    config = data.get("config", {})
    n_seeds = cos.shape[0]

    with house_style():
        fig, (ax_cos, ax_acc, ax_loss) = new_figure(3)
        band(ax_cos, t, cos, label="cos(u(t), u*)", color=EX_COLOR)
        ax_cos.axhline(1.0, color=REF_COLOR, lw=0.8, ls=":")
        ax_cos.set(xscale="log", xlabel="GD step t", ylabel="cos(u(t), u*)", title="EX-RM direction")
        ax_cos.legend(loc="lower right")

        band(ax_acc, t, acc_ex, label="EX-RM, unseen", color=EX_COLOR)
        band(ax_acc, t, acc_im, label="IM-RM, unseen", color=IM_COLOR)
        band(ax_acc, t, train_im, label="IM-RM, train", color=IM_COLOR, linestyle="--")
        ax_acc.axhline(u_star_acc, color=EX_COLOR, lw=0.9, ls="--", label=f"u* on unseen ({u_star_acc:.3f})")
        ax_acc.axhline(0.5, color=REF_COLOR, lw=0.8, ls=":", label="chance")
        ax_acc.set(xscale="log", xlabel="GD step t", ylabel="accuracy (ties = ½)", ylim=(0.0, 1.05))
        ax_acc.set_title("Pairs of unseen tokens")
        ax_acc.legend(loc="lower left")

        band(ax_loss, t, log10_ex, label="EX-RM", color=EX_COLOR)
        band(ax_loss, t, log10_im, label="IM-RM", color=IM_COLOR)
        ax_loss.set(xscale="log", xlabel="GD step t", ylabel="log10 training loss", title="Training loss")
        ax_loss.legend(loc="lower left")

        schedule = config.get("schedule", "?")
        source = str(data.get("source", "?"))
        if len(source) > 40:  # "model:<long model description>:<trait>" → "model:<trait>"
            parts = source.split(":")
            source = f"{parts[0]}:{parts[-1]}" if len(parts) > 2 else source[:40] + "…"
        fig.suptitle(
            f"Theorem 2 ({source} source, {n_seeds} seeds, {schedule} GD, "
            f"β = {config.get('beta', '?')}; mean and min–max over seeds)",
            fontsize=10,
        )
        out = dict(data)
        out["figure"] = {
            "panels": ["cos(u(t), u*)", "accuracy on unseen-token pairs", "log10 training loss"],
            "x": "GD step t >= 1, log scale",
            "bands": "min-max over seeds, line = mean",
        }
        return save_figure(fig, png_path, out)

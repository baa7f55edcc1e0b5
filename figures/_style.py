"""Shared plotting helpers for the figure functions (private; small on purpose).

Figures are drawn on a bare `matplotlib.figure.Figure` with the Agg canvas: no pyplot, no global backend
switch, no GUI, safe in tests and on headless machines. `save_figure` writes the PNG and the JSON of the
plotted numbers next to it, both atomically.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dynamics.outputs import jsonable, permissions
from dynamics.reward_types import reward_color

__all__ = ["EX_COLOR", "IM_COLOR", "REF_COLOR", "atomic_write", "band", "house_style", "new_figure", "save_figure"]

# Colours of the two reward-model types, reused by every figure.
EX_COLOR = reward_color("ex")
IM_COLOR = reward_color("im")
REF_COLOR = "0.35"

_RC = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
}


def house_style() -> Any:
    """Context manager with the house rcParams; draw the whole figure inside it (they apply at creation)."""
    import matplotlib

    return matplotlib.rc_context(_RC)


def new_figure(n_panels: int, *, panel_size: tuple[float, float] = (4.0, 3.2)) -> tuple[Figure, list[Axes]]:
    """A 1 × n_panels figure on the Agg canvas (call inside `house_style()`)."""
    fig = Figure(figsize=(panel_size[0] * n_panels, panel_size[1]), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, n_panels, i + 1) for i in range(n_panels)]


def band(
    ax: Axes,
    x: Sequence[float] | np.ndarray,
    runs: Sequence[Sequence[float]] | np.ndarray,
    *,
    label: str,
    color: str,
    linestyle: str = "-",
) -> None:
    """Plots the mean over runs (axis 0 of `runs` [S, G]) with a shaded min–max band."""
    y = np.asarray(runs, dtype=np.float64)
    if y.ndim == 1:
        y = y[None, :]
    ax.plot(x, np.nanmean(y, axis=0), color=color, linestyle=linestyle, label=label, lw=1.6)
    if y.shape[0] > 1:
        ax.fill_between(x, np.nanmin(y, axis=0), np.nanmax(y, axis=0), color=color, alpha=0.2, lw=0)


def atomic_write(path: Path, write: Any) -> None:
    """Calls `write(tmp_path)` on a temporary file beside `path`, then renames it over `path` (readers never see
    half a figure); the file gets the ordinary permissions (`dynamics.outputs.permissions`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, permissions())  # mkstemp creates 0600; figures are ordinary files
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_figure(fig: Figure, png_path: str | os.PathLike[str], data: Mapping[str, Any]) -> tuple[Path, Path]:
    """Writes `fig` to `png_path` and `data` to the same path with suffix .json, both atomically.

    Returns:
      (png path, json path).
    """
    png = Path(png_path)
    js = png.with_suffix(".json")

    def write_json(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(jsonable(data), fh, indent=1, allow_nan=False)
            fh.write("\n")

    atomic_write(png, lambda tmp: fig.savefig(tmp, format="png", dpi=150))
    atomic_write(js, write_json)
    return png, js

"""Figure: predicted one-step Δr of unseen pairs, EX-RM beside IM-RM (docs/math.md §3; `rmdyn delta`, the demo).

Data in (`dynamics.delta.DeltaResult`s or their `to_dict()`), PNG + JSON out. One panel per computation (e.g.
EX-RM and IM-RM, each with all parameters trained and under Assumption 1), EX-RM panels first, each on its own
symmetric x scale: the reward types live on different scales (reward units against β × nats), and so do the
trainable sets. One horizontal bar per unseen pair, the pairs sharing the y axis. Pairs whose reward a good reward
model should raise (a paraphrase of y+) or lower (of y−) can be marked: their labels are coloured and a bar
pointing the wrong way is hatched.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from figures._style import EX_COLOR, IM_COLOR, REF_COLOR, house_style, save_figure

__all__ = ["delta_bars_figure"]

RISE_COLOR = "#2ca02c"
FALL_COLOR = "#9467bd"
_COLORS = {"EX": EX_COLOR, "IM": IM_COLOR}


def _as_dict(result: Any) -> Mapping[str, Any]:
    return result if isinstance(result, Mapping) else result.to_dict()


def _family(reward: str) -> str:
    """ "EX" or "IM" (the panel) of a reward name such as "EX-RM (mean)" or "IM-RM (no ref)"."""
    return "IM" if reward.upper().startswith("IM") else "EX"


def _series_title(name: str, meta: Mapping[str, Any]) -> str:
    detail = f"{meta.get('method', '?')}, params {meta.get('params', '?')}, {meta.get('optimizer', 'sgd')}"
    return f"{name}\n({detail}, η = {meta.get('lr', float('nan')):g})"


def _group_boundaries(labels: Sequence[str]) -> list[int]:
    """Indices i where the text before ":" of label i differs from label i − 1 (e.g. a new prompt)."""
    heads = [label.split(":", 1)[0] if ":" in label else None for label in labels]
    return [i for i in range(1, len(labels)) if heads[i] is not None and heads[i] != heads[i - 1]]


def _series(results: Mapping[str, Any], n: int) -> dict[str, dict[str, Any]]:
    """Per series: its panel (EX / IM), title, Δr [n] and metadata; a ValueError for a length other than n."""
    series: dict[str, dict[str, Any]] = {}
    for name, result in results.items():
        d = _as_dict(result)
        delta = np.asarray(d["delta"], dtype=np.float64)
        if delta.shape != (n,):
            raise ValueError(f"series {name!r} has {delta.shape} values for {n} labels")
        meta = dict(d.get("meta", {}))
        series[name] = {
            "panel": _family(str(meta.get("reward", name))),
            "title": _series_title(name, meta),
            "delta": delta,
            "reward_before": d.get("reward_before"),
            "meta": meta,
        }
    return series


def _draw_panel(ax: Any, s: Mapping[str, Any], y: np.ndarray, labels: Sequence[str], expected: Sequence[int]) -> None:
    """One panel: Δr as horizontal bars (scaled by a power of ten when tiny or huge), hatched against `expected`."""
    from matplotlib.ticker import MaxNLocator

    n = len(labels)
    lim = float(np.max(np.abs(s["delta"]))) or 1.0
    exponent = int(np.floor(np.log10(lim)))
    scale = 10.0**exponent if abs(exponent) >= 3 else 1.0
    bars = ax.barh(y, s["delta"] / scale, height=0.75, color=_COLORS[s["panel"]])
    for bar, v, e in zip(bars, s["delta"], expected, strict=True):
        if e != 0 and np.sign(v) != e:
            bar.set_hatch("////")
            bar.set_edgecolor("black")
            bar.set_linewidth(0.4)
    for i in _group_boundaries(labels):
        ax.axhline(n - i + 0.5 - 1.0, color=REF_COLOR, lw=0.5, alpha=0.6)
    ax.axvline(0.0, color=REF_COLOR, lw=0.8)
    ax.set_xlim(-1.08 * lim / scale, 1.08 * lim / scale)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=5, symmetric=True))
    ax.grid(axis="y", visible=False)
    unit = "β·nats" if s["panel"] == "IM" else "reward units"
    factor = f"$\\times 10^{{{exponent}}}$ " if scale != 1.0 else ""
    ax.set_xlabel(f"Δr ({factor}{unit})")
    ax.set_title(s["title"], fontsize=8.5)


def delta_bars_figure(
    results: Mapping[str, Any],
    labels: Sequence[str],
    png_path: str | os.PathLike[str],
    *,
    expected: Sequence[int] | None = None,
    title: str | None = None,
) -> tuple[Path, Path]:
    """Draws Δr per unseen pair as horizontal bars, EX-RM and IM-RM side by side, and writes PNG + JSON.

    Args:
      results: series name → `DeltaResult` (or its dict) over the same unseen pairs, in order; one panel each,
        coloured by its reward type (`meta["reward"]`), EX-RM panels first.
      labels: one label per unseen pair (the y axis, top to bottom).
      png_path: where to write the PNG; the JSON (every plotted number) goes next to it.
      expected: per pair +1 (a good reward model should raise its reward: a paraphrase of y+), −1 (lower it),
        or 0 (no expectation). Marked labels are coloured; a bar against the expectation is hatched.
      title: the figure's title.

    Returns:
      (png path, json path).

    Raises:
      ValueError: no series, or a series whose number of pairs differs from `labels`.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    if not results:
        raise ValueError("delta_bars_figure needs at least one series")
    n = len(labels)
    expected = [0] * n if expected is None else [int(np.sign(e)) for e in expected]
    if len(expected) != n:
        raise ValueError(f"{len(expected)} expected signs for {n} labels")
    series = _series(results, n)
    order = sorted(series, key=lambda k: series[k]["panel"] != "EX")  # stable: EX-RM first

    with house_style():
        height = max(2.6, 0.26 * n + 1.9)
        fig = Figure(figsize=(3.3 * len(order) + 2.8, height), layout="constrained")
        FigureCanvasAgg(fig)
        axes = [fig.add_subplot(1, len(order), 1)]
        axes += [fig.add_subplot(1, len(order), i + 1, sharey=axes[0]) for i in range(1, len(order))]
        y = np.arange(n)[::-1].astype(np.float64)
        for ax, name in zip(axes, order, strict=True):
            _draw_panel(ax, series[name], y, labels, expected)
        axes[0].set_yticks(y, labels)
        axes[0].set_ylim(-0.6, n - 0.4)
        for ax in axes[1:]:
            ax.tick_params(axis="y", labelleft=False)
        for tick, e in zip(axes[0].get_yticklabels(), expected, strict=True):
            if e:
                tick.set_color(RISE_COLOR if e > 0 else FALL_COLOR)
        if any(e for e in expected):
            handles = [
                Patch(facecolor="white", edgecolor=RISE_COLOR, label="green label: should rise (says yes, like y+)"),
                Patch(facecolor="white", edgecolor=FALL_COLOR, label="purple label: should fall (says no, like y−)"),
                Patch(facecolor="white", edgecolor="black", hatch="////", label="hatched bar: Δr against that"),
            ]
            fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=7, frameon=False)
        if title:
            fig.suptitle(title, fontsize=10)
        data = {
            "labels": list(labels),
            "expected_sign": expected,
            "series": {
                k: {"panel": s["panel"], "delta": s["delta"], "reward_before": s["reward_before"], "meta": s["meta"]}
                for k, s in series.items()
            },
            "figure": {
                "panels": order,
                "x": "predicted Δr (first order) after one step on the training triple(s)",
                "hatched": "bar whose sign is against expected_sign",
            },
        }
        return save_figure(fig, png_path, data)

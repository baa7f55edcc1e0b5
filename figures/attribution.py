"""Figures of `rmdyn attribute` (docs/math.md §10): C as heat-maps, C against token overlap and hidden similarity,
the IM-RM's token pairs, predicted vs actual changes along a run, the linearised trajectory.

Data in (the `to_dict()` of `dynamics.attribution.analysis.Attribution` per reward type, keyed by its label), PNG +
JSON of the plotted numbers out. EX-RM panels on the left, IM-RM on the right; each panel on its own colour or
axis scale, since the two reward types live on different scales (reward units vs β × nats).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from figures._style import EX_COLOR, IM_COLOR, house_style, new_figure, save_figure

__all__ = [
    "contribution_heatmaps",
    "overlap_scatter",
    "predicted_vs_actual",
    "top_indices",
    "token_pair_bars",
    "trajectory_curves",
]


def _color(label: str) -> str:
    return IM_COLOR if label.upper().startswith("IM") else EX_COLOR


def top_indices(C: np.ndarray, rows: int, cols: int) -> tuple[list[int], list[int]]:
    """The `rows` eval items with the largest max_j |C_ij| and the `cols` training pairs with the largest
    Σ_i |C_ij|, each in index order."""
    r = np.argsort(-np.abs(C).max(axis=1), kind="stable")[:rows]
    c = np.argsort(-np.abs(C).sum(axis=0), kind="stable")[:cols]
    return sorted(int(i) for i in r), sorted(int(j) for j in c)


def contribution_heatmaps(
    results: Mapping[str, Mapping[str, Any]], png: str | os.PathLike[str], *, rows: int = 16, cols: int = 24
) -> tuple[Path, Path]:
    """C_ij over its largest rows and columns, one panel per reward type (diverging colours, symmetric scale)."""
    data = {}
    with house_style():
        fig, axes = new_figure(len(results), panel_size=(5.2, 4.2))
        for ax, (label, res) in zip(axes, results.items(), strict=True):
            C = np.asarray(res["contributions"]["contribution"], np.float64)
            r, c = top_indices(C, rows, cols)
            sub = C[np.ix_(r, c)]
            lim = float(np.abs(sub).max()) or 1.0
            im = ax.imshow(sub, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
            ax.set_xticks(range(len(c)), [str(j) for j in c], fontsize=6, rotation=90)
            ax.set_yticks(range(len(r)), [str(i) for i in r], fontsize=6)
            ax.set_xlabel("training pair j")
            ax.set_ylabel("eval item i")
            ax.set_title(f"{label}: C_ij (red: pair j raises item i)")
            ax.grid(False)
            fig.colorbar(im, ax=ax, shrink=0.8)
            data[label] = {"rows": r, "cols": c, "C": sub}
        return save_figure(fig, png, data)


def overlap_scatter(results: Mapping[str, Mapping[str, Any]], png: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Rank of C_ij against rank of the token overlap O_ij and of the hidden similarity H_ij, per reward type."""
    from scipy.stats import rankdata

    data = {}
    with house_style():
        fig, axes = new_figure(2 * len(results), panel_size=(3.4, 3.2))
        for n, (label, res) in enumerate(results.items()):
            C = np.ravel(res["contributions"]["contribution"])
            stats = res["statistics"]
            for ax, key, name in ((axes[2 * n], "overlap", "token overlap O"), (axes[2 * n + 1], "hidden", "hidden H")):
                score = np.ravel(res["scores"][key])
                ax.scatter(rankdata(score), rankdata(C), s=4, alpha=0.4, color=_color(label), lw=0)
                rho = stats[f"spearman_{key}"]
                ax.set_title(f"{label}: Spearman {rho:.3f}")
                ax.set_xlabel(f"rank of {name}")
                ax.set_ylabel("rank of C")
            data[label] = {k: stats[k] for k in ("spearman_overlap", "spearman_hidden", "spearman_indicator")}
        return save_figure(fig, png, data)


def token_pair_bars(
    views: Mapping[str, Mapping[str, Any]],
    token_text: Any,
    png: str | os.PathLike[str],
    *,
    title: str = "IM-RM token pairs",
    entries: Mapping[str, float] | None = None,
) -> tuple[Path, Path]:
    """One panel per entry "i,j": its largest token-pair terms (identical tokens hatched) and the indicator share.

    `token_text(id) -> str` renders a token; `entries` ("i,j" → C_ij) adds the whole contribution to each title,
    beside its unembedding part C^W_ij that the terms sum to.
    """
    data = {}
    with house_style():
        fig, axes = new_figure(max(1, len(views)), panel_size=(4.8, 3.4))
        for ax, (key, view) in zip(axes, views.items(), strict=False):
            top = view["top"]
            labels = [f"ȳ{_sign(t['a'])}[{t['k']}] {token_text(t['eval_token'])!r} · "
                      f"y{_sign(t['b'])}[{t['l']}] {token_text(t['train_token'])!r}" for t in top]  # fmt: skip
            values = [t["value"] for t in top]
            y = np.arange(len(top))[::-1]
            bars = ax.barh(y, values, color=IM_COLOR)
            for bar, t in zip(bars, top, strict=True):
                if t["identical"]:
                    bar.set_hatch("///")
            ax.set_yticks(y, labels, fontsize=6)
            ax.axvline(0, color="0.3", lw=0.8)
            share = view["indicator_share"]
            whole = "" if entries is None or key not in entries else f"C[{key}] = {entries[key]:.3g}\n"
            ax.set_title(f"{whole}through W: {view['total']:.3g}, identical tokens: {share:.2f} of it", fontsize=8)
            data[key] = {"labels": labels, "values": values, "indicator_share": share}
        fig.suptitle(title)
        return save_figure(fig, png, data)


def _sign(name: str) -> str:
    return {"chosen": "+", "rejected": "−"}.get(name, "")


def predicted_vs_actual(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]], png: str | os.PathLike[str]
) -> tuple[Path, Path]:
    """Per reward type, the predicted total change of each eval item against its actual change, with Pearson r."""
    data = {}
    with house_style():
        fig, axes = new_figure(len(series), panel_size=(3.6, 3.4))
        for ax, (label, (pred, actual)) in zip(axes, series.items(), strict=True):
            p, a = np.asarray(pred, np.float64), np.asarray(actual, np.float64)
            r = float(np.corrcoef(p, a)[0, 1]) if p.size > 1 and p.std() > 0 and a.std() > 0 else float("nan")
            ax.scatter(a, p, s=10, color=_color(label))
            lim = [min(a.min(), p.min()), max(a.max(), p.max())]
            ax.plot(lim, lim, color="0.4", lw=0.8, ls="--")
            ax.set_xlabel("actual change")
            ax.set_ylabel("predicted change (sum over checkpoints)")
            ax.set_title(f"{label}: Pearson {r:.3f}")
            data[label] = {"predicted": p, "actual": a, "pearson": r}
        return save_figure(fig, png, data)


def trajectory_curves(
    series: Mapping[str, Mapping[str, Any]], png: str | os.PathLike[str], *, items: int = 6
) -> tuple[Path, Path]:
    """Linearised (dashed) vs real (solid) eval quantities along training, the first `items` items per panel.

    `series[label]` holds "steps" [S], "predicted" [S, M], "actual_steps" [R] and "actual" [R, M]; "parting_step"
    (or None) is marked.
    """
    data = {}
    with house_style():
        fig, axes = new_figure(len(series), panel_size=(4.2, 3.4))
        for ax, (label, s) in zip(axes, series.items(), strict=True):
            pred, act = np.asarray(s["predicted"], np.float64), np.asarray(s["actual"], np.float64)
            for i in range(min(items, pred.shape[1])):
                line = ax.plot(s["steps"], pred[:, i], ls="--", lw=1.2)[0]
                ax.plot(s["actual_steps"], act[:, i], ls="-", lw=1.2, marker="o", ms=2, color=line.get_color())
            if s.get("parting_step") is not None:
                ax.axvline(s["parting_step"], color="0.3", lw=0.8, ls=":")
            ax.set_xlabel("step")
            ax.set_ylabel("eval quantity q_i")
            ax.set_title(f"{label}: linearised (dashed) vs real")
            data[label] = dict(s)
        return save_figure(fig, png, data)

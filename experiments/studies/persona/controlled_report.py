"""The controlled Persona study's report (docs/math.md §6.2.2): per-cell accuracies over seeds and prompts with
bootstrap intervals, EX-RM beside IM-RM, and their paired difference.

The runs of a plan are grouped by every grid axis but the reward type and the seeds (e.g. by trait and training
regime). Within a group, a cell's per-prompt accuracies of the S seeds form an [S, P] grid per reward type
(controlled.json of each run); `dynamics.intervals.bootstrap_interval` gives its mean and 95 % interval, and
`paired_difference` that of EX − IM, paired by seed and prompt (the same seed trains on the same data order). Two
pooled cells lead the table: "new words" (every new word list, every opening) and "seen words" (the training
words, every opening), each per split, and the paper's own paraphrase cell ("paper/{split}/paraphrased").

`controlled_report` writes controlled_report.json (every interval), controlled_report.md (the table) and
controlled_forest.png (+ .json), the forest plot, under the plan's output directory.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dynamics.errors import ConfigError

__all__ = ["HEADLINE", "collect_cells", "controlled_report", "format_markdown", "interval_table", "pooled_cells"]

#: The pooled cells that lead the table, per split.
HEADLINE = ("new words", "seen words", "opening effect", "paraphrased")

_VARYING = ("reward", "seed", "head_seed")


def pooled_cells(cells: Mapping[str, np.ndarray], splits: Sequence[str] = ("train", "test")) -> dict[str, np.ndarray]:
    """`cells` (per-prompt accuracies, `pair_accuracies` names) with the pooled per-prompt cells added:
    "{split}/new words" = the mean over every new word list and both opening kinds, "{split}/seen words" the same
    for the training words, "{split}/opening effect" the mean of the opening cells over every word list."""
    out = dict(cells)
    for split in splits:
        new = [v for k, v in cells.items() if k.startswith(f"same/{split}/") and not k.endswith("/seen")]
        seen = [v for k, v in cells.items() if k.startswith(f"same/{split}/") and k.endswith("/seen")]
        opening = [v for k, v in cells.items() if k.startswith(f"opening/{split}/")]
        for name, parts in (("new words", new), ("seen words", seen), ("opening effect", opening)):
            if parts:
                out[f"{split}/{name}"] = np.mean(parts, axis=0)
    return out


def _group_name(values: Mapping[str, Any], axes: Sequence[str]) -> str:
    parts = [f"{a}={values[a]}" for a in axes if a not in _VARYING]
    return ", ".join(parts) or "all runs"


def collect_cells(plan: Any, out_dir: str | Path) -> dict[str, dict[str, dict[int, dict[str, np.ndarray]]]]:
    """{group: {reward label: {seed: {cell: per-prompt accuracies}}}} of the plan's runs under `out_dir`.

    Raises:
      ConfigError: a run without controlled.json (not run with design = "controlled", or not finished).
    """
    from dynamics.reward_types import reward_label

    out: dict[str, dict[str, dict[int, dict[str, np.ndarray]]]] = {}
    axes = list(plan.grid)
    for spec in plan.runs():
        path = Path(out_dir) / spec.name / "controlled.json"
        if not path.is_file():
            raise ConfigError(f"{path}: no such file; the run {spec.name} did not finish with design = controlled")
        cells = {k: np.asarray(v, np.float64) for k, v in json.loads(path.read_text(encoding="utf-8"))["cells"].items()}
        group = out.setdefault(_group_name(spec.values, axes), {})
        group.setdefault(reward_label(spec.values["reward"]), {})[int(spec.values["seed"])] = pooled_cells(cells)
    return out


def _row(runs: Mapping[int, Mapping[str, np.ndarray]], cell: str, seeds: Sequence[int]) -> np.ndarray:
    return np.stack([runs[s][cell] for s in seeds])


def interval_table(groups: Mapping[str, Any], *, n_boot: int = 10_000, level: float = 0.95, seed: int = 0) -> dict:
    """Every cell's interval per group and reward type, and EX − IM where both ran on the same seeds.

    Returns:
      {"level", "n_boot", "groups": {group: {"seeds": {label: [...]}, "headline": [the pooled cells],
      "cells": {cell: {label: Interval dict, "EX-RM − IM-RM": Interval dict}}}}}; headline cells first, then the
      cells of `pair_accuracies`.
    """
    from dynamics.intervals import bootstrap_interval, paired_difference

    out: dict[str, Any] = {"level": level, "n_boot": n_boot, "groups": {}}
    for group, by_reward in groups.items():
        seeds = {label: sorted(runs) for label, runs in by_reward.items()}
        first = next(iter(by_reward.values()))
        cells = list(next(iter(first.values())))
        headline = [c for c in cells if c.split("/")[-1] in HEADLINE and not c.startswith("same/")]
        order = headline + [c for c in cells if c not in headline]
        table: dict[str, Any] = {}
        for cell in order:
            options = {"n_boot": n_boot, "level": level, "seed": seed}
            row = {label: bootstrap_interval(_row(runs, cell, seeds[label]), **options).to_dict()
                   for label, runs in by_reward.items()}  # fmt: skip
            if {"EX-RM", "IM-RM"} <= set(by_reward) and seeds["EX-RM"] == seeds["IM-RM"]:
                ex, im = _row(by_reward["EX-RM"], cell, seeds["EX-RM"]), _row(by_reward["IM-RM"], cell, seeds["IM-RM"])
                row["EX-RM − IM-RM"] = paired_difference(ex, im, **options).to_dict()
            table[cell] = row
        out["groups"][group] = {"seeds": seeds, "headline": headline, "cells": table}
    return out


def _fmt(iv: Mapping[str, Any] | None) -> str:
    return "–" if iv is None else f"{iv['mean']:.3f} [{iv['low']:.3f}, {iv['high']:.3f}]"


def format_markdown(table: Mapping[str, Any]) -> str:
    """The interval table as Markdown: one table per group, a row per cell."""
    lines = []
    for group, g in table["groups"].items():
        labels = list(g["seeds"])
        cols = labels + (["EX-RM − IM-RM"] if any("EX-RM − IM-RM" in r for r in g["cells"].values()) else [])
        seeds = "; ".join(f"{k}: seeds {v}" for k, v in g["seeds"].items())
        lines += [f"### {group}", "", f"Mean accuracy [{table['level']:.0%} bootstrap interval over seeds and prompts]"
                  f" ({seeds}; {table['n_boot']} replicates)", ""]  # fmt: skip
        lines += ["| cell | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
        for cell, row in g["cells"].items():
            lines.append(f"| {cell} | " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
        lines.append("")
    return "\n".join(lines)


def controlled_report(plan: Any, out_dir: str | Path, *, n_boot: int = 10_000) -> list[Path]:
    """Writes the report files of a controlled plan's runs under `out_dir` (module docstring); returns their paths.

    Raises:
      ConfigError: as `collect_cells`.
    """
    from dynamics.outputs import atomic_write_text, jsonable, write_json_atomic
    from figures.forest import forest_figure

    out = Path(out_dir)
    table = interval_table(collect_cells(plan, out), n_boot=n_boot)
    js = write_json_atomic(out / "controlled_report.json", jsonable(table))
    md = atomic_write_text(out / "controlled_report.md", format_markdown(table))
    png, fig_js = forest_figure(table, out / "controlled_forest.png")
    return [js, md, png, fig_js]

"""The UltraFeedback / RewardMATH report (docs/math.md §6.3): EX-RM vs IM-RM per set, per category, aggregated.

Win / tie / loss (docs/math.md §6.3 leaves the paper's rule open). Per evaluation set the EX-RM wins when its
accuracy exceeds the IM-RM's by more than the tie band, the IM-RM wins in the opposite case, else a tie. The
band (`TieRule`) is either k binomial standard errors of the difference of the two accuracies,
k·√(p_EX(1−p_EX)/n + p_IM(1−p_IM)/n) ("stderr", default k = 1: it scales with the evaluation set's size, which
matters at the CPU preset's few dozen pairs), or a fixed accuracy difference ("fixed", e.g. 0.01). The rule and
every band are written to the output.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dynamics.errors import ConfigError, DataError
from dynamics.reward_types import reward_label, reward_type

__all__ = [
    "CATEGORIES",
    "PAPER_AGGREGATE",
    "SET_LABELS",
    "SetComparison",
    "TieRule",
    "aggregate_table",
    "compare_sets",
    "format_table",
    "parse_categories",
    "plan_table",
    "set_metrics",
    "summarize_categories",
    "ultrafeedback_report",
]

SET_LABELS = {
    "train": "train",
    "ultrafeedback": "UF",
    "paraphrase": "UF paraphrased",
    "french": "UF French",
    "spanish": "UF Spanish",
    "rewardbench_math": "RB math",
    "rewardbench_code": "RB code",
    "rewardmath": "RewardMATH",
}
#: The paper's three panels (Figure 2), in order.
CATEGORIES = ("in-distribution", "token-level shift", "domain shift")
#: docs/math.md §6.3's aggregate table (six models, UltraFeedback training; from a third-party summary).
PAPER_AGGREGATE = {
    "in-distribution": {"EX-RM": (0.752, 1.014), "IM-RM": (0.646, 0.813)},
    "token-level shift": {"EX-RM": (0.665, 0.976), "IM-RM": (0.602, 0.763)},
    "domain shift": {"EX-RM": (0.621, 0.807), "IM-RM": (0.720, 0.726)},
}
#: Slack of the tie comparison: accuracies are fractions k/n, and 0.51 − 0.5 is 0.010000000000000009 in floats.
_ROUNDING = 1e-12


@dataclasses.dataclass(frozen=True)
class TieRule:
    """When two accuracies on one evaluation set count as a tie.

    Attributes:
      kind: "stderr": |acc_EX − acc_IM| ≤ k·SE with SE = √(p_EX(1−p_EX)/n_EX + p_IM(1−p_IM)/n_IM), the standard
        error of the difference of two binomial proportions; "fixed": |acc_EX − acc_IM| ≤ threshold.
      k: the number of standard errors ("stderr").
      threshold: the accuracy difference ("fixed").
    """

    kind: str = "stderr"
    k: float = 1.0
    threshold: float = 0.01

    def __post_init__(self):
        if self.kind not in ("stderr", "fixed"):
            raise ConfigError(f"tie_rule must be 'stderr' or 'fixed', got {self.kind!r}")
        if not (self.k >= 0 and self.threshold >= 0):
            raise ConfigError(f"tie_k and tie_threshold must be >= 0, got {self.k} and {self.threshold}")

    def band(self, acc_ex: float, acc_im: float, n_ex: int, n_im: int) -> float:
        """Half-width of the tie band around 0 for acc_EX − acc_IM (accuracy units)."""
        if self.kind == "fixed":
            return self.threshold
        if n_ex < 1 or n_im < 1:
            raise DataError(f"the stderr tie rule needs set sizes >= 1, got {n_ex} and {n_im}")
        se = math.sqrt(acc_ex * (1 - acc_ex) / n_ex + acc_im * (1 - acc_im) / n_im)
        return self.k * se

    def decide(self, acc_ex: float, acc_im: float, n_ex: int, n_im: int) -> str:
        """ "ex" (EX-RM wins), "im" (IM-RM wins) or "tie"."""
        diff = acc_ex - acc_im
        band = self.band(acc_ex, acc_im, n_ex, n_im)
        if abs(diff) <= band + _ROUNDING:
            return "tie"
        return "ex" if diff > 0 else "im"

    def describe(self) -> str:
        if self.kind == "fixed":
            return f"tie when |acc_EX − acc_IM| ≤ {self.threshold:g}"
        return f"tie when |acc_EX − acc_IM| ≤ {self.k:g} × SE, SE = √(p_EX(1−p_EX)/n + p_IM(1−p_IM)/n)"

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "description": self.describe()}

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> TieRule:
        return cls(values["tie_rule"], float(values["tie_k"]), float(values["tie_threshold"]))


@dataclasses.dataclass(frozen=True)
class SetComparison:
    """EX-RM against IM-RM on one evaluation set.

    Attributes:
      set: the evaluation set.
      category: its panel ("in-distribution", "token-level shift", "domain shift").
      explicit: the explicit reward's label (e.g. "EX-RM").
      implicit: the implicit reward's label (e.g. "IM-RM").
      group: what else identifies the pair of runs (e.g. the model), "" if nothing.
      acc_ex: the explicit RM's accuracy (ties ½).
      acc_im: the implicit RM's accuracy.
      margin_ex: the explicit RM's normalized margin.
      margin_im: the implicit RM's normalized margin.
      n: pairs in the set.
      band: the tie band's half-width.
      winner: "ex", "tie" or "im".
    """

    set: str
    category: str
    explicit: str
    implicit: str
    group: str
    acc_ex: float
    acc_im: float
    margin_ex: float
    margin_im: float
    n: int
    band: float
    winner: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_categories(items: Sequence[str]) -> dict[str, str]:
    """{"set": "category"} from "set=category" strings.

    Raises:
      ConfigError: an item without "=", an empty side, or a set named twice.
    """
    out: dict[str, str] = {}
    for item in items:
        name, sep, category = item.partition("=")
        if not sep or not name.strip() or not category.strip():
            raise ConfigError(f"categories: expected 'set=category', got {item!r}")
        if name.strip() in out:
            raise ConfigError(f"categories: set {name.strip()!r} is given twice")
        out[name.strip()] = category.strip()
    return out


def set_metrics(final_eval: Mapping[str, float], name: str) -> dict[str, float]:
    """Accuracy, normalized margin and size of one evaluation set in a run's final evaluation.

    Raises:
      DataError: the set is not in the evaluation.
    """
    key = f"{name}/rewards/accuracies"
    if key not in final_eval:
        raise DataError(f"the final evaluation has no set {name!r} (metric {key!r})")
    return {
        "accuracy": float(final_eval[key]),
        "normalized_margin": float(final_eval[f"{name}/rewards/normalized_margin"]),
        "n": int(final_eval.get(f"{name}/rows", 0)),
    }


def compare_sets(
    explicit: Mapping[str, Mapping[str, float]],
    implicit: Mapping[str, Mapping[str, float]],
    categories: Mapping[str, str],
    rule: TieRule,
    *,
    labels: tuple[str, str] = ("EX-RM", "IM-RM"),
    group: str = "",
) -> list[SetComparison]:
    """Win / tie / loss of an explicit against an implicit RM on every categorized set both were evaluated on.

    Args:
      explicit: set → {"accuracy", "normalized_margin", "n"} of the explicit RM (`set_metrics`).
      implicit: the same for the implicit RM.
      categories: set → category; sets not named here (e.g. "train") are left out.
      rule: the tie rule.
      labels: (explicit label, implicit label).
      group: recorded in each comparison (e.g. the model).

    Returns:
      One `SetComparison` per set, in the order of `categories`.
    """
    out = []
    for name, category in categories.items():
        if name not in explicit or name not in implicit:
            continue
        e, i = explicit[name], implicit[name]
        band = rule.band(e["accuracy"], i["accuracy"], e["n"], i["n"])
        winner = rule.decide(e["accuracy"], i["accuracy"], e["n"], i["n"])
        out.append(
            SetComparison(
                name,
                category,
                labels[0],
                labels[1],
                group,
                e["accuracy"],
                i["accuracy"],
                e["normalized_margin"],
                i["normalized_margin"],
                min(e["n"], i["n"]),
                band,
                winner,
            )
        )
    return out


def summarize_categories(comparisons: Sequence[SetComparison]) -> dict[str, dict[str, Any]]:
    """Per (explicit, implicit) pair of labels and category: EX-win / tie / IM-win counts and mean accuracies.

    Returns:
      {"EX-RM vs IM-RM": {category: {"ex_wins", "ties", "im_wins", "n_sets", "mean_acc_ex", "mean_acc_im",
      "mean_margin_ex", "mean_margin_im"}}}, categories in the paper's order first.
    """
    out: dict[str, dict[str, Any]] = {}
    pairs = dict.fromkeys((c.explicit, c.implicit) for c in comparisons)
    for ex_label, im_label in pairs:
        mine = [c for c in comparisons if (c.explicit, c.implicit) == (ex_label, im_label)]
        found = dict.fromkeys(c.category for c in mine)
        ordered = [c for c in CATEGORIES if c in found] + [c for c in found if c not in CATEGORIES]
        block = {}
        for category in ordered:
            cs = [c for c in mine if c.category == category]
            block[category] = {
                "ex_wins": sum(c.winner == "ex" for c in cs),
                "ties": sum(c.winner == "tie" for c in cs),
                "im_wins": sum(c.winner == "im" for c in cs),
                "n_sets": len(cs),
                "mean_acc_ex": float(np.mean([c.acc_ex for c in cs])),
                "mean_acc_im": float(np.mean([c.acc_im for c in cs])),
                "mean_margin_ex": float(np.mean([c.margin_ex for c in cs])),
                "mean_margin_im": float(np.mean([c.margin_im for c in cs])),
            }
        out[f"{ex_label} vs {im_label}"] = block
    return out


def aggregate_table(
    runs: Sequence[Mapping[str, Any]], categories: Mapping[str, str], *, paper: bool = True
) -> dict[str, Any]:
    """Mean accuracy and normalized margin per category and reward type (docs/math.md §6.3's aggregate table).

    Means are over the category's sets and over the runs of one reward type (e.g. the models).

    Args:
      runs: dicts {"label": reward label, "metrics": set → `set_metrics`}.
      categories: set → category.
      paper: add the paper's numbers beside (for "EX-RM" and "IM-RM").

    Returns:
      {"columns": [...], "rows": [{"category", "<label> acc", "<label> margin", "paper ...": ...}]}.
    """
    labels = list(dict.fromkeys(r["label"] for r in runs))
    found = dict.fromkeys(categories.values())
    ordered = [c for c in CATEGORIES if c in found] + [c for c in found if c not in CATEGORIES]
    columns = [f"{label} {what}" for label in labels for what in ("acc", "margin")]
    if paper:
        columns += [f"paper {label} {what}" for label in ("EX-RM", "IM-RM") for what in ("acc", "margin")]
    rows = []
    for category in ordered:
        names = [s for s, c in categories.items() if c == category]
        row: dict[str, Any] = {"category": category}
        for label in labels:
            values = [r["metrics"][s] for r in runs if r["label"] == label for s in names if s in r["metrics"]]
            row[f"{label} acc"] = float(np.mean([v["accuracy"] for v in values])) if values else None
            row[f"{label} margin"] = float(np.mean([v["normalized_margin"] for v in values])) if values else None
        if paper:
            for label in ("EX-RM", "IM-RM"):
                acc, margin = PAPER_AGGREGATE.get(category, {}).get(label, (None, None))
                row[f"paper {label} acc"], row[f"paper {label} margin"] = acc, margin
        rows.append(row)
    return {"columns": columns, "rows": rows}


def ultrafeedback_report(
    runs: Sequence[Mapping[str, Any]], categories: Mapping[str, str], rule: TieRule
) -> dict[str, Any]:
    """Per-set metrics, EX vs IM comparisons, the per-category summary and the aggregate table.

    Args:
      runs: dicts {"name", "reward" (kind), "group" (what identifies a pair of runs besides the reward, e.g.
        the model), "final_eval"}.
      categories: set → category.
      rule: the tie rule.

    Returns:
      {"per_set": {run: {set: metrics}}, "comparisons": [...], "summary": ..., "aggregate": ...,
      "tie_rule": ..., "categories": ...}.
    """
    sets = ["train", *categories]
    per_set, records = {}, []
    for r in runs:
        metrics = {s: set_metrics(r["final_eval"], s) for s in sets if f"{s}/rewards/accuracies" in r["final_eval"]}
        per_set[r["name"]] = metrics
        records.append({**r, "label": reward_label(r["reward"]), "metrics": metrics})
    comparisons: list[SetComparison] = []
    groups = dict.fromkeys(r["group"] for r in records)
    for group in groups:
        mine = [r for r in records if r["group"] == group]
        for e, i in itertools.product(mine, mine):
            if reward_type(e["reward"]).explicit and reward_type(i["reward"]).implicit:
                comparisons += compare_sets(
                    e["metrics"], i["metrics"], categories, rule, labels=(e["label"], i["label"]), group=group
                )
    return {
        "per_set": per_set,
        "comparisons": [c.to_dict() for c in comparisons],
        "summary": summarize_categories(comparisons),
        "aggregate": aggregate_table(records, categories),
        "tie_rule": rule.to_dict(),
        "categories": dict(categories),
    }


def _group(spec_values: Mapping[str, Any], plan: Any) -> str:
    axes = [a for a, v in plan.grid.items() if len(v) > 1 and a != "reward"]
    return ",".join(f"{a}={spec_values[a]}" for a in axes)


def plan_table(plan: Any, finals: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """The plan's report: per-set metrics, EX vs IM win / tie / loss per category, the aggregate table."""
    runs = [
        {"name": s.name, "reward": s.values["reward"], "group": _group(s.values, plan), "final_eval": finals[s.name]}
        for s in plan.runs()
        if s.name in finals
    ]
    categories = parse_categories(plan.values["categories"])
    sets = {s for r in runs for s in categories if f"{s}/rewards/accuracies" in r["final_eval"]}
    return ultrafeedback_report(
        runs, {s: c for s, c in categories.items() if s in sets}, TieRule.from_values(plan.values)
    )


def _cell(value: Any, width: int = 9) -> str:
    return f"{value:>{width}.3f}" if isinstance(value, (int, float)) else f"{'-':>{width}}"


def format_table(report: Mapping[str, Any]) -> str:
    """Per-set accuracy / normalized margin of every run, the win / tie / loss summary and the aggregate table."""
    lines = []
    runs = list(report["per_set"])
    sets = list(dict.fromkeys(s for r in runs for s in report["per_set"][r]))
    lines.append("accuracy (normalized margin)")
    lines.append(f"{'set':<16}" + "".join(f"{r[:22]:>24}" for r in runs))
    for s in sets:
        cells = []
        for r in runs:
            m = report["per_set"][r].get(s)
            cells.append(f"{m['accuracy']:>13.3f} ({m['normalized_margin']:6.3f})" if m else f"{'-':>24}")
        lines.append(f"{SET_LABELS.get(s, s):<16}" + "".join(cells))
    lines.append(f"\nwin / tie / loss: {report['tie_rule']['description']}")
    for pair, block in report["summary"].items():
        for category, b in block.items():
            lines.append(
                f"  {pair:<28} {category:<18} EX wins {b['ex_wins']}, ties {b['ties']}, IM wins {b['im_wins']}"
            )
    agg = report["aggregate"]
    lines.append("\naggregate (mean over sets and runs)")
    lines.append(f"{'category':<20}" + "".join(f"{c[:22]:>24}" for c in agg["columns"]))
    for row in agg["rows"]:
        lines.append(f"{row['category']:<20}" + "".join(_cell(row[c], 24) for c in agg["columns"]))
    return "\n".join(lines)

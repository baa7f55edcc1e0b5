"""Real-world token-level and domain shifts: UltraFeedback- or RewardMATH-trained RMs (docs/math.md §6.3, Section 5.2).

Training data (`train_data`):

- "ultrafeedback_original": the bundled English UltraFeedback pairs. The 2,000-row training split of the paper
  is not bundled (experiments/data/preferences/README.md); its 200 rows that were rewritten are, in English, as
  `prompt` / `original_chosen` / `original_rejected` of `ultrafeedback_paraphrased.train.jsonl`. So this trains
  on 200 pairs, not 2,000. A regenerated full split can be given as a path instead.
- "rewardmath": `rewardmath.train.jsonl` (2,000 pairs; the paper's RewardMATH setting uses 1,000 of them).
- a path to a JSONL file with "prompt", "chosen", "rejected".

Evaluation sets (`eval_sets`, 200 pairs each): UltraFeedback test (in-distribution); its paraphrased, French and
Spanish rewrites (token-level shift); RewardBench math and code, RewardMATH test (domain shift). With RewardMATH
training, UltraFeedback test replaces RewardMATH test. `categories` maps each set to its panel, and "train" is
always added: `n_train_eval` training pairs.

Selections follow the official code with `dynamics.datasets.TorchCompatibleGenerator` (exact torch streams):
the training subset is `randperm(n)[:n_train]` of a generator seeded `data_seed`, the training evaluation
subset the sorted first `n_train_eval` of `randperm` of a fresh generator with the same seed (then continued for
the evaluation sets that have more rows than `n_eval`, one randperm per set in `eval_sets` order).

Long sequences. `max_response_tokens` > 0 skips every pair with a response longer than that (content tokens,
before the chat template) *before* any selection, and the skipped rows are reported (printed and recorded in
config.json); `truncate` cuts prompts from the left to fit `max_length`. The paper preset does neither: its
data was already filtered to ≤ 512 Llama-3.2-1B tokens per field.

Win / tie / loss (docs/math.md §6.3 leaves the paper's rule open). Per evaluation set the EX-RM wins when its
accuracy exceeds the IM-RM's by more than the tie band, the IM-RM wins in the opposite case, else a tie. The
band (`TieRule`) is either k binomial standard errors of the difference of the two accuracies,
k·√(p_EX(1−p_EX)/n + p_IM(1−p_IM)/n) ("stderr", default k = 1: it scales with the evaluation set's size, which
matters at the CPU preset's few dozen pairs), or a fixed accuracy difference ("fixed", e.g. 0.01). The rule and
every band are written to the output.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dynamics.errors import ConfigError, DataError
from dynamics.reward_types import reward_label, reward_type
from experiments.config import MODEL_KEYS, run_mesh, train_config, validate_training_keys

__all__ = [
    "CATEGORIES",
    "EVAL_SET_FILES",
    "PAPER_AGGREGATE",
    "SET_LABELS",
    "TRAIN_SETS",
    "UF_KEYS",
    "SetComparison",
    "TieRule",
    "UltraFeedbackData",
    "aggregate_table",
    "compare_sets",
    "format_table",
    "parse_categories",
    "run",
    "set_metrics",
    "summarize_categories",
    "table",
    "ultrafeedback_data",
    "ultrafeedback_report",
    "validate",
]

#: Plan keys of the data, the categories and the tie rule (experiments/configs/ultrafeedback.toml).
UF_KEYS = (
    "train_data",
    "n_train",
    "data_seed",
    "n_train_eval",
    "eval_sets",
    "n_eval",
    "categories",
    "max_response_tokens",
    "tie_rule",
    "tie_k",
    "tie_threshold",
)

#: Bundled evaluation sets (experiments/data/preferences), by the names the official plans use.
EVAL_SET_FILES = {
    "ultrafeedback": "preferences/ultrafeedback.test.jsonl",
    "paraphrase": "preferences/ultrafeedback_paraphrased.test.jsonl",
    "french": "preferences/ultrafeedback_french.test.jsonl",
    "spanish": "preferences/ultrafeedback_spanish.test.jsonl",
    "rewardbench_math": "preferences/rewardbench_math.test.jsonl",
    "rewardbench_code": "preferences/rewardbench_code.test.jsonl",
    "rewardmath": "preferences/rewardmath.test.jsonl",
}
#: Bundled training sets: file and the (prompt, chosen, rejected) fields to read.
TRAIN_SETS = {
    "ultrafeedback_original": (
        "preferences/ultrafeedback_paraphrased.train.jsonl",
        ("prompt", "original_chosen", "original_rejected"),
    ),
    "rewardmath": ("preferences/rewardmath.train.jsonl", ("prompt", "chosen", "rejected")),
}
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


# ----------------------------------------------------------------------------------------------------------
# The tie rule and the summaries (pure functions of accuracies; no model)
# ----------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UltraFeedbackData:
    """The preference rows of a run, after the length filter and the selections.

    Attributes:
      train: training rows.
      eval_sets: name → rows ("train" first: the training evaluation subset).
      info: where every set came from, what was skipped and selected (recorded in config.json).
    """

    train: tuple[Any, ...]
    eval_sets: Mapping[str, tuple[Any, ...]]
    info: Mapping[str, Any]


def _load_rows(path: str | os.PathLike, fields: tuple[str, str, str]) -> list[Any]:
    """Preference rows of a JSONL file, reading (prompt, chosen, rejected) from `fields` (file and line on error)."""
    from dynamics.datasets import PreferenceRow, _read_jsonl, _text_field, load_preferences

    if fields == ("prompt", "chosen", "rejected"):
        return load_preferences(path)
    rows = []
    for index, (n, obj) in enumerate(_read_jsonl(path)):
        where = f"{path} line {n}"
        prompt, chosen, rejected = (_text_field(obj, k, where) for k in fields)
        rows.append(PreferenceRow(prompt, chosen, rejected, obj.get("id", index), str(path), n))
    return rows


def _resolve(name: str, table: Mapping[str, Any], what: str) -> tuple[str, str]:
    """(label, path) of a set given by bundled name, "label=path" or a path."""
    from dynamics.datasets import bundled_data_path

    if "=" in name:
        label, _, path = name.partition("=")
    elif name in table:
        entry = table[name]
        return name, str(bundled_data_path(entry[0] if isinstance(entry, tuple) else entry))
    else:
        label, path = Path(name).stem, name
    if not os.path.isfile(path):
        raise DataError(f"{what} {name!r}: no such file {path!r}; bundled: {', '.join(table)}")
    return label.strip(), path


@functools.lru_cache(maxsize=4)
def _tokenizer(model: str) -> Any:
    from dynamics.models import resolve_model_source
    from dynamics.tokenizer import ensure_chat_template, load_tokenizer

    return ensure_chat_template(load_tokenizer(resolve_model_source(model)))[0]


def _longest_response(tokenizer: Any, rows: Sequence[Any]) -> np.ndarray:
    """Content tokens of the longer response of each row (before the chat template)."""
    chosen = tokenizer.encode_batch([r.chosen for r in rows], add_special_tokens=False)
    rejected = tokenizer.encode_batch([r.rejected for r in rows], add_special_tokens=False)
    return np.array([max(len(c), len(r)) for c, r in zip(chosen, rejected, strict=True)], np.int64)


def _fit(rows: list[Any], limit: int, tokenizer: Any) -> tuple[list[Any], list[Any]]:
    """(kept, skipped): rows whose responses both have ≤ `limit` tokens (all rows when limit is 0)."""
    if limit <= 0 or not rows:
        return rows, []
    longest = _longest_response(tokenizer, rows)
    return [r for r, n in zip(rows, longest, strict=True) if n <= limit], [
        r for r, n in zip(rows, longest, strict=True) if n > limit
    ]


def ultrafeedback_data(values: Mapping[str, Any], tokenizer: Any | None = None) -> UltraFeedbackData:
    """Loads, filters and selects the training and evaluation rows (docs/math.md §6.3).

    Args:
      values: the plan's resolved keys.
      tokenizer: the model's tokenizer, for the `max_response_tokens` filter (loaded from values["model"] when
        None and the filter is on).

    Returns:
      The `UltraFeedbackData`.

    Raises:
      DataError: a malformed file (file and line), an unknown set, an empty training or evaluation set.
      ConfigError: bad counts or categories.
    """
    from dynamics.datasets import TorchCompatibleGenerator

    for key in ("n_train", "n_eval", "max_response_tokens"):
        if values[key] < 0:
            raise ConfigError(f"{key} must be >= 0 (0: all / no limit), got {values[key]}")
    if values["n_train_eval"] < 1:
        raise DataError(f"the evaluation set 'train' has no rows (n_train_eval={values['n_train_eval']})")
    if not values["eval_sets"]:
        raise ConfigError("eval_sets is empty: name at least one evaluation set")
    categories = parse_categories(values["categories"])
    TieRule.from_values(values)
    limit = values["max_response_tokens"]
    if limit and tokenizer is None:
        tokenizer = _tokenizer(values["model"])
    info: dict[str, Any] = {"experiment": "ultrafeedback", "rows": {}}

    name = values["train_data"]
    fields = TRAIN_SETS[name][1] if name in TRAIN_SETS else ("prompt", "chosen", "rejected")
    label, path = _resolve(name, TRAIN_SETS, "train_data")
    rows = _load_rows(path, fields)
    kept, skipped = _fit(rows, limit, tokenizer)
    gen = TorchCompatibleGenerator(values["data_seed"])
    n_train = values["n_train"]
    if not kept:
        raise DataError(f"the training set has no rows ({path}: all {len(rows)} over max_response_tokens={limit})")
    if 0 < n_train < len(kept):
        kept = [kept[int(i)] for i in gen.randperm(len(kept))[:n_train]]
    train = tuple(kept)
    info["rows"]["train_data"] = _row_info(path, fields, rows, skipped, train, limit)

    eval_gen = TorchCompatibleGenerator(values["data_seed"])
    sets: dict[str, tuple[Any, ...]] = {}
    pick = np.arange(len(train))
    if values["n_train_eval"] < len(train):
        pick = np.sort(eval_gen.randperm(len(train))[: values["n_train_eval"]])
    sets["train"] = tuple(train[int(i)] for i in pick)
    info["rows"]["train"] = {
        "source": "train_data",
        "selected": len(sets["train"]),
        "ids": [r.id for r in sets["train"]],
    }
    for entry in values["eval_sets"]:
        label, path = _resolve(entry, EVAL_SET_FILES, "eval set")
        if label in sets:
            raise ConfigError(f"eval_sets names the set {label!r} twice (or it is the reserved name 'train')")
        rows = load_rows_cached(path)
        kept, skipped = _fit(list(rows), limit, tokenizer)
        if not kept:
            raise DataError(
                f"the evaluation set {label!r} has no rows ({path}: {len(rows)} rows, {len(skipped)} over "
                f"max_response_tokens={limit})"
            )
        if 0 < values["n_eval"] < len(kept):
            kept = [kept[int(i)] for i in np.sort(eval_gen.randperm(len(kept))[: values["n_eval"]])]
        sets[label] = tuple(kept)
        info["rows"][label] = _row_info(path, ("prompt", "chosen", "rejected"), rows, skipped, sets[label], limit)
    missing = [s for s in sets if s != "train" and s not in categories]
    if missing:
        raise ConfigError(f"categories: no category for the evaluation sets {missing}; give 'set=category' items")
    info.update(
        {
            "train_data": values["train_data"],
            "categories": {s: c for s, c in categories.items() if s in sets},
            "tie_rule": TieRule.from_values(values).to_dict(),
            "selection": "TorchCompatibleGenerator(data_seed): randperm as the official PreferenceDataModule",
            **{k: values[k] for k in UF_KEYS if k not in ("categories", "tie_rule", "tie_k", "tie_threshold")},
        }
    )
    return UltraFeedbackData(train, sets, info)


@functools.lru_cache(maxsize=16)
def load_rows_cached(path: str) -> tuple[Any, ...]:
    """`load_preferences` of a file, cached per path (the plan's runs share their evaluation sets)."""
    from dynamics.datasets import load_preferences

    return tuple(load_preferences(path))


def _row_info(path: str, fields, rows, skipped, selected, limit: int) -> dict[str, Any]:
    return {
        "file": path,
        "fields": list(fields),
        "available": len(rows),
        "over_max_response_tokens": len(skipped),
        "max_response_tokens": limit,
        "skipped_ids": [r.id for r in skipped],
        "selected": len(selected),
    }


# ----------------------------------------------------------------------------------------------------------
# Plan plumbing (the `experiment` command's runner protocol)
# ----------------------------------------------------------------------------------------------------------


def validate(values: Mapping[str, Any]) -> None:
    """Checks keys, options, data files, the length filter's survivors and the model, before anything trains.

    Raises:
      ConfigError: an unknown or missing key, a bad option or category, a reward this experiment lacks.
      DataError: a malformed data file (file and line), an empty training or evaluation set.
      ModelError: the model path does not exist.
    """
    from dynamics.models import resolve_model_source

    validate_training_keys("ultrafeedback", values, UF_KEYS)
    if values["reward"] == "exgrm":
        raise ConfigError("ultrafeedback: reward 'exgrm' is run on Persona only (docs/math.md §6.5)")
    train_config(values)
    run_mesh(values)  # a bad device count fails now, before any model loads
    resolve_model_source(values["model"])
    ultrafeedback_data(values)


def _report(data: UltraFeedbackData, batches: Mapping[str, Any]) -> None:
    for name, batch in batches.items():
        row = data.info["rows"].get(name, {})
        over = row.get("over_max_response_tokens", 0)
        cut = len(batch.truncated)
        print(
            f"   {name}: {batch.batch_size} pairs"
            + (f" ({over} of {row['available']} skipped: a response over {row['max_response_tokens']} tokens)"
               if over else "")
            + (f", {cut} prompts cut from the left to fit max_length" if cut else "")
        )  # fmt: skip


def run(
    values: Mapping[str, Any],
    run_dir: str | os.PathLike,
    *,
    resume: bool = False,
    progress: bool = True,
    loaded: Any = None,
):
    """Builds the training and evaluation sets and trains (docs/math.md §6.3).

    Args:
      values: the run's resolved plan keys.
      run_dir: the run directory.
      resume: continue from its last checkpoint.
      progress: progress bar.
      loaded: an already loaded model for values["model"], else it is loaded.

    Returns:
      The `dynamics.train.TrainResult`; its final evaluation also holds "<set>/rows" (pairs per set).
    """
    from dynamics.loading import load
    from dynamics.outputs import write_json_atomic
    from dynamics.text import encode_preferences
    from dynamics.train import EvalSuite, train

    config = train_config(values)
    if loaded is None:
        loaded = load(values["model"], dtype=values["dtype"])
    tok = loaded.tokenizer
    data = ultrafeedback_data(values, tok)
    enc = {"max_length": values["max_length"], "truncate": values["truncate"], "pad_to": values["bucket_pad"] or None}
    train_batch = encode_preferences(tok, list(data.train), **enc)
    batches = {name: encode_preferences(tok, list(rows), **enc) for name, rows in data.eval_sets.items()}
    _report(data, {"train_data": train_batch, **batches})
    info = dict(data.info)
    info["truncated"] = {"train_data": len(train_batch.truncated), **{k: len(b.truncated) for k, b in batches.items()}}
    run_path = Path(run_dir)
    run_path.mkdir(parents=True, exist_ok=True)
    result = train(
        config,
        loaded.lm,
        loaded.params,
        train_batch,
        EvalSuite.from_preferences(batches),
        run_dir=run_path,
        resume=resume,
        model_info={**loaded.describe(), "dtype": values["dtype"], "model_option": values["model"]},
        data_info={**info, **{k: values[k] for k in MODEL_KEYS}},
        progress=progress,
        mesh=run_mesh(values),
    )
    rows = {f"{name}/rows": float(b.batch_size) for name, b in batches.items()}
    result = dataclasses.replace(result, final_eval={**result.final_eval, **rows})
    write_json_atomic(run_path / "summary.json", result.to_dict())
    return result


def _group(spec_values: Mapping[str, Any], plan: Any) -> str:
    axes = [a for a, v in plan.grid.items() if len(v) > 1 and a != "reward"]
    return ",".join(f"{a}={spec_values[a]}" for a in axes)


def table(plan: Any, finals: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
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

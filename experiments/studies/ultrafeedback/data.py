"""The data of the UltraFeedback / RewardMATH experiment (docs/math.md §6.3, Section 5.2): sets, filter, selection.

Training data (`train_data`):

- "ultrafeedback_original": the bundled English UltraFeedback pairs. The 2,000-row training split of the paper
  is not bundled (bundled/README.md); its 200 rows that were rewritten are, in English, as
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

The bundled sets lie in `bundled/` beside this package, with their README and `check.py`
(`experiments.studies.bundled`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dynamics.errors import ConfigError, DataError
from experiments.studies.ultrafeedback.report import TieRule, parse_categories

__all__ = ["EVAL_SET_FILES", "TRAIN_SETS", "UF_KEYS", "UltraFeedbackData", "load_rows_cached", "ultrafeedback_data"]

#: Plan keys of the data, the categories and the tie rule (experiments/plans/ultrafeedback.toml).
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

#: Bundled evaluation sets (bundled/ beside this package), by the names the official plans use.
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
    from dynamics.datasets import PreferenceRow, load_preferences, read_jsonl, text_field

    if fields == ("prompt", "chosen", "rejected"):
        return load_preferences(path)
    rows = []
    for index, (n, obj) in enumerate(read_jsonl(path)):
        where = f"{path} line {n}"
        prompt, chosen, rejected = (text_field(obj, k, where) for k in fields)
        rows.append(PreferenceRow(prompt, chosen, rejected, obj.get("id", index), str(path), n))
    return rows


def _resolve(name: str, table: Mapping[str, Any], what: str) -> tuple[str, str]:
    """(label, path) of a set given by bundled name, "label=path" or a path."""
    from experiments.studies.bundled import bundled_data_path

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
        "file": Path(os.path.abspath(path)),  # named relative where it is written
        "fields": list(fields),
        "available": len(rows),
        "over_max_response_tokens": len(skipped),
        "max_response_tokens": limit,
        "skipped_ids": [r.id for r in skipped],
        "selected": len(selected),
    }

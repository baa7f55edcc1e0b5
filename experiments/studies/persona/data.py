"""The Persona data (docs/math.md §6.2, the paper's Section 5.1): statements, the split, the drawn responses.

Statements of one Persona trait whose `answer_matching_behavior` is "Yes" are the prompts; 80 training and 40
test prompts come from a random permutation (seed 875). Each prompt gets a training-style "yes" response
(prefix + word, drawn per row) as y+ and a "no" response as y−. The bundled trait files lie in `bundled/` beside
this package (`experiments.studies.bundled`); a plan's `data_file` may name any other Persona JSONL file.

With `split_rng = "torch"` the permutation and the response draws are the official code's, exactly: one
`torch.Generator().manual_seed(data_seed)` stream (`dynamics.datasets.TorchCompatibleGenerator`), first
`randperm`, then per row (training rows, then test rows) the yes prefix, the yes word, the no prefix and the
no word. With "numpy" the same draws come from `numpy.random.default_rng(data_seed)`. When an evaluation
prefix list has more than one entry, each row's prefix is drawn from `default_rng([data_seed, 1])` (the
official code draws them from torch's unseeded global generator).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dynamics.errors import ConfigError, DataError
from experiments.studies.persona.controlled import CONTROLLED_KEYS, training_words

__all__ = ["PERSONA_KEYS", "PersonaTexts", "persona_data_file", "persona_texts", "persona_traits"]

#: Data options of the plan (experiments/plans/persona.toml); the other keys are model and TrainConfig keys.
PERSONA_KEYS = (
    "trait",
    "data_file",
    "answer",
    "n_train",
    "n_test",
    "data_seed",
    "split_rng",
    "prefixes_yes",
    "words_yes",
    "prefixes_no",
    "words_no",
    "eval_prefixes_yes",
    "eval_words_yes",
    "eval_prefixes_no",
    "eval_words_no",
    *CONTROLLED_KEYS,
    "augment_k",
    "augment_words_yes",
    "augment_words_no",
)


@dataclasses.dataclass(frozen=True)
class PersonaTexts:
    """The Persona data as text, before tokenization.

    Attributes:
      train: training triples {"prompt", "chosen", "rejected"} (the training-style responses).
      test: test-prompt triples with training-style responses (the "original" test rows).
      eval_prefixes: {"train"/"test": {"yes"/"no": one evaluation prefix per row}}.
      eval_words_yes: the paraphrased yes-words.
      eval_words_no: the paraphrased no-words.
      info: how it was built (file, trait, split, seeds), recorded in config.json.
    """

    train: tuple[Mapping[str, str], ...]
    test: tuple[Mapping[str, str], ...]
    eval_prefixes: Mapping[str, Mapping[str, tuple[str, ...]]]
    eval_words_yes: tuple[str, ...]
    eval_words_no: tuple[str, ...]
    info: Mapping[str, Any]


def persona_data_file(values: Mapping[str, Any]) -> str:
    """The Persona file of a run: its data_file, else the bundled file of its trait.

    Raises:
      DataError: a data_file that does not exist.
      ConfigError: a trait with no bundled file (the message lists the traits).
    """
    from experiments.studies.bundled import bundled_data_path

    if values["data_file"]:
        if not os.path.isfile(values["data_file"]):
            raise DataError(f"data_file {values['data_file']!r}: no such file")
        return values["data_file"]
    traits = persona_traits()
    if values["trait"] not in traits:
        raise ConfigError(
            f"trait {values['trait']!r}: no bundled Persona file persona/{values['trait']}.jsonl; traits: "
            f"{', '.join(traits)} (or set data_file to a Persona JSONL file)"
        )
    return str(bundled_data_path(f"persona/{values['trait']}.jsonl"))


def persona_traits() -> list[str]:
    """The bundled Persona traits: the stems of persona/bundled/*.jsonl beside this package (not README, LICENSE)."""
    from experiments.studies.bundled import bundled_data_names

    return sorted(
        name[len("persona/") : -len(".jsonl")]
        for name in bundled_data_names()
        if name.startswith("persona/") and name.endswith(".jsonl")
    )


def _nonempty(values: Mapping[str, Any], key: str) -> list[str]:
    items = values[key]
    if not items or any(not isinstance(s, str) or not s.strip() for s in items):
        raise ConfigError(f"{key} must be a non-empty list of non-empty strings, got {items!r}")
    return list(items)


def persona_texts(values: Mapping[str, Any]) -> PersonaTexts:
    """Loads the statements, splits them and draws the responses (no tokenizer needed).

    Args:
      values: the plan's resolved keys (PERSONA_KEYS among them).

    Returns:
      The `PersonaTexts`.

    Raises:
      DataError: a malformed data file (file and line), or an empty training or test set.
      ConfigError: bad counts, an unknown split_rng, or empty word lists.
    """
    from dynamics.datasets import TorchCompatibleGenerator, load_persona

    path = persona_data_file(values)
    rows = load_persona(path, answer=values["answer"])
    n_train, n_test = values["n_train"], values["n_test"]
    if n_train < 1:
        raise DataError(f"the training set has no rows (n_train={n_train})")
    if n_test < 1:
        raise DataError(f"the evaluation set of test prompts has no rows (n_test={n_test})")
    if n_train + n_test > len(rows):
        raise ConfigError(
            f"n_train + n_test = {n_train + n_test} but {path} has only {len(rows)} rows with answer "
            f"{values['answer']!r}"
        )
    lists = {k: _nonempty(values, k) for k in ("prefixes_yes", "words_yes", "prefixes_no", "words_no")}
    lists["words_yes"], lists["words_no"] = training_words(values)
    evals = {
        k: _nonempty(values, k) for k in ("eval_prefixes_yes", "eval_words_yes", "eval_prefixes_no", "eval_words_no")
    }
    seed = values["data_seed"]
    if values["split_rng"] == "torch":
        gen = TorchCompatibleGenerator(seed)
        perm = gen.randperm(len(rows))

        def draw(k: int) -> int:
            return int(gen.randint(0, k, 1)[0])
    elif values["split_rng"] == "numpy":
        rng = np.random.default_rng(seed)
        perm = rng.permutation(len(rows))

        def draw(k: int) -> int:
            return int(rng.integers(0, k))
    else:
        raise ConfigError(f"split_rng must be 'torch' or 'numpy', got {values['split_rng']!r}")
    order = [int(i) for i in perm]

    def triple(row: Any) -> dict[str, str]:
        yes = lists["prefixes_yes"][draw(len(lists["prefixes_yes"]))]
        yes += lists["words_yes"][draw(len(lists["words_yes"]))]
        no = lists["prefixes_no"][draw(len(lists["prefixes_no"]))]
        no += lists["words_no"][draw(len(lists["words_no"]))]
        return {"prompt": row.prompt, "chosen": yes, "rejected": no}

    train = tuple(triple(rows[i]) for i in order[:n_train])
    test = tuple(triple(rows[i]) for i in order[n_train : n_train + n_test])
    eval_rng = np.random.default_rng([seed, 1])
    prefixes = {}
    for split, n in (("train", n_train), ("test", n_test)):
        prefixes[split] = {}
        for side in ("yes", "no"):
            choices = evals[f"eval_prefixes_{side}"]
            prefixes[split][side] = tuple(choices[int(i)] for i in eval_rng.integers(0, len(choices), n))
    info = {
        "experiment": "persona",
        "data_file": Path(os.path.abspath(path)),  # named relative where it is written
        "trait": values["trait"],
        "rows_with_answer": len(rows),
        "train_lines": [rows[i].line for i in order[:n_train]],
        "test_lines": [rows[i].line for i in order[n_train : n_train + n_test]],
        **{k: values[k] for k in PERSONA_KEYS if k not in ("data_file", "trait")},
    }
    return PersonaTexts(train, test, prefixes, tuple(evals["eval_words_yes"]), tuple(evals["eval_words_no"]), info)

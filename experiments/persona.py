"""The Persona experiment: a controlled token-level shift (docs/math.md §6.2, the paper's Section 5.1).

Statements of one Persona trait whose `answer_matching_behavior` is "Yes" are the prompts; 80 training and 40
test prompts come from a random permutation (seed 875). Each prompt gets a training-style "yes" response
(prefix + word, drawn per row) as y+ and a "no" response as y−. The reward model is trained on the training
prompts and evaluated on

    original responses     × training prompts / test prompts
    paraphrased responses  × training prompts / test prompts

where a paraphrased pair is ("My response would be " + yes-word, "I lean toward " + no-word): its accuracy is
computed for every (yes-word, no-word) combination and averaged over them, as the paper does.

With `split_rng = "torch"` the permutation and the response draws are the official code's, exactly: one
`torch.Generator().manual_seed(data_seed)` stream (`dynamics.datasets.TorchCompatibleGenerator`), first
`randperm`, then per row (training rows, then test rows) the yes prefix, the yes word, the no prefix and the
no word. With "numpy" the same draws come from `numpy.random.default_rng(data_seed)`. When an evaluation
prefix list has more than one entry, each row's prefix is drawn from `default_rng([data_seed, 1])` (the
official code draws them from torch's unseeded global generator).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dynamics.errors import ConfigError, DataError
from dynamics.reward_types import reward_label
from experiments.config import MODEL_KEYS, run_mesh, train_config, validate_training_keys

__all__ = [
    "format_table",
    "table",
    "PERSONA_KEYS",
    "PersonaTexts",
    "persona_eval_suite",
    "persona_table",
    "persona_texts",
    "persona_traits",
    "run",
    "validate",
]

#: Data options of the plan (experiments/configs/persona.toml); the other keys are model and TrainConfig keys.
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


def _data_file(values: Mapping[str, Any]) -> str:
    from dynamics.datasets import bundled_data_path

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
    """The bundled Persona traits: the stems of experiments/data/persona/*.jsonl (not its README or LICENSE)."""
    from dynamics.datasets import bundled_data_names

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

    path = _data_file(values)
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

    def triple(row) -> dict[str, str]:
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
        "data_file": path,
        "trait": values["trait"],
        "rows_with_answer": len(rows),
        "train_lines": [rows[i].line for i in order[:n_train]],
        "test_lines": [rows[i].line for i in order[n_train : n_train + n_test]],
        **{k: values[k] for k in PERSONA_KEYS if k not in ("data_file", "trait")},
    }
    return PersonaTexts(train, test, prefixes, tuple(evals["eval_words_yes"]), tuple(evals["eval_words_no"]), info)


def combination_name(split: str, yes: str, no: str) -> str:
    """The comparison name of one paraphrase combination, e.g. "paraphrased/test/certainly|nope"."""
    return f"paraphrased/{split}/{yes}|{no}"


def persona_eval_suite(encode: Callable[[Sequence[str], Sequence[str]], Any], texts: PersonaTexts):
    """The evaluation sets of docs/math.md §6.2 as an `EvalSuite` (each distinct response set scored once).

    Args:
      encode: (prompts, responses) → the sequences to score (`encode_pairs` for EX-RM / IM-RM,
        `encode_exgrm` for EX-GRM, with the run's length options bound).
      texts: the Persona texts.

    Returns:
      Comparisons "original/train", "original/test" and one "paraphrased/{split}/{yes}|{no}" per word
      combination; averages "paraphrased/train" and "paraphrased/test" (the paper's 2×2 mean).
    """
    from dynamics.train import EvalSuite

    sequences, comparisons, averages = {}, {}, {}
    for split, rows in (("train", texts.train), ("test", texts.test)):
        prompts = [r["prompt"] for r in rows]
        for side in ("chosen", "rejected"):
            sequences[f"{split}/original/{side}"] = encode(prompts, [r[side] for r in rows])
        comparisons[f"original/{split}"] = (f"{split}/original/chosen", f"{split}/original/rejected")
        for side, words in (("yes", texts.eval_words_yes), ("no", texts.eval_words_no)):
            for word in words:
                responses = [p + word for p in texts.eval_prefixes[split][side]]
                sequences[f"{split}/paraphrased/{side}/{word}"] = encode(prompts, responses)
        members = []
        for yes, no in itertools.product(texts.eval_words_yes, texts.eval_words_no):
            name = combination_name(split, yes, no)
            comparisons[name] = (f"{split}/paraphrased/yes/{yes}", f"{split}/paraphrased/no/{no}")
            members.append(name)
        averages[f"paraphrased/{split}"] = tuple(members)
    return EvalSuite(sequences, comparisons, averages)


def persona_table(final_evals: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """The paper's Persona table (docs/math.md §6.2): accuracy per (responses, prompts) row and per run.

    Args:
      final_evals: run label (e.g. "EX-RM", "IM-RM") → its final evaluation metrics.

    Returns:
      {"rows": [{"responses", "prompts", <label>: accuracy, ...}], "columns": [labels]}.
    """
    rows = []
    for responses, prompts in itertools.product(("original", "paraphrased"), ("train", "test")):
        row: dict[str, Any] = {"responses": responses.capitalize(), "prompts": prompts.capitalize()}
        for label, metrics in final_evals.items():
            row[label] = metrics.get(f"{responses}/{prompts}/rewards/accuracies")
        rows.append(row)
    return {"columns": list(final_evals), "rows": rows}


def format_table(table: Mapping[str, Any]) -> str:
    """The table as aligned text."""
    cols = table["columns"]
    lines = [f"{'Responses':<12} {'Prompts':<8} " + " ".join(f"{c:>12}" for c in cols)]
    for row in table["rows"]:
        cells = " ".join(f"{row[c]:>12.3f}" if row[c] is not None else f"{'-':>12}" for c in cols)
        lines.append(f"{row['responses']:<12} {row['prompts']:<8} {cells}")
    return "\n".join(lines)


def validate(values: Mapping[str, Any]) -> None:
    """Checks the keys, the options, the data and that the model exists, before any model loads or trains.

    Raises:
      ConfigError: an unknown or missing key, a bad option.
      DataError: a malformed data file (file and line), an empty training or evaluation set.
      ModelError: the model path does not exist.
    """
    if "trait" in values and "data_file" in values:
        _data_file(values)  # an unknown trait or a missing data_file fails before the training imports (JAX)
    validate_training_keys("persona", values, PERSONA_KEYS)
    persona_texts(values)
    from dynamics.models import resolve_model_source

    resolve_model_source(values["model"])  # a missing model directory fails now, not after the first runs


def run(
    values: Mapping[str, Any],
    run_dir: str | os.PathLike,
    *,
    resume: bool = False,
    progress: bool = True,
    loaded: Any = None,
):
    """Builds the Persona data and evaluation sets from `values` and trains (docs/math.md §6.2).

    Args:
      values: the run's resolved plan keys.
      run_dir: the run directory.
      resume: continue from its last checkpoint.
      progress: progress bar.
      loaded: an already loaded model (`dynamics.loading.Loaded`) for values["model"], else it is loaded.

    Returns:
      The `dynamics.train.TrainResult`.
    """
    from dynamics.loading import load
    from dynamics.text import (
        ExgrmBatch,
        PreferenceBatch,
        encode_exgrm,
        encode_pairs,
        encode_preferences,
        exgrm_answer_ids,
    )
    from dynamics.train import train

    config = train_config(values)
    texts = persona_texts(values)
    if loaded is None:
        loaded = load(values["model"], dtype=values["dtype"])
    tok = loaded.tokenizer
    enc = {"max_length": values["max_length"], "truncate": values["truncate"], "pad_to": values["bucket_pad"] or None}
    answer_ids = None
    if config.reward == "exgrm":
        answer_ids = exgrm_answer_ids(tok)
        encode = functools.partial(encode_exgrm, tok, **enc)
        prompts = [r["prompt"] for r in texts.train]
        n = len(prompts)
        both = encode(prompts + prompts, [r["chosen"] for r in texts.train] + [r["rejected"] for r in texts.train])
        data = PreferenceBatch(  # one encoding, so that both sides share T
            chosen=ExgrmBatch(both.tokens[:n], both.attention_mask[:n]),
            rejected=ExgrmBatch(both.tokens[n:], both.attention_mask[n:]),
        )
    else:
        encode = functools.partial(encode_pairs, tok, **enc)
        data = encode_preferences(tok, list(texts.train), **enc)
    suite = persona_eval_suite(encode, texts)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return train(
        config,
        loaded.lm,
        loaded.params,
        data,
        suite,
        run_dir=run_dir,
        resume=resume,
        answer_ids=answer_ids,
        model_info={**loaded.describe(), "dtype": values["dtype"], "model_option": values["model"]},
        data_info={**texts.info, **{k: values[k] for k in MODEL_KEYS}},
        progress=progress,
        mesh=run_mesh(values),
    )


def table(plan: Any, finals: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """The Persona table of a plan's runs: a column per run, labelled by its reward type when only that varies."""
    only_reward = [a for a, v in plan.grid.items() if len(v) > 1] in (["reward"], [])  # [] : a collapsed grid
    columns = {}
    for spec in plan.runs():
        if spec.name in finals:
            label = reward_label(spec.values["reward"]) if only_reward else spec.name
            columns[label] = finals[spec.name]
    return persona_table(columns)

"""Running the Persona experiment (docs/math.md §6.2, the paper's Section 5.1): evaluation sets, checks, training.

The reward model is trained on the training prompts' triples (`experiments.studies.persona.data`) and evaluated on

    original responses     × training prompts / test prompts
    paraphrased responses  × training prompts / test prompts

where a paraphrased pair is ("My response would be " + yes-word, "I lean toward " + no-word): its accuracy is
computed for every (yes-word, no-word) combination and averaged over them, as the paper does. With
design = "controlled" the run also evaluates the controlled cells (`experiments.studies.persona.controlled`,
docs/math.md §6.2.1) and writes their per-prompt accuracies at the final step to controlled.json.
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from experiments.plans.grammar import train_config, validate_training_keys
from experiments.studies.persona.data import PERSONA_KEYS, PersonaTexts, persona_data_file, persona_texts
from experiments.studies.training import EncodedRun, encoding_options, train_study

__all__ = ["combination_name", "encode_run", "persona_eval_suite", "plan_report", "run", "validate"]


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
    from dynamics.training import EvalSuite

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


def validate(values: Mapping[str, Any]) -> None:
    """Checks the keys, the options, the data and that the model exists, before any model loads or trains.

    Raises:
      ConfigError: an unknown or missing key, a bad option.
      DataError: a malformed data file (file and line), an empty training or evaluation set.
      ModelError: the model path does not exist.
    """
    if "trait" in values and "data_file" in values:
        persona_data_file(values)  # an unknown trait or a missing data_file fails before the training imports (JAX)
    validate_training_keys("persona", values, PERSONA_KEYS)
    persona_texts(values)
    _design(values)
    from dynamics.models import resolve_model_source

    resolve_model_source(values["model"])  # a missing model directory fails now, not after the first runs


def _design(values: Mapping[str, Any]):
    """The controlled design of a run with design = "controlled", else None (ConfigError for another value)."""
    from dynamics.errors import ConfigError
    from experiments.studies.persona.controlled import controlled_design

    if values["design"] not in ("paper", "controlled"):
        raise ConfigError(f"design must be 'paper' or 'controlled', got {values['design']!r}")
    return controlled_design(values, values["n_train"]) if values["design"] == "controlled" else None


def _paper_cells(rewards: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """Per-prompt accuracies of the paper's evaluation (docs/math.md §6.2), beside the controlled cells:
    "paper/{split}/original" and "paper/{split}/paraphrased" (the mean over the 2 × 2 word combinations), ties ½."""
    import numpy as np

    from experiments.studies.persona.controlled import wins

    out = {}
    for split in ("train", "test"):
        out[f"paper/{split}/original"] = wins(
            rewards[f"{split}/original/chosen"], rewards[f"{split}/original/rejected"]
        )
        combos = itertools.product(values["eval_words_yes"], values["eval_words_no"])
        out[f"paper/{split}/paraphrased"] = np.mean(
            [wins(rewards[f"{split}/paraphrased/yes/{a}"], rewards[f"{split}/paraphrased/no/{b}"]) for a, b in combos],
            axis=0,
        )
    return out


def _write_controlled(values: Mapping[str, Any], run_dir: str | os.PathLike, result: Any) -> Any:
    """controlled.json: the design and every cell's per-prompt accuracy at the final step (their means are the
    cells' logged accuracies, the suite's averages)."""
    from dynamics.outputs import write_json_atomic
    from experiments.studies.persona.controlled import pair_accuracies

    design = _design(values)
    if result.final_rewards is None:
        return result
    cells = {**pair_accuracies(result.final_rewards, design), **_paper_cells(result.final_rewards, values)}
    write_json_atomic(
        os.path.join(run_dir, "controlled.json"),
        {"design": design.to_dict(), "step": result.steps, "cells": {k: v.tolist() for k, v in cells.items()}},
    )
    return result


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
      The `dynamics.training.TrainResult`.
    """
    texts = persona_texts(values)
    result = train_study(
        values, run_dir, functools.partial(encode_run, values, texts), loaded=loaded, resume=resume, progress=progress
    )
    return _write_controlled(values, run_dir, result) if values["design"] == "controlled" else result


def encode_run(values: Mapping[str, Any], texts: PersonaTexts, loaded: Any) -> EncodedRun:
    """The training batch (EX-GRM: both sides in one encoding, so that they share T) and the evaluation suite."""
    from dynamics.text import (
        ExgrmBatch,
        PreferenceBatch,
        encode_exgrm,
        encode_pairs,
        encode_preferences,
        exgrm_answer_ids,
    )

    tok = loaded.tokenizer
    enc = encoding_options(values)
    answer_ids = None
    if train_config(values).reward == "exgrm":
        answer_ids = exgrm_answer_ids(tok)
        encode = functools.partial(encode_exgrm, tok, **enc)
        prompts = [r["prompt"] for r in texts.train]
        n = len(prompts)
        both = encode(prompts + prompts, [r["chosen"] for r in texts.train] + [r["rejected"] for r in texts.train])
        data = PreferenceBatch(
            chosen=ExgrmBatch(both.tokens[:n], both.attention_mask[:n]),
            rejected=ExgrmBatch(both.tokens[n:], both.attention_mask[n:]),
        )
    else:
        encode = functools.partial(encode_pairs, tok, **enc)
        data = encode_preferences(tok, list(texts.train), **enc)
    suite = persona_eval_suite(encode, texts)
    design = _design(values)
    if design is not None:
        suite = _with_controlled(suite, encode, texts, design, tok)
    return EncodedRun(loaded.lm, loaded.params, data, suite, data_info=texts.info, answer_ids=answer_ids)


def _with_controlled(suite: Any, encode: Any, texts: PersonaTexts, design: Any, tokenizer: Any) -> Any:
    """`suite` with the controlled cells' sets, comparisons and averages; the new words checked as tokens first."""
    from dynamics.training import EvalSuite
    from experiments.studies.persona.controlled import check_tokens, controlled_suite

    check_tokens(design, tokenizer)
    sequences, comparisons, averages = controlled_suite(encode, texts, design)
    return EvalSuite(
        {**suite.sequences, **sequences}, {**suite.comparisons, **comparisons}, {**suite.averages, **averages}
    )


def plan_report(plan: Any, out_dir: str | os.PathLike) -> list[Any]:
    """The controlled design's report of a plan whose runs use design = "controlled" (`controlled_report`: the
    per-cell intervals as JSON and Markdown, the forest plot), else nothing."""
    if not any(spec.values["design"] == "controlled" for spec in plan.runs()):
        return []
    from experiments.studies.persona.controlled_report import controlled_report

    return controlled_report(plan, out_dir)

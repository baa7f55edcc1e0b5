"""Running the Hamiltonian experiment (docs/math.md §6.1): checks, training and, for an IM-RM, the generation test.

The graphs and the graph tokens come from `experiments.studies.hamiltonian.data`; training goes through
`experiments.studies.training.train_study`. An IM-RM's generation test runs on the final parameters as the
training's `final_metrics` hook: its accuracies join the final evaluation (summary.json) and the samples are
written to generation.json.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dynamics.errors import ConfigError
from experiments.plans.grammar import train_config, validate_training_keys
from experiments.studies.hamiltonian.data import HAMILTONIAN_KEYS, HamiltonianData, add_graph_tokens, hamiltonian_data
from experiments.studies.hamiltonian.generation import generation_test
from experiments.studies.hamiltonian.graphs import EDGE_SEP_TOKEN, SEP_TOKEN
from experiments.studies.training import EncodedRun, encoding_options, train_study

__all__ = ["generation_metrics", "run", "validate"]


def validate(values: Mapping[str, Any]) -> None:
    """Checks the keys, the options, the graphs and that the model exists, before any model loads or trains.

    Raises:
      ConfigError: an unknown or missing key, a bad option.
      DataError: an empty training or evaluation set, a y− that cannot be drawn.
      ModelError: the model path does not exist.
    """
    from dynamics.models import resolve_model_source

    validate_training_keys("hamiltonian", values, HAMILTONIAN_KEYS)
    for key in ("gen_max_new_tokens", "gen_batch_size"):
        if values[key] < 1:
            raise ConfigError(f"{key} must be >= 1, got {values[key]}")
    if values["gen_n_train"] < 0 or values["gen_n_test"] < 0 or not values["gen_temperature"] > 0:
        raise ConfigError("gen_n_train and gen_n_test must be >= 0 and gen_temperature > 0")
    hamiltonian_data(values)
    resolve_model_source(values["model"])


def run(
    values: Mapping[str, Any],
    run_dir: str | os.PathLike,
    *,
    resume: bool = False,
    progress: bool = True,
    loaded: Any = None,
):
    """Draws the graphs, trains the reward model and, for an IM-RM, runs the generation test (docs/math.md §6.1).

    Args:
      values: the run's resolved plan keys.
      run_dir: the run directory (config.json, metrics.jsonl, summary.json, generation.json, checkpoints/).
      resume: continue from its last checkpoint.
      progress: progress bar.
      loaded: an already loaded model for values["model"] (not changed), else it is loaded.

    Returns:
      The `dynamics.training.TrainResult`; for an IM-RM its final evaluation also holds
      "generation/{train,test}/accuracy" and "generation/{train,test}/n".
    """
    data = hamiltonian_data(values)
    encode = functools.partial(_encode, values, data, Path(run_dir))
    return train_study(values, run_dir, encode, loaded=loaded, resume=resume, progress=progress)


def _encode(values: Mapping[str, Any], data: HamiltonianData, run_dir: Path, loaded: Any) -> EncodedRun:
    """The graph tokens added, the training and evaluation batches, and the IM-RM's generation hook."""
    from dynamics.text import encode_preferences
    from dynamics.training import EvalSuite

    tok, lm, params, token_ids = add_graph_tokens(loaded)
    enc = encoding_options(values)
    train_rows = HamiltonianData.rows(data.train)
    eval_train = [train_rows[i] for i in data.train_eval]
    batches = {
        "train": encode_preferences(tok, eval_train, **enc),
        "test": encode_preferences(tok, HamiltonianData.rows(data.test), **enc),
    }
    hook = None
    if train_config(values).reward in ("im", "im-noref") and values["generation"]:
        hook = functools.partial(generation_metrics, values, data, lm, tok, run_dir)
    return EncodedRun(
        lm,
        params,
        encode_preferences(tok, train_rows, **enc),
        EvalSuite.from_preferences(batches),
        data_info={**data.info, "train_eval_rows": list(data.train_eval)},
        model_info={
            "vocab_size": lm.config.vocab_size,
            "graph_tokens": {SEP_TOKEN: token_ids[0], EDGE_SEP_TOKEN: token_ids[1]},
        },  # fmt: skip
        final_metrics=hook,
    )


def generation_metrics(
    values: Mapping[str, Any], data: HamiltonianData, lm: Any, tokenizer: Any, run_dir: Path, params: Any
) -> dict[str, float]:
    """The IM-RM generation test on the final parameters: writes generation.json, returns its accuracies.

    Training prompts: the evaluation subset first, then the other training graphs (the official code samples
    for all training prompts: gen_n_train = n_train); test prompts: the first gen_n_test test graphs.

    Args:
      values: the run's plan keys (the gen_* options).
      data: the run's graphs.
      lm: the model with the graph tokens.
      tokenizer: the tokenizer with the graph tokens.
      run_dir: where generation.json is written.
      params: the final reward-model parameters (π_θ is params["lm"]).

    Returns:
      {"generation/{split}/accuracy": fraction correct, "generation/{split}/n": prompts} per split sampled.
    """
    from dynamics.outputs import write_json_atomic

    order = list(data.train_eval) + [i for i in range(len(data.train)) if i not in set(data.train_eval)]
    graphs = {
        "train": [data.train[i] for i in order[: values["gen_n_train"]]],
        "test": list(data.test[: values["gen_n_test"]]),
    }
    generation, metrics = {}, {}
    for split, chosen in graphs.items():
        if not chosen:
            continue
        g = generation_test(
            lm,
            params["lm"],
            tokenizer,
            chosen,
            max_new_tokens=values["gen_max_new_tokens"],
            temperature=values["gen_temperature"],
            seed=values["gen_seed"],
            batch_size=values["gen_batch_size"],
        )
        generation[split] = g
        print(f"   generation ({split} prompts): {g.correct}/{g.n} correct, stops {dict(g.stop_reasons)}")
        metrics[f"generation/{split}/accuracy"] = g.accuracy
        metrics[f"generation/{split}/n"] = float(g.n)
    write_json_atomic(run_dir / "generation.json", {split: g.to_dict() for split, g in generation.items()})
    return metrics

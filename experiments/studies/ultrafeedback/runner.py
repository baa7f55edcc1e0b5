"""Running the UltraFeedback / RewardMATH experiment (docs/math.md §6.3): checks, encoding, training.

The sets come from `experiments.studies.ultrafeedback.data` (with the model's tokenizer, for the length filter);
training goes through `experiments.studies.training.train_study`, whose `final_metrics` hook adds each
evaluation set's size ("<set>/rows") to the final evaluation (summary.json).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any

from dynamics.errors import ConfigError
from experiments.plans.grammar import run_mesh, train_config, validate_training_keys
from experiments.studies.training import EncodedRun, encoding_options, train_study
from experiments.studies.ultrafeedback.data import UF_KEYS, UltraFeedbackData, ultrafeedback_data

__all__ = ["run", "validate"]


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
    """Prints each set's size, the pairs the length filter skipped and the prompts cut to fit max_length."""
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
      The `dynamics.training.TrainResult`; its final evaluation also holds "<set>/rows" (pairs per set).
    """
    return train_study(values, run_dir, functools.partial(_encode, values), loaded=loaded, resume=resume,
                       progress=progress)  # fmt: skip


def _encode(values: Mapping[str, Any], loaded: Any) -> EncodedRun:
    """The sets (filtered with the model's tokenizer), their batches, and the "<set>/rows" hook."""
    from dynamics.text import encode_preferences
    from dynamics.training import EvalSuite

    tok = loaded.tokenizer
    data = ultrafeedback_data(values, tok)
    enc = encoding_options(values)
    train_batch = encode_preferences(tok, list(data.train), **enc)
    batches = {name: encode_preferences(tok, list(rows), **enc) for name, rows in data.eval_sets.items()}
    _report(data, {"train_data": train_batch, **batches})
    info = dict(data.info)
    info["truncated"] = {"train_data": len(train_batch.truncated), **{k: len(b.truncated) for k, b in batches.items()}}
    rows = {f"{name}/rows": float(b.batch_size) for name, b in batches.items()}
    return EncodedRun(
        loaded.lm,
        loaded.params,
        train_batch,
        EvalSuite.from_preferences(batches),
        data_info=info,
        final_metrics=lambda params: rows,
    )

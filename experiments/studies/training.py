"""The one path every study takes to train: load the model, encode the study's data, train, record.

`train_study(values, run_dir, encode, loaded=...)` loads values["model"] (unless a loaded model is given), calls
the study's `encode(loaded) -> EncodedRun` (its batches, its evaluation suite, what to record, a final-metrics
hook) and runs `dynamics.training.train` with the plan's TrainConfig and device mesh, so that config.json records the
model and data the same way for every study (docs/math.md §6's common training protocol).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from experiments.plans.grammar import MODEL_KEYS, run_mesh, train_config

__all__ = ["EncodedRun", "encoding_options", "train_study"]


@dataclasses.dataclass(frozen=True)
class EncodedRun:
    """A study's run ready to train.

    Attributes:
      lm: the language model to train (the loaded one, or a changed copy, e.g. with new token rows).
      params: its parameters.
      train: the training `PreferenceBatch`.
      evals: the `EvalSuite`.
      data_info: how the data was built (recorded in config.json with the plan's model keys).
      model_info: entries added to the loaded model's description (e.g. a resized vocabulary).
      answer_ids: (yes_id, no_id) for an EX-GRM, else None.
      final_metrics: called with the final reward-model parameters; its metrics join the final evaluation
        (and summary.json), or None.
    """

    lm: Any
    params: Any
    train: Any
    evals: Any
    data_info: Mapping[str, Any]
    model_info: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    answer_ids: tuple[int, int] | None = None
    final_metrics: Callable[[Any], Mapping[str, float]] | None = None


def encoding_options(values: Mapping[str, Any]) -> dict[str, Any]:
    """The encoders' length options of a run: max_length, truncate and pad_to (the plan's bucket_pad, 0: none)."""
    return {"max_length": values["max_length"], "truncate": values["truncate"], "pad_to": values["bucket_pad"] or None}


def train_study(
    values: Mapping[str, Any],
    run_dir: str | os.PathLike,
    encode: Callable[[Any], EncodedRun],
    *,
    loaded: Any = None,
    resume: bool = False,
    progress: bool = True,
) -> Any:
    """Loads the model (unless `loaded`), encodes the study's data and trains one run.

    Args:
      values: the run's resolved plan keys.
      run_dir: the run directory (created).
      encode: the study's `Loaded → EncodedRun`.
      loaded: an already loaded model (`dynamics.loading.Loaded`) for values["model"], else it is loaded.
      resume: continue from the run directory's last checkpoint.
      progress: progress bar.

    Returns:
      The `TrainResult`.
    """
    from dynamics.loading import load
    from dynamics.outputs import portable_paths
    from dynamics.training import train

    config = train_config(values)
    if loaded is None:
        loaded = load(values["model"], dtype=values["dtype"])
    run = encode(loaded)
    run_path = Path(run_dir)
    run_path.mkdir(parents=True, exist_ok=True)
    return train(
        config,
        run.lm,
        run.params,
        run.train,
        run.evals,
        run_dir=run_path,
        resume=resume,
        answer_ids=run.answer_ids,
        # files named relative to the run directory: config.json reads the same from any working directory
        model_info={
            **loaded.describe(start=run_path),
            "dtype": values["dtype"],
            "model_option": values["model"],
            **portable_paths(run.model_info, run_path),
        },  # fmt: skip
        data_info=portable_paths({**run.data_info, **{k: values[k] for k in MODEL_KEYS}}, run_path),
        progress=progress,
        mesh=run_mesh(values),
        final_metrics=run.final_metrics,
    )

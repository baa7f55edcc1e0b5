"""What training reports: `StepInfo` (to callbacks, after each optimizer step) and `TrainResult` (at the end)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dynamics.outputs import write_json_atomic
from dynamics.training.config import TrainConfig

__all__ = ["StepInfo", "TrainResult"]


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """What a callback sees after each optimizer step (all numbers already logged).

    Attributes:
      step: optimizer steps done.
      epoch: index of the epoch the step belongs to.
      loss: the step's batch-mean training loss (before the update).
      accuracy: the step's training accuracy (ties ½, before the update).
      eval: the evaluation made at this step, if any.
    """

    step: int
    epoch: int
    loss: float
    accuracy: float
    eval: Mapping[str, float] | None


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """The outcome of `train`.

    Attributes:
      config: the training configuration.
      run_dir: where the files are, as the caller named it (None when nothing was written).
      steps: optimizer steps done.
      epochs: epochs done (fractional when stopped by max_steps).
      final_eval: the last evaluation's metrics (`evaluate_rewards` names), with those of a `final_metrics` hook.
      history: every line of the metrics log, in order (train and eval events).
      resumed_from_step: the checkpoint step this process started from (None: a fresh run).
      n_trainable: number of trained scalars.
      timing: seconds spent and trace counts (never part of the metrics; not reproducible).
      params: the final parameters (not serialized).
      final_rewards: the rewards of every evaluation sequence set at the final step ({set: [n] float64}), or None
        when this process ran no evaluation at the final step (a resumed run that was already complete).
    """

    config: TrainConfig
    run_dir: str | None
    steps: int
    epochs: float
    final_eval: Mapping[str, float]
    history: tuple[Mapping[str, Any], ...]
    resumed_from_step: int | None
    n_trainable: int
    timing: Mapping[str, Any]
    params: Any = dataclasses.field(default=None, repr=False, compare=False)
    final_rewards: Any = dataclasses.field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (without the parameters and the history, which metrics.jsonl holds).

        "run_dir" is "." (the directory of summary.json, where train writes this) when the run wrote files, else
        None: never a machine's absolute path.
        """
        return {
            "config": self.config.to_dict(),
            "run_dir": None if self.run_dir is None else ".",
            "steps": self.steps,
            "epochs": self.epochs,
            "final_eval": dict(self.final_eval),
            "resumed_from_step": self.resumed_from_step,
            "n_trainable": self.n_trainable,
            "timing": dict(self.timing),
        }

    def save(self, path: str | Path) -> Path:
        """Writes `to_dict()` as JSON to `path` atomically and returns the path."""
        path = Path(path)
        write_json_atomic(path, self.to_dict())
        return path

"""Rewards of a preference file under a reward model, with the metrics TRL logs (docs/math.md §1, §11).

For N pairs (x_i, y_i+, y_i−) and a reward model r (an EX-RM, or an IM-RM r = β ln(π_θ/π_ref) of a DPO policy and
its reference):

    rewards/chosen = mean_i r(x_i, y_i+)        rewards/rejected = mean_i r(x_i, y_i−)
    rewards/margins = mean_i (r(x_i, y_i+) − r(x_i, y_i−))
    rewards/accuracies = mean_i [r(x_i, y_i+) > r(x_i, y_i−)]          (strict, as TRL logs it)
    accuracy_ties_half = the same with ties counted ½                   (the paper's accuracy)
    loss = mean_i ℓ(r(x_i, y_i+) − r(x_i, y_i−))                         (the objective's per-pair loss)

and for an IM-RM also logps/chosen and logps/rejected, the policy's mean summed log-probabilities ln π_θ(y|x)
(nats). These are the names and definitions of TRL's DPOTrainer evaluation; `evaluate_pairs` computes them in
float64 on the host from rewards computed in jitted chunks.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np

from dynamics.batches import PairBatch, PreferenceBatch

__all__ = ["PairEvaluation", "evaluate_pairs"]


@dataclasses.dataclass(frozen=True)
class PairEvaluation:
    """Per-pair rewards and their metrics (module docstring).

    Attributes:
      chosen, rejected: r(x_i, y_i±), [N] float64 (reward units).
      logps_chosen, logps_rejected: ln π_θ(y_i±|x_i), [N] (nats), IM-RM only, else None.
      metrics: TRL's names → value (module docstring).
      meta: reward type, β, objective, N.
    """

    chosen: np.ndarray
    rejected: np.ndarray
    logps_chosen: np.ndarray | None
    logps_rejected: np.ndarray | None
    metrics: dict[str, float]
    meta: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: every array as a list."""
        from dynamics.outputs import jsonable

        return jsonable({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Writes `to_dict` as JSON (atomically) and returns the path."""
        from dynamics.outputs import write_json_atomic

        return write_json_atomic(path, self.to_dict())


def _chunked(fn, batch: PairBatch, chunk: int) -> np.ndarray:
    from dynamics.chunking import batch_chunks

    return np.concatenate([np.asarray(fn(c))[:k] for c, k in batch_chunks(batch, chunk)]).astype(np.float64)


def evaluate_pairs(rm, params, pairs: PreferenceBatch, *, objective=None, chunk: int = 16) -> PairEvaluation:
    """Rewards of every pair and TRL's evaluation metrics (module docstring).

    Args:
      rm, params: the reward model and its parameters (an IM-RM's {"lm", "ref"}: policy and reference).
      pairs: the N preference pairs.
      objective: `dynamics.objectives.Objective` defining the loss (None: DPO's Bradley-Terry loss), and SimPO's
        reward (`dynamics.objectives.reward_model`).
      chunk: sequences per jitted forward pass.

    Raises:
      DataError: no pair, or a reward that is NaN or infinite (`dynamics.metrics.preference_metrics`).
      ConfigError: chunk < 1.
    """
    import jax

    from dynamics.delta import reward_jit
    from dynamics.errors import ConfigError
    from dynamics.metrics import preference_metrics
    from dynamics.objectives import Objective, reward_model
    from dynamics.rewards import ImplicitRM, response_logprob

    if chunk < 1:
        raise ConfigError(f"chunk must be ≥ 1, got {chunk}")
    objective = objective or Objective()
    rm = reward_model(rm, objective)
    rc = _chunked(lambda b: reward_jit(rm, params, b), pairs.chosen, chunk)
    rr = _chunked(lambda b: reward_jit(rm, params, b), pairs.rejected, chunk)
    m = preference_metrics(rc, rr)
    metrics = {
        "rewards/chosen": m.mean_chosen,
        "rewards/rejected": m.mean_rejected,
        "rewards/margins": m.mean_margin,
        "rewards/accuracies": m.accuracy_strict,
        "accuracy_ties_half": m.accuracy,
        "loss": float(np.mean(np.asarray(objective.losses(rc, rr)))),
    }
    lp_c = lp_r = None
    if isinstance(rm, ImplicitRM):
        logprob = jax.jit(lambda b: response_logprob(rm.lm, params["lm"], b))
        lp_c, lp_r = _chunked(logprob, pairs.chosen, chunk), _chunked(logprob, pairs.rejected, chunk)
        metrics.update({"logps/chosen": float(lp_c.mean()), "logps/rejected": float(lp_r.mean())})
    meta = {"reward": type(rm).__name__, "beta": getattr(rm, "beta", None), "objective": objective.name,
            "n_pairs": int(rc.size)}  # fmt: skip
    return PairEvaluation(rc, rr, lp_c, lp_r, {k: float(v) for k, v in metrics.items()}, meta)

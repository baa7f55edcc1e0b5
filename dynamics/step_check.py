"""Prediction against reality: real one-step updates (SGD, Adam's first step) vs the first-order Δr.

For each learning rate η of a sweep, one real optax step is taken on the training triple(s) with the trainable
parameters of the mask, the unseen rewards are re-evaluated, and the actual change r'(u) − r(u) is compared with
the prediction of `dynamics.delta` (docs/math.md §3: the residual is O(η²), so log |actual − predicted| against
log η has slope 2 until floating-point rounding takes over).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dynamics.batches import PairBatch, PreferenceBatch
from dynamics.chunking import batch_chunks, strip
from dynamics.delta import (
    TRACE_COUNTS,
    DeltaResult,
    Optimizer,
    delta_reward,
    reward_name,
)
from dynamics.errors import ConfigError
from dynamics.masks import combine, partition, prepare, trainable_mask
from dynamics.objectives import Objective, reward_model
from dynamics.pair_gradient import TRAIN_CHUNK, first_update, loss_gradient
from dynamics.rewards import RewardModel

__all__ = ["StepCheckResult", "check_step", "loglog_slope", "real_step", "real_step_jit"]


def real_step(rm: RewardModel, train_tree, frozen, train: PreferenceBatch, lr, optimizer: Optimizer, objective=None):
    """The trainable tree after one real optimizer step (its first) on the batch mean of the objective's loss
    (`dynamics.objectives`; None: the Bradley-Terry loss)."""

    TRACE_COUNTS["real_step"] += 1
    objective = objective or Objective()

    def loss(tr):
        p = combine(tr, frozen)
        return objective.loss(rm.reward(p, train.chosen), rm.reward(p, train.rejected))

    return optax.apply_updates(train_tree, first_update(jax.grad(loss)(train_tree), optimizer, train_tree, lr))


#: `real_step` jitted (the reward model and the optimizer name static).
real_step_jit = jax.jit(real_step, static_argnums=(0, 5, 6))


def _rewards(rm, train_tree, frozen, batch):
    TRACE_COUNTS["step_rewards"] += 1
    return rm.reward(combine(train_tree, frozen), batch)


_rewards_jit = jax.jit(_rewards, static_argnums=0)


def loglog_slope(x: np.ndarray, y: np.ndarray) -> float:
    """Least-squares slope of log|y| against log x (points with y = 0 are left out; nan if < 2 remain)."""
    x, y = np.asarray(x, np.float64), np.abs(np.asarray(y, np.float64))
    keep = y > 0
    if keep.sum() < 2:
        return float("nan")
    return float(np.polyfit(np.log(x[keep]), np.log(y[keep]), 1)[0])


@dataclasses.dataclass(frozen=True)
class StepCheckResult:
    """Predicted vs actual Δr over a sweep of learning rates.

    Attributes:
      lrs: the learning rates η, [n_lr].
      predicted: first-order Δr, [n_lr, n_unseen] (linear in η).
      actual: r after the real step − r before, [n_lr, n_unseen].
      prediction: the `DeltaResult` at η = 1 (kernel terms, BT weights, rewards before).
      meta: reward type, mask, optimizer, dtype.
    """

    lrs: np.ndarray
    predicted: np.ndarray
    actual: np.ndarray
    prediction: DeltaResult
    meta: dict[str, Any]

    @property
    def residual(self) -> np.ndarray:
        """actual − predicted, [n_lr, n_unseen]."""
        return self.actual - self.predicted

    def stats(self) -> list[dict[str, float]]:
        """Per η: Pearson and Spearman correlation, sign agreement, max and median |residual|, relative error."""
        from scipy.stats import pearsonr, spearmanr

        out = []
        for i, lr in enumerate(self.lrs):
            p, a = self.predicted[i], self.actual[i]
            ok = len(p) >= 2 and np.ptp(p) > 0 and np.ptp(a) > 0
            out.append(
                {
                    "lr": float(lr),
                    "pearson": float(pearsonr(p, a)[0]) if ok else float("nan"),
                    "spearman": float(spearmanr(p, a)[0]) if ok else float("nan"),
                    "sign_agreement": float(np.mean(np.sign(p) == np.sign(a))),
                    "max_abs_residual": float(np.abs(a - p).max()),
                    "median_abs_residual": float(np.median(np.abs(a - p))),
                    "max_abs_actual": float(np.abs(a).max()),
                    "relative_error": float(np.abs(a - p).max() / max(np.abs(a).max(), 1e-300)),
                }
            )
        return out

    def residual_slope(self, lr_range: tuple[float, float] | None = None) -> dict[str, float]:
        """Slope of log |residual| against log η: of the max over pairs, and the median of per-pair slopes."""
        sel = np.ones(len(self.lrs), bool)
        if lr_range is not None:
            sel = (self.lrs >= lr_range[0]) & (self.lrs <= lr_range[1])
        lrs, res = self.lrs[sel], self.residual[sel]
        per_pair = [loglog_slope(lrs, res[:, j]) for j in range(res.shape[1])]
        return {
            "slope_of_max": loglog_slope(lrs, np.abs(res).max(1)),
            "median_pair_slope": float(np.nanmedian(per_pair)),
            "min_pair_slope": float(np.nanmin(per_pair)),
            "max_pair_slope": float(np.nanmax(per_pair)),
            "decades": float(np.log10(lrs.max() / lrs.min())) if len(lrs) > 1 else 0.0,
        }

    def to_dict(self) -> dict[str, Any]:
        """Every field as JSON-ready values, with `stats()` and `residual_slope()` (arrays as lists)."""
        from dynamics.outputs import jsonable

        return jsonable(
            {
                "lrs": self.lrs,
                "predicted": self.predicted,
                "actual": self.actual,
                "stats": self.stats(),
                "residual_slope": self.residual_slope(),
                "prediction": self.prediction.to_dict(),
                "meta": self.meta,
            }
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write `to_dict()` as JSON, atomically; returns the path."""
        from dynamics.outputs import write_json_atomic

        return write_json_atomic(path, self.to_dict())


def check_step(
    rm: RewardModel,
    params,
    train: PreferenceBatch,
    unseen: PairBatch,
    *,
    lrs: Sequence[float],
    params_spec: str = "all",
    optimizer: Optimizer = "sgd",
    method: str = "ntk",
    chunk_size: int = 16,
    progress: bool = False,
    objective: Objective | None = None,
) -> StepCheckResult:
    """Predicted and actual Δr for every η in `lrs` (docs/math.md §3; the issue's "prediction vs reality").

    The prediction comes from `delta_reward` at η = 1 and is scaled (it is linear in η, for SGD and for Adam's
    first step alike); each actual value comes from a real jitted optax step with that η.

    Raises:
      ConfigError: an empty sweep, a learning rate ≤ 0, or the errors of `delta_reward`.
    """
    from tqdm.auto import tqdm

    lrs = np.asarray(sorted(float(x) for x in lrs), np.float64)
    if lrs.size == 0 or not np.all(lrs > 0):
        raise ConfigError(f"learning rates must be > 0 and at least one; got {list(lrs)}")
    pred = delta_reward(
        rm,
        params,
        train,
        unseen,
        params_spec=params_spec,
        lr=1.0,
        optimizer=optimizer,
        method=method,
        decompose=False,  # the kernel terms are not needed here: one JVP direction instead of 1 + 2B
        chunk_size=chunk_size,
        progress=progress,
        objective=objective,
    )
    rm = reward_model(rm, objective)
    rm, params, spec = prepare(rm, params, params_spec)
    mask = trainable_mask(rm, params, spec)
    train_tree, frozen = partition(params, mask)
    t = strip(train)
    chunks = batch_chunks(unseen, chunk_size)
    before = np.concatenate([np.asarray(_rewards_jit(rm, train_tree, frozen, c))[:k] for c, k in chunks])
    dtype = jax.tree.leaves(train_tree)[0].dtype
    actual = []
    grads = None if train.batch_size <= TRAIN_CHUNK else loss_gradient(rm, train_tree, frozen, t, objective)
    for lr in tqdm(lrs, desc="real steps", disable=not progress, leave=False):
        if grads is None:
            new_tree = real_step_jit(rm, train_tree, frozen, t, jnp.asarray(lr, dtype), optimizer, objective)
        else:  # a large batch: its gradient accumulated over chunks of pairs, then the optimizer's first step
            new_tree = optax.apply_updates(train_tree, first_update(grads, optimizer, train_tree, float(lr)))
        after = np.concatenate([np.asarray(_rewards_jit(rm, new_tree, frozen, c))[:k] for c, k in chunks])
        actual.append(after.astype(np.float64) - before.astype(np.float64))
    meta = {
        **pred.meta,
        "lr": None,
        "dtype": str(dtype),
        "reward": reward_name(rm),
    }
    return StepCheckResult(
        lrs=lrs,
        predicted=np.outer(lrs, pred.delta),
        actual=np.stack(actual),
        prediction=pred,
        meta=meta,
    )

"""The linearised multi-step trajectory of Bradley-Terry SGD, from the kernels at initialisation (docs/math.md §10.4).

Linearise every margin and eval quantity around θ_0 (the empirical NTK frozen at initialisation):

    K_tt[j, k] = ⟨∇m_j(θ_0), ∇m_k(θ_0)⟩            [N, N]   m_j = r(x_j, y_j+) − r(x_j, y_j−)
    K_et[i, k] = ⟨∇q_i(θ_0), ∇m_k(θ_0)⟩            [M, N]   (the `inner` matrix A of contributions.py)

and run SGD on the batch-mean BT loss of the linearised model, step t taking the batch B_t (the trainer's own
order, `training_batches`):

    w_k(t)   = σ(−m_k(t))                                   the BT weight, from the linearised margins
    m(t + 1) = m(t) + (η / |B_t|) Σ_{k ∈ B_t} K_tt[:, k] w_k(t)
    q(t + 1) = q(t) + (η / |B_t|) Σ_{k ∈ B_t} K_et[:, k] w_k(t)

This is exact SGD of the model f(θ) = f(θ_0) + J_0 (θ − θ_0): the features J_0 never change, only the weights
do. A model that *is* linear in its trained parameters (an EX-RM whose head alone trains) therefore follows it
exactly, for any η; a real network follows it to first order in η, and `parting_step` says when it stops.
SGD only: Adam's update is not a linear function of the gradient, so no kernel recursion of this form describes
it exactly.

- `linearised_kernels`: K_tt, K_et, m(0) and q(0) from exact per-sequence gradients (`gradient_features`).
- `linearised_trajectory`: the recursion above → `Trajectory`.
- `training_batches`: the batches of each optimizer step of a `TrainConfig` (`epoch_order`, `batch_plan`).
- `parting_step`: the first step where a prediction leaves the actual trajectory by more than a tolerance.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dynamics.attribution.contributions import batch_rewards, check_data, eval_values, pair_features
from dynamics.attribution.evalset import EvalSet
from dynamics.attribution.gradients import gradient_features
from dynamics.batches import PreferenceBatch
from dynamics.delta import reference_is_policy, reward_name
from dynamics.errors import ConfigError, DataError
from dynamics.masks import count_selected, partition, prepare, trainable_mask
from dynamics.objectives import Objective
from dynamics.rewards import GenerativeRM, RewardModel

__all__ = [
    "Kernels",
    "Trajectory",
    "bt_weights",
    "linearised_kernels",
    "linearised_trajectory",
    "parting_step",
    "training_batches",
]


def _jsonable_dict(obj: Any) -> dict[str, Any]:
    from dynamics.outputs import jsonable

    return jsonable({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})


def _save(obj: Any, path: str | os.PathLike[str]) -> Path:
    from dynamics.outputs import write_json_atomic

    return write_json_atomic(path, obj.to_dict())


def bt_weights(margin: np.ndarray) -> np.ndarray:
    """w = σ(−m), elementwise, without overflow for any finite margin (float64, the shape of `margin`): DPO's
    `dynamics.objectives.Objective.margin_weight`."""
    return Objective().margin_weight(margin)


@dataclasses.dataclass(frozen=True)
class Kernels:
    """The kernels at θ_0 of docs/math.md §10.4 and the values they start from.

    Attributes:
      train_kernel: K_tt[j, k] = ⟨∇m_j, ∇m_k⟩, [N, N], symmetric (reward units² per parameter unit²).
      eval_kernel: K_et[i, k] = ⟨∇q_i, ∇m_k⟩, [M, N] (q_i a margin or a single reward).
      train_margin: m_j(θ_0) = r(x_j, y_j+) − r(x_j, y_j−), [N] (0 for an IM-RM at π = π_ref).
      eval_value: q_i(θ_0), [M].
      meta: reward type, eval kind, parameter selection, counts.
    """

    train_kernel: np.ndarray
    eval_kernel: np.ndarray
    train_margin: np.ndarray
    eval_value: np.ndarray
    meta: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """Every field as JSON-ready values."""
        return _jsonable_dict(self)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write `to_dict()` as JSON, atomically; returns the path."""
        return _save(self, path)


@dataclasses.dataclass(frozen=True)
class Trajectory:
    """The linearised trajectory: the values before step 0 and after each of the S steps.

    Attributes:
      train_margin: m(t), [S + 1, N], row t after t steps.
      eval_value: q(t), [S + 1, M].
      batch_sizes: |B_t| of each step, [S].
      meta: η, S, N, M.
    """

    train_margin: np.ndarray
    eval_value: np.ndarray
    batch_sizes: np.ndarray
    meta: dict[str, Any]

    @property
    def steps(self) -> int:
        """S, the number of steps."""
        return len(self.batch_sizes)

    @property
    def train_loss(self) -> np.ndarray:
        """The mean BT loss over all N training pairs, −mean_j ln σ(m_j(t)), [S + 1] (nats)."""
        return np.logaddexp(0.0, -self.train_margin).mean(axis=1)

    @property
    def train_accuracy(self) -> np.ndarray:
        """The fraction of training pairs with m_j(t) > 0 (ties ½), [S + 1]."""
        m = self.train_margin
        return ((m > 0) + 0.5 * (m == 0)).mean(axis=1)

    def to_dict(self) -> dict[str, Any]:
        """Every field, and the loss and accuracy per step, as JSON-ready values."""
        out = _jsonable_dict(self)
        out["train_loss"] = self.train_loss.tolist()
        out["train_accuracy"] = self.train_accuracy.tolist()
        return out

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write `to_dict()` as JSON, atomically; returns the path."""
        return _save(self, path)


def training_batches(config: Any, n: int) -> list[np.ndarray]:
    """The training-pair indices of every optimizer step of a run, in the trainer's order.

    Step s of epoch e = s // ⌈n / batch_size⌉ takes the rows of `batch_plan(epoch_order(seed, e, n), ...)` at
    s mod ⌈n / batch_size⌉ (its micro-batches concatenated); `epochs` epochs, cut at `max_steps` when > 0.

    Args:
      config: a `dynamics.training.TrainConfig` (seed, batch_size, micro_batch_size, epochs, max_steps).
      n: N, the number of training pairs (≥ 1).

    Returns:
      One int64 array of pair indices per step (the last of an epoch may be short), in step order.
    """
    from dynamics.training.batching import batch_plan, epoch_order

    if n < 1:
        raise DataError("no training pairs (N = 0)")
    per_epoch = math.ceil(n / config.batch_size)
    total = per_epoch * config.epochs
    if config.max_steps:
        total = min(total, config.max_steps)
    out: list[np.ndarray] = []
    plan: list[list[np.ndarray]] = []
    for step in range(total):
        epoch, k = divmod(step, per_epoch)
        if k == 0:
            plan = batch_plan(epoch_order(config.seed, epoch, n), config.batch_size, config.micro_batch_size)
        out.append(np.concatenate(plan[k]).astype(np.int64))
    return out


def _check_kernel_inputs(rm, train: PreferenceBatch, evalset: EvalSet, block: int) -> None:
    if isinstance(rm, GenerativeRM):
        raise ConfigError("the linearised trajectory is defined for Bradley-Terry reward models (EX-RM, IM-RM)")
    if block < 1:
        raise ConfigError(f"block must be ≥ 1, got {block}")
    check_data(train, evalset, "the kernels need")


def linearised_kernels(
    rm: RewardModel,
    params,
    train: PreferenceBatch,
    evalset: EvalSet,
    *,
    params_spec: str = "all",
    block: int = 8,
    memory_budget_gb: float = 8.0,
    progress: bool = False,
) -> Kernels:
    """K_tt, K_et, m(θ_0) and q(θ_0) from exact per-sequence gradients at `params` (docs/math.md §10.4).

    One backward pass per sequence (2N + 2M, or 2N + M for single responses); the N training-margin gradients
    and the M eval gradients, each P scalars, are held at once.

    Args:
      rm: the reward model (`ExplicitRM` or `ImplicitRM`).
      params: its parameters θ_0.
      train: the N training pairs.
      evalset: the M eval items (pairs: margins; single responses: rewards).
      params_spec: which parameters train (`dynamics.masks`); the kernels are inner products over them.
      block: rows per backward-pass block.
      memory_budget_gb: refuse to hold more than this many GiB of gradients ((N + M + 2 block) × P floats).
      progress: a progress bar over the backward passes.

    Raises:
      ConfigError: an EX-GRM, block < 1, a mask that selects nothing, gradients over the memory budget.
      DataError: N = 0, M = 0, or a response with no token (naming the row).
    """
    _check_kernel_inputs(rm, train, evalset, block)
    rm, params, spec = prepare(rm, params, params_spec)
    mask = trainable_mask(rm, params, spec)
    n_trained = count_selected(params, mask)
    train_tree, frozen = partition(params, mask)
    itemsize = jnp.dtype(jax.tree.leaves(train_tree)[0].dtype).itemsize
    n, m = train.batch_size, evalset.size
    need = (n + m + 2 * block) * n_trained * itemsize
    if need > memory_budget_gb * 2**30:
        raise ConfigError(
            f"the kernels would hold {need / 2**30:.1f} GiB of gradients ({n} training pairs + {m} eval items of "
            f"{n_trained:,} parameters), over the {memory_budget_gb:g} GiB budget: select fewer parameters or "
            "fewer pairs, or raise the budget"
        )
    from tqdm.auto import tqdm

    total = 2 * n + (2 if evalset.rejected is not None else 1) * m
    with tqdm(total=total, desc="per-sequence gradients", unit="seq", disable=not progress, leave=False) as bar:
        features = gradient_features(rm, train_tree, frozen, block=block, progress=bar)
        eval_feats = pair_features(features, evalset, block)
        diff = pair_features(features, EvalSet(train.chosen, train.rejected), block)  # ∇m_j, [N, P]
    margin = batch_rewards(rm, params, train.chosen) - batch_rewards(rm, params, train.rejected)
    if reference_is_policy(rm, params):
        margin = np.zeros_like(margin)
    meta = {
        "reward": reward_name(rm),
        "eval_kind": evalset.kind,
        "params": spec,
        "n_trained": n_trained,
        "n_train": n,
        "n_eval": m,
        "backward_passes": total,
    }
    return Kernels(
        train_kernel=np.asarray(diff @ diff.T, np.float64),
        eval_kernel=np.asarray(eval_feats @ diff.T, np.float64),
        train_margin=margin,
        eval_value=eval_values(rm, params, evalset),
        meta=meta,
    )


def _check_trajectory_inputs(k_tt, k_et, m0, q0, lr, batches) -> None:
    n = m0.shape[0] if m0.ndim == 1 else -1
    if m0.ndim != 1 or k_tt.shape != (n, n):
        raise DataError(f"train_kernel must be [N, N] and m0 [N]; got {k_tt.shape} and {m0.shape}")
    if q0.ndim != 1 or k_et.shape != (q0.shape[0], n):
        raise DataError(f"eval_kernel must be [M, N] = [{q0.shape[0] if q0.ndim == 1 else '?'}, {n}]; got {k_et.shape}")
    for name, a in (("train_kernel", k_tt), ("eval_kernel", k_et), ("m0", m0), ("q0", q0)):
        if not np.all(np.isfinite(a)):
            raise DataError(f"{name} has a non-finite value")
    if isinstance(lr, bool) or not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        raise ConfigError(f"learning rate must be a finite number > 0, got {lr!r}")
    for s, b in enumerate(batches):
        b = np.asarray(b)
        if b.ndim != 1 or b.size == 0 or not np.issubdtype(b.dtype, np.integer):
            raise DataError(f"batch of step {s} must be a non-empty 1-d array of pair indices, got {b!r}")
        if b.min() < 0 or b.max() >= n:
            raise DataError(
                f"batch of step {s} names pair {int(b.max() if b.max() >= n else b.min())}, outside 0..{n - 1}"
            )


def linearised_trajectory(
    train_kernel: np.ndarray,
    eval_kernel: np.ndarray,
    m0: np.ndarray,
    q0: np.ndarray,
    *,
    lr: float,
    batches: Sequence[np.ndarray],
    objective: Any = None,
) -> Trajectory:
    """SGD of the linearised model: m and q after each step of `batches` (docs/math.md §10.4).

        w = σ(−m(t)),  m(t+1) = m(t) + (η/|B_t|) K_tt[:, B_t] w[B_t],  q(t+1) = q(t) + (η/|B_t|) K_et[:, B_t] w[B_t]

    with another objective's weight w(m) in place of σ(−m) (`objective`, docs/math.md §11; None: Bradley-Terry).

    Args:
      train_kernel: K_tt, [N, N].
      eval_kernel: K_et, [M, N].
      m0: the training margins at θ_0, [N].
      q0: the eval quantities at θ_0, [M].
      lr: η > 0, the SGD learning rate (of the batch-mean loss, as the trainer's).
      batches: the pair indices of each step (`training_batches(config, N)` for a run's order).

    Returns:
      A `Trajectory` of S + 1 rows (float64).

    Raises:
      DataError: shapes that do not fit, a non-finite input, an empty batch or an index outside 0..N−1.
      ConfigError: η not a finite number > 0.
    """
    k_tt, k_et = np.asarray(train_kernel, np.float64), np.asarray(eval_kernel, np.float64)
    m, q = np.asarray(m0, np.float64), np.asarray(q0, np.float64)
    _check_trajectory_inputs(k_tt, k_et, m, q, lr, batches)
    margins, values, sizes = [m], [q], []
    for b in batches:
        b = np.asarray(b, np.int64)
        w = (objective or Objective()).margin_weight(m[b]) * (lr / len(b))
        m = m + k_tt[:, b] @ w
        q = q + k_et[:, b] @ w
        margins.append(m)
        values.append(q)
        sizes.append(len(b))
    meta = {"lr": float(lr), "steps": len(sizes), "n_train": k_tt.shape[0], "n_eval": k_et.shape[0]}
    return Trajectory(np.stack(margins), np.stack(values), np.asarray(sizes, np.int64), meta)


def parting_step(predicted: np.ndarray, actual: np.ndarray, tol: float, *, relative: bool = False) -> int | None:
    """The first step t at which a predicted trajectory leaves the actual one by more than `tol`.

    Rows are steps (row 0 before any step), columns items; a 1-d array is one item. The error of step t is

        absolute:  e_t = max_k |p_tk − a_tk|                                  (the quantity's units)
        relative:  e_t = max_k |p_tk − a_tk| / max_k |a_tk − a_0k|            (a fraction of the largest actual
                   change since step 0; 0/0 counts as 0, x/0 for x > 0 as ∞)

    Args:
      predicted: [S + 1, K] or [S + 1].
      actual: the same shape.
      tol: the tolerance (≥ 0).
      relative: use the relative error.

    Returns:
      The first t with e_t > tol, or None when the prediction stays within `tol` at every step.

    Raises:
      DataError: shapes that differ, or a non-finite value.
      ConfigError: tol < 0 or not finite.
    """
    p, a = np.asarray(predicted, np.float64), np.asarray(actual, np.float64)
    if p.shape != a.shape or p.ndim not in (1, 2) or p.shape[0] == 0:
        raise DataError(
            f"predicted and actual must have the same shape [S + 1, K] or [S + 1]; got {p.shape}, {a.shape}"
        )
    if not (np.all(np.isfinite(p)) and np.all(np.isfinite(a))):
        raise DataError("predicted or actual has a non-finite value")
    if isinstance(tol, bool) or not (isinstance(tol, int | float) and math.isfinite(tol) and tol >= 0):
        raise ConfigError(f"tol must be a finite number ≥ 0, got {tol!r}")
    p, a = p.reshape(p.shape[0], -1), a.reshape(a.shape[0], -1)
    err = np.abs(p - a).max(axis=1)
    if relative:
        scale = np.abs(a - a[0]).max(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            err = np.where(err == 0, 0.0, np.where(scale > 0, err / np.where(scale > 0, scale, 1.0), np.inf))
    over = np.flatnonzero(err > tol)
    return int(over[0]) if over.size else None

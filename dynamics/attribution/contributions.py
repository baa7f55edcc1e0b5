"""The contribution matrix C (M eval items × N training pairs) of one Bradley-Terry step (docs/math.md §10.1).

For training pairs z_j = (x_j, y_j+, y_j−), eval quantities q_i (a margin m_i = r(x̄_i, ȳ_i+) − r(x̄_i, ȳ_i−), or a
single reward r(x̄_i, ȳ_i)) and the SGD step θ' = θ − η ∇L on the batch-mean loss L = (1/N) Σ_j −ln σ(m_j):

    C_ij = η · w_j · ⟨∇q_i, ∇r(x_j, y_j+) − ∇r(x_j, y_j−)⟩,     w_j = σ(r(x_j, y_j−) − r(x_j, y_j+))

over the trainable parameters, so that (1/N) Σ_j C_ij = Δq_i + O(η²), the first-order change of q_i of one
full-batch step (what `dynamics.delta.delta_reward` predicts for single responses). C_ij > 0: training pair j
pushes q_i up.

The gradients come from a `Features` map (`dynamics.attribution.gradients`: exact, or
`dynamics.attribution.projected`: random projections), each sequence's once; the eval features are kept and the
training pairs stream through in blocks, so memory does not grow with N.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from dynamics.attribution.evalset import EvalSet
from dynamics.attribution.gradients import Features, gradient_features, n_backward_passes
from dynamics.batches import PreferenceBatch
from dynamics.chunking import chunks, strip
from dynamics.delta import check_nonempty_responses, reference_is_policy, reward_jit, reward_name
from dynamics.errors import ConfigError, DataError
from dynamics.masks import count_selected, partition, prepare, trainable_mask
from dynamics.objectives import Objective, objective_weight, reward_model
from dynamics.rewards import GenerativeRM, RewardModel

__all__ = [
    "Contributions",
    "Mode",
    "batch_rewards",
    "check_data",
    "contribution_matrix",
    "eval_values",
    "inner_matrix",
    "pair_features",
]

Mode = Literal["exact", "projected"]


@dataclasses.dataclass(frozen=True)
class Contributions:
    """C and its factors (docs/math.md §10.1).

    Attributes:
      contribution: C_ij = η w_j A_ij, [M, N], in reward units (for the IM-RM β × nats).
      inner: A_ij = ⟨∇q_i, ∇r(x_j,y_j+) − ∇r(x_j,y_j−)⟩, [M, N] (projected mode: its unbiased estimate).
      weight: w_j = σ(r_j− − r_j+), [N].
      eval_value: q_i before the step (margin or reward), [M].
      train_chosen_reward, train_rejected_reward: r(x_j, y_j±) before the step, [N].
      meta: reward type, eval kind, mode, projection size and seed, parameter selection, η, counts.
    """

    contribution: np.ndarray
    inner: np.ndarray
    weight: np.ndarray
    eval_value: np.ndarray
    train_chosen_reward: np.ndarray
    train_rejected_reward: np.ndarray
    meta: dict[str, Any]

    @property
    def predicted_change(self) -> np.ndarray:
        """(1/N) Σ_j C_ij: the first-order change of q_i after one full-batch SGD step on all N pairs, [M]."""
        return self.contribution.mean(axis=1)

    def top(self, i: int, n: int = 5) -> tuple[list[int], list[int]]:
        """(the n training pairs with the largest C_ij > 0, the n with the most negative C_ij < 0) for item i."""
        row = self.contribution[i]
        order = np.argsort(-row, kind="stable")
        up = [int(j) for j in order if row[j] > 0][:n]
        down = [int(j) for j in order[::-1] if row[j] < 0][:n]
        return up, down

    def to_dict(self) -> dict[str, Any]:
        """Every field as JSON-ready values."""
        from dynamics.outputs import jsonable

        return jsonable({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write `to_dict()` as JSON, atomically; returns the path."""
        from dynamics.outputs import write_json_atomic

        return write_json_atomic(path, self.to_dict())


def pair_features(features: Features, evalset: EvalSet, block: int = 8) -> np.ndarray:
    """∇q_i as features, [M, dim] (numpy): ∇r(ȳ_i+) − ∇r(ȳ_i−) for pairs, ∇r(ȳ_i) for single responses.

    Filled `block` items at a time into one preallocated array: the peak is M × dim plus one block, never a second
    copy of the M eval gradients (no list of chunks to concatenate, no separate ȳ+ and ȳ− arrays).
    """
    out = None
    for idx, keep in chunks(evalset.size, block):
        rows = idx[:keep]
        f = features(strip(evalset.chosen.select(rows)))
        if evalset.rejected is not None:
            f = f - features(strip(evalset.rejected.select(rows)))
        f = np.asarray(f)
        if out is None:
            out = np.empty((evalset.size, f.shape[1]), f.dtype)
        out[rows] = f
    return out


def eval_values(rm: RewardModel, params, evalset: EvalSet, chunk: int = 16) -> np.ndarray:
    """q_i before the step: the margin r(ȳ+) − r(ȳ−) or the reward r(ȳ), [M] (0 for an IM-RM at π = π_ref)."""
    if reference_is_policy(rm, params):
        return np.zeros(evalset.size)
    value = batch_rewards(rm, params, evalset.chosen, chunk)
    if evalset.rejected is not None:
        value = value - batch_rewards(rm, params, evalset.rejected, chunk)
    return value


def inner_matrix(features: Features, evalset: EvalSet, train: PreferenceBatch, block: int) -> np.ndarray:
    """A_ij = ⟨∇q_i, ∇r(x_j,y_j+) − ∇r(x_j,y_j−)⟩ as features, [M, N] float64: the eval features are kept, the
    training pairs stream through `block` at a time (memory does not grow with N)."""
    eval_feats = pair_features(features, evalset, block)
    inner = np.zeros((evalset.size, train.batch_size), np.float64)
    for idx, keep in chunks(train.batch_size, block):
        part = strip(train.select(idx[:keep]))
        diff = np.asarray(features(part.chosen) - features(part.rejected))
        inner[:, idx[:keep]] = eval_feats @ diff.T
    return inner


def check_data(train: PreferenceBatch, evalset: EvalSet, needs: str) -> None:
    """DataError for N = 0, M = 0 or a response with no token (naming the row); `needs` words the first two."""
    if train.batch_size == 0:
        raise DataError(f"no training pairs (N = 0): {needs} at least one")
    if evalset.size == 0:
        raise DataError(f"no eval items (M = 0): {needs} at least one")
    check_nonempty_responses(train.chosen, "training chosen responses")
    check_nonempty_responses(train.rejected, "training rejected responses")
    check_nonempty_responses(evalset.chosen, "eval chosen responses" if evalset.rejected is not None else "eval")
    if evalset.rejected is not None:
        check_nonempty_responses(evalset.rejected, "eval rejected responses")


def _check(rm, train: PreferenceBatch, evalset: EvalSet, lr: float, mode: str, project: int | None, block: int):
    """The checks of `contribution_matrix` (its Raises section), before any computation."""
    if isinstance(rm, GenerativeRM):
        raise ConfigError("attribution is defined for Bradley-Terry reward models (EX-RM, IM-RM), not the EX-GRM")
    if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        raise ConfigError(f"learning rate must be a finite number > 0, got {lr!r}")
    if mode not in ("exact", "projected"):
        raise ConfigError(f"unknown attribution mode {mode!r}; expected exact or projected")
    if mode == "projected" and (project is None or isinstance(project, bool) or int(project) < 1):
        raise ConfigError(f"projected mode needs a projection size k ≥ 1, got {project!r}")
    if block < 1:
        raise ConfigError(f"block must be ≥ 1, got {block}")
    check_data(train, evalset, "attribution needs")


def _check_memory(n_eval: int, n_params: int, block: int, itemsize: int, budget_gb: float) -> None:
    """Exact mode keeps M eval gradients and 2·block training gradients of P scalars: refuse what exceeds the budget."""
    need = (n_eval + 3 * block) * n_params * itemsize
    if need > budget_gb * 2**30:
        raise ConfigError(
            f"exact attribution would hold {need / 2**30:.1f} GiB of per-sequence gradients ({n_eval} eval items + "
            f"3 × {block} training rows of {n_params:,} parameters), over the {budget_gb:g} GiB budget: use "
            "projected mode (mode='projected', project=k), a smaller parameter selection, or a larger budget"
        )


def contribution_matrix(
    rm: RewardModel,
    params,
    train: PreferenceBatch,
    evalset: EvalSet,
    *,
    params_spec: str = "all",
    lr: float = 1e-3,
    mode: Mode = "exact",
    project: int | None = None,
    seed: int = 0,
    block: int = 8,
    memory_budget_gb: float = 8.0,
    mesh=None,
    progress: bool = False,
    objective: Objective | None = None,
) -> Contributions:
    """C_ij = η w_j ⟨∇q_i, ∇r(x_j,y_j+) − ∇r(x_j,y_j−)⟩ for every eval item i and training pair j (docs/math.md §10.1).

    Args:
      rm: the reward model (`ExplicitRM` or `ImplicitRM`).
      params: its parameters.
      train: the N training pairs.
      evalset: the M eval items (pairs: margins; single responses: rewards).
      params_spec: which parameters train (`dynamics.masks`).
      lr: the learning rate η > 0 of the SGD step.
      mode: "exact" (per-sequence gradients) or "projected" (k-dimensional random projections of them,
        `dynamics.attribution.projected`; A_ij is then an unbiased estimate).
      project: k, the projection size (projected mode).
      seed: the projection's seed.
      block: rows per backward-pass block (memory ∝ block); with a mesh a multiple of its device count.
      memory_budget_gb: exact mode refuses to hold more per-sequence gradients than this.
      mesh: a `jax.sharding.Mesh`; the rows of each block are split over its devices, the parameters replicated.
      progress: a progress bar over the 2N + 2M (or 2N + M) backward passes.
      objective: the training objective (docs/math.md §11): w_j is its per-pair weight (None: DPO's σ(r− − r+));
        SimPO also makes an IM-RM reference-free and length-normalised.

    Raises:
      ConfigError: lr ≤ 0, an unknown mode, k < 1, a mask that selects nothing, exact mode over the budget.
      DataError: N = 0, M = 0, or a response with no token (naming the row).
    """
    _check(rm, train, evalset, lr, mode, project, block)
    rm = reward_model(rm, objective)
    rm, params, spec = prepare(rm, params, params_spec)
    mask = trainable_mask(rm, params, spec)
    n_trained = count_selected(params, mask)
    if mesh is not None:
        from dynamics.sharding import AXIS, replicate

        if block % mesh.shape[AXIS]:
            raise ConfigError(f"block {block} must be a multiple of the {mesh.shape[AXIS]} devices")
        params = replicate(params, mesh)
    train_tree, frozen = partition(params, mask)
    itemsize = jnp.dtype(jax.tree.leaves(train_tree)[0].dtype).itemsize
    if mode == "exact":
        _check_memory(evalset.size, n_trained, block, itemsize, memory_budget_gb)

    from tqdm.auto import tqdm

    total = n_backward_passes(train.batch_size, evalset.size, evalset.rejected is not None)
    bar = tqdm(total=total, desc="per-sequence gradients", unit="seq", disable=not progress, leave=False)
    with bar:
        if mode == "exact":
            features = gradient_features(rm, train_tree, frozen, block=block, mesh=mesh, progress=bar)
        else:
            from dynamics.attribution.projected import projected_features

            features = projected_features(
                rm, train_tree, frozen, k=int(project), seed=seed, block=block, mesh=mesh, progress=bar
            )
        inner = inner_matrix(features, evalset, train, block)
    r_plus, r_minus, w = _training_weights(rm, params, train, objective)
    meta = {
        "reward": reward_name(rm),
        "beta": getattr(rm, "beta", None),
        "eval_kind": evalset.kind,
        "mode": mode,
        "project": None if mode == "exact" else int(project),
        "seed": None if mode == "exact" else int(seed),
        "params": spec,
        "n_trained": n_trained,
        "lr": float(lr),
        "n_train": train.batch_size,
        "n_eval": evalset.size,
        "backward_passes": total,
        "devices": 1 if mesh is None else int(mesh.size),
        "objective": (objective or Objective()).to_dict(),
    }
    return Contributions(
        contribution=lr * inner * w[None, :],
        inner=inner,
        weight=w,
        eval_value=eval_values(rm, params, evalset),
        train_chosen_reward=r_plus,
        train_rejected_reward=r_minus,
        meta=meta,
    )


def _training_weights(rm: RewardModel, params, train: PreferenceBatch, objective: Objective | None):
    """(r+ [N], r− [N], w [N]) before the step, float64; w the objective's per-pair weight (docs/math.md §11)."""
    if reference_is_policy(rm, params):  # an IM-RM at π_θ = π_ref: every reward is 0, no forward pass needed
        r_plus = r_minus = np.zeros(train.batch_size)
    else:
        r_plus, r_minus = batch_rewards(rm, params, train.chosen), batch_rewards(rm, params, train.rejected)
    w = np.asarray(objective_weight(objective, jnp.asarray(r_plus), jnp.asarray(r_minus)), np.float64)
    return r_plus, r_minus, w


def batch_rewards(rm: RewardModel, params, batch, chunk: int = 16) -> np.ndarray:
    """r of every row of `batch`, [B] float64, in jitted chunks of `chunk` rows (reward units)."""
    from dynamics.chunking import batch_chunks

    out = [np.asarray(reward_jit(rm, params, c))[:k] for c, k in batch_chunks(batch, chunk)]
    return np.concatenate(out).astype(np.float64)

"""First-order reward change Δr of unseen pairs after one step on training triples (docs/math.md §3).

For one step θ' = θ + Δθ on the batch-mean Bradley-Terry loss of B triples (x_i, y_i+, y_i−):

    SGD:   Δθ = η · (1/B) Σ_i g_i (∇r(x_i,y_i+) − ∇r(x_i,y_i−)),   g_i = σ(r(x_i,y_i−) − r(x_i,y_i+))
    Δr(u) = ⟨∇r(u), Δθ⟩ + O(η²) = η (1/B) Σ_i g_i [K(u, y_i+) − K(u, y_i−)] + O(η²),  K(u, v) = ⟨∇r(u), ∇r(v)⟩

restricted to the trainable parameters. With Adam (its first step, m = g, v = g²) Δθ is Adam's update and
Δr ≈ ⟨∇r(u), Δθ⟩. Two implementations behind one switch (docs/math.md §3):

- `closed_form`, Assumption 1 only: EX-RM with the head trained, K(u, v) = ⟨h_u, h_v⟩ (arXiv 2507.07981 Eq. (4);
  docs/math.md §3.1); IM-RM with the (untied) unembedding trained,
  K(u, v) = β² Σ_k Σ_l ⟨h_{x̄,ȳ<k}, h_{x,v<l}⟩ ρ_{k,l}(v) (Eq. (5)).
- `ntk`, any mask: one VJP gives the update direction (and, to decompose Δr into kernel terms, one VJP per training
  response); the unseen rewards' JVPs along those directions, vmapped over the directions and chunked over the
  unseen pairs, give Δr and K. No per-example gradient of an unseen pair is ever formed.

Units: Δr is in reward units (for the IM-RM: β × nats). Signs: Δr > 0 means the step raised the reward.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import os
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from dynamics.batches import PairBatch, PreferenceBatch
from dynamics.chunking import batch_chunks, strip
from dynamics.errors import ConfigError, DataError
from dynamics.kernels import dot_rows, im_kernel_matrix, im_prediction_arrays_jit
from dynamics.masks import combine, count_selected, partition, prepare, trainable_mask
from dynamics.models import unembedding
from dynamics.objectives import Objective, objective_weight, reward_model
from dynamics.pair_gradient import TRAIN_CHUNK, first_update, loss_gradient
from dynamics.reward_types import reward_label
from dynamics.rewards import ExplicitRM, GenerativeRM, ImplicitRM, RewardModel

__all__ = [
    "TRACE_COUNTS",
    "DeltaResult",
    "Method",
    "Optimizer",
    "check_nonempty_responses",
    "delta_reward",
    "jvp_rewards",
    "jvp_rewards_jit",
    "reference_is_policy",
    "response_gradients",
    "reward_jit",
    "reward_name",
    "training_rewards",
    "unit_update",
]

Method = Literal["closed_form", "ntk"]
Optimizer = Literal["sgd", "adam"]

#: How many times each hot jitted entry point has been traced (incremented inside the traced bodies, so it counts
#: compilations, not calls). Tests use it to show there is no silent recompilation.
TRACE_COUNTS: collections.Counter[str] = collections.Counter()


@dataclasses.dataclass(frozen=True)
class DeltaResult:
    """Predicted one-step reward changes of unseen pairs, and their decomposition (docs/math.md §3).

    Attributes:
      delta: predicted Δr per unseen pair, [n_unseen].
      reward_before: r(u) before the step, [n_unseen].
      bt_weight: g_i = σ(r(x_i,y_i−) − r(x_i,y_i+)) per training triple, [B].
      train_chosen_reward: r(x_i, y_i+), [B].
      train_rejected_reward: r(x_i, y_i−), [B].
      kernel_chosen: K(u, y_i+) = ⟨∇r(u), ∇r(x_i,y_i+)⟩ over the trainable parameters, [n_unseen, B], or None.
      kernel_rejected: K(u, y_i−), [n_unseen, B], or None.
      meta: reward type and options, mask, method, optimizer, learning rate, number of trained parameters.
    """

    delta: np.ndarray
    reward_before: np.ndarray
    bt_weight: np.ndarray
    train_chosen_reward: np.ndarray
    train_rejected_reward: np.ndarray
    kernel_chosen: np.ndarray | None
    kernel_rejected: np.ndarray | None
    meta: dict[str, Any]

    @property
    def lr(self) -> float:
        """The learning rate η of the step."""
        return float(self.meta["lr"])

    @property
    def kernel_margin(self) -> np.ndarray | None:
        """(1/B) Σ_i g_i [K(u, y_i+) − K(u, y_i−)] per unseen pair: Δr / η for SGD."""
        if self.kernel_chosen is None:
            return None
        w = self.bt_weight / len(self.bt_weight)
        return (self.kernel_chosen - self.kernel_rejected) @ w

    def to_dict(self) -> dict[str, Any]:
        """Every field as JSON-ready values (arrays as lists, None kept)."""
        d = {
            "delta": self.delta,
            "reward_before": self.reward_before,
            "bt_weight": self.bt_weight,
            "train_chosen_reward": self.train_chosen_reward,
            "train_rejected_reward": self.train_rejected_reward,
            "kernel_chosen": self.kernel_chosen,
            "kernel_rejected": self.kernel_rejected,
            "meta": self.meta,
        }
        from dynamics.outputs import jsonable

        return jsonable(d)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write `to_dict()` as JSON, atomically; returns the path."""
        from dynamics.outputs import write_json_atomic

        return write_json_atomic(path, self.to_dict())


def reward_name(rm: RewardModel) -> str:
    """The registry label of a reward model ("EX-RM", "EX-RM (mean)", "IM-RM", "IM-RM (no ref)", "EX-GRM")."""
    if isinstance(rm, ExplicitRM):
        kind = "ex" if rm.pooling == "last" else "ex-mean"
    elif isinstance(rm, ImplicitRM):
        kind = "im-noref" if rm.reference_free else "im"
    else:
        kind = "exgrm"
    return reward_label(kind)


def check_nonempty_responses(batch: PairBatch, what: str) -> None:
    """Raise `DataError` naming the first row of `batch` whose response has no token."""
    counts = np.asarray(batch.response_mask).sum(-1)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        raise DataError(f"{what}: row {int(empty[0])} has an empty response (no response tokens)")


def _reward(rm: RewardModel, params, batch):
    TRACE_COUNTS["reward"] += 1
    return rm.reward(params, batch)


#: `rm.reward(params, batch)` jitted (the reward model static): r in reward units (docs/math.md §1).
reward_jit = jax.jit(_reward, static_argnums=0)


def reference_is_policy(rm: RewardModel, params) -> bool:
    """Whether an IM-RM's π_θ has exactly π_ref's parameters (the same arrays, or bitwise equal ones)."""
    if not isinstance(rm, ImplicitRM) or rm.reference_free or "ref" not in params:
        return False
    a, b = jax.tree.leaves(params["lm"]), jax.tree.leaves(params["ref"])
    if len(a) != len(b):
        return False
    return all(x is y or (x.shape == y.shape and bool(jnp.array_equal(x, y))) for x, y in zip(a, b, strict=True))


def training_rewards(rm: RewardModel, params, train: PreferenceBatch) -> tuple[np.ndarray, np.ndarray]:
    """(r(x_i, y_i+), r(x_i, y_i−)) before the step, each [B] (docs/math.md §3)."""
    t = strip(train)
    return np.asarray(reward_jit(rm, params, t.chosen)), np.asarray(reward_jit(rm, params, t.rejected))


def unit_update(
    rm: RewardModel,
    train_tree,
    frozen,
    train: PreferenceBatch,
    optimizer: Optimizer,
    objective: Objective | None = None,
) -> Any:
    """Δθ / η: the parameter change of one step with learning rate 1 (SGD: −∇L; Adam: its first update).

    Both are exactly linear in η (optax scales the final update by −η), so Δθ(η) = η · unit_update
    (docs/math.md §3.3). L is the batch mean of the objective's per-pair loss (docs/math.md §11; None: DPO's
    Bradley-Terry loss).
    """
    TRACE_COUNTS["unit_update"] += 1
    t = strip(train)
    objective = objective or Objective()

    def loss(tr):
        p = combine(tr, frozen)
        return objective.loss(rm.reward(p, t.chosen), rm.reward(p, t.rejected))

    return first_update(jax.grad(loss)(train_tree), optimizer, train_tree)


def response_gradients(rm: RewardModel, train_tree, frozen, train: PreferenceBatch) -> Any:
    """∇r(x_i, y_i+) for i < B, then ∇r(x_i, y_i−): a tree whose leaves are stacked [2B, ...].

    One VJP of the 2B training rewards, evaluated at the 2B unit cotangents (vmapped): the only gradients ever
    formed are those of the training responses (the kernel terms K(u, y_i±) of docs/math.md §3).
    """
    TRACE_COUNTS["response_gradients"] += 1
    t = strip(train)

    def rewards(tr):
        p = combine(tr, frozen)
        return jnp.concatenate([rm.reward(p, t.chosen), rm.reward(p, t.rejected)])

    r, vjp = jax.vjp(rewards, train_tree)
    eye = jnp.eye(r.shape[0], dtype=r.dtype)
    return jax.vmap(lambda c: vjp(c)[0])(eye)


def jvp_rewards(rm: RewardModel, train_tree, frozen, tangents, unseen: PairBatch):
    """(r(u) [C], ⟨∇r(u), t_j⟩ [n_dir, C]) for one chunk of unseen pairs and stacked tangents (docs/math.md §3).

    One forward-mode JVP per tangent direction t_j (vmapped), so ⟨∇r(u), Δθ/η⟩ is Δr/η to first order without
    forming ∇r(u). Used by `delta_reward` (method ntk) and the Δr benchmark.

    Args:
      rm: the reward model (static under `jvp_rewards_jit`).
      train_tree, frozen: the trainable and frozen parts of the parameters (`dynamics.masks.partition`).
      tangents: a tree like `train_tree` with a leading [n_dir] axis.
      unseen: one chunk of C unseen pairs (`dynamics.chunking.batch_chunks`).
    """
    TRACE_COUNTS["jvp_rewards"] += 1

    def f(tr):
        return rm.reward(combine(tr, frozen), unseen)

    def one(t):
        return jax.jvp(f, (train_tree,), (t,))

    primal, tang = jax.vmap(one, out_axes=(None, 0))(tangents)
    return primal, tang


#: `jvp_rewards` jitted (the reward model static).
jvp_rewards_jit = jax.jit(jvp_rewards, static_argnums=(0,))
_unit_update_jit = jax.jit(unit_update, static_argnums=(0, 4, 5))
_response_gradients_jit = jax.jit(response_gradients, static_argnums=0)


def _ntk(
    rm: RewardModel,
    params,
    mask,
    train: PreferenceBatch,
    unseen: PairBatch,
    optimizer: Optimizer,
    decompose: bool,
    chunk_size: int,
    progress: bool,
    mesh=None,
    objective: Objective | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(reward before, Δr per unit η, kernel [n_unseen, 2B] or None) by VJP + chunked, vmapped JVPs."""
    from tqdm.auto import tqdm

    train_tree, frozen = partition(params, mask)
    if train.batch_size <= TRAIN_CHUNK:
        update = _unit_update_jit(rm, train_tree, frozen, strip(train), optimizer, objective)
    else:  # one backward pass per chunk of pairs: memory does not grow with B
        update = first_update(loss_gradient(rm, train_tree, frozen, train, objective), optimizer, train_tree)
    directions = [jax.tree.map(lambda x: x[None], update)]
    if decompose:
        directions.append(_response_gradients_jit(rm, train_tree, frozen, strip(train)))
    tangents = jax.tree.map(lambda *xs: jnp.concatenate(xs), *directions)
    before, delta, kern = [], [], []
    chunks = batch_chunks(unseen, chunk_size, mesh)
    for chunk, keep in tqdm(chunks, desc="Δr (JVP)", disable=not progress or len(chunks) < 3, leave=False):
        r, t = jvp_rewards_jit(rm, train_tree, frozen, tangents, chunk)
        r, t = np.asarray(r)[:keep], np.asarray(t)[:, :keep]
        before.append(r)
        delta.append(t[0])
        if decompose:
            kern.append(t[1:].T)
    return np.concatenate(before), np.concatenate(delta), (np.concatenate(kern) if decompose else None)


def _features(rm, params, batch):
    TRACE_COUNTS["features"] += 1
    return rm.features(params, batch)


_features_jit = jax.jit(_features, static_argnums=0)


def _closed_form(
    rm: RewardModel, params, train: PreferenceBatch, unseen: PairBatch, chunk_size: int, vocab_chunk: int
) -> tuple[np.ndarray, np.ndarray]:
    """(reward before, kernel [n_unseen, 2B]) from Eq. (4) (EX-RM, head) or Eq. (5) (IM-RM, unembedding)."""
    t = strip(train)
    train_rows = [t.chosen, t.rejected]
    before, kern = [], []
    if isinstance(rm, ExplicitRM):
        feats = functools.partial(_features_jit, rm)
        f_train = jnp.concatenate([feats(params, b) for b in train_rows])  # [2B, D]
        for chunk, keep in batch_chunks(unseen, chunk_size):
            f_u = feats(params, chunk)
            before.append(np.asarray(jnp.einsum("ND,D->N", f_u, params["head"]["u"].astype(f_u.dtype)))[:keep])
            kern.append(np.asarray(dot_rows(f_u, f_train))[:keep])
        return np.concatenate(before), np.concatenate(kern)

    lm = rm.lm
    W = unembedding(params["lm"])
    cap = lm.config.final_logit_softcap
    prep = im_prediction_arrays_jit
    h_v, tok_v, m_v = (jnp.concatenate(x) for x in zip(*[prep(lm, params["lm"], b) for b in train_rows], strict=True))
    pair_kernel = im_kernel_matrix
    for chunk, keep in batch_chunks(unseen, chunk_size):
        h_u, tok_u, m_u = prep(lm, params["lm"], chunk)
        k = pair_kernel(h_u, tok_u, m_u, h_v, tok_v, m_v, W, cap, vocab_chunk)
        kern.append(np.asarray(k)[:keep] * rm.beta**2)
        before.append(np.asarray(reward_jit(rm, params, chunk))[:keep])
    return np.concatenate(before), np.concatenate(kern)


def delta_reward(
    rm: RewardModel,
    params,
    train: PreferenceBatch,
    unseen: PairBatch,
    *,
    params_spec: str = "all",
    lr: float = 1e-3,
    optimizer: Optimizer = "sgd",
    method: Method = "ntk",
    decompose: bool | None = None,
    chunk_size: int = 16,
    vocab_chunk: int = 8192,
    progress: bool = False,
    mesh=None,
    param_sharding: str = "replicate",
    objective: Objective | None = None,
) -> DeltaResult:
    """Predicted Δr of every unseen pair after one step on `train` (docs/math.md §3, Eqs. (4), (5)).

    Args:
      rm: the reward model (`ExplicitRM` or `ImplicitRM`).
      params: its parameters (see `dynamics.rewards`).
      train: the training triple(s); the loss is their batch mean, as in training.
      unseen: the unseen pairs (x̄, ȳ).
      params_spec: the trainable set (`dynamics.masks`): head | unembed | output | last:K | lora | all | re:PATTERN.
      lr: learning rate η > 0.
      optimizer: "sgd" (the paper's analysis) or "adam" (its first step).
      method: "ntk" (any mask) or "closed_form" (Assumption 1: EX-RM head / IM-RM unembedding, SGD).
      decompose: also return the kernel terms K(u, y_i±) (one more JVP direction per training response);
        default: yes for at most 8 training triples.
      chunk_size: unseen pairs per JVP batch (memory ∝ chunk_size × directions).
      vocab_chunk: vocabulary chunk of the IM-RM closed form (ρ).
      progress: show a progress bar over chunks.
      mesh: a `jax.sharding.Mesh` (`dynamics.sharding.make_mesh`) to split each chunk of unseen pairs over its
        devices (data parallel); `chunk_size` must be a multiple of the device count. Method ntk.
      param_sharding: with a mesh, "replicate" the parameters or shard them ("fsdp").
      objective: the training objective (`dynamics.objectives`, docs/math.md §11); None is DPO's Bradley-Terry
        loss. Its per-pair weight replaces σ(r− − r+) in `bt_weight`; SimPO also makes an IM-RM reference-free
        and length-normalised (`dynamics.objectives.reward_model`).

    Raises:
      ConfigError: lr ≤ 0, an unknown option, a mask that selects nothing, or `closed_form` with a mask,
        optimizer or model it does not cover.
      DataError: an unseen pair or a training response with no response token.
    """
    _check_inputs(rm, train, unseen, lr=lr, method=method, optimizer=optimizer, chunk_size=chunk_size)
    was_tied = rm.lm.config.tie_embeddings
    rm = reward_model(rm, objective)
    rm, params, spec = prepare(rm, params, params_spec)
    mask = trainable_mask(rm, params, spec)
    B = train.batch_size
    decompose = B <= 8 if decompose is None else decompose
    if method == "closed_form":
        _check_closed_form(rm, spec, optimizer)
    if mesh is not None:
        params, train = _place_on_mesh(params, train, mesh, method, chunk_size, param_sharding)
    r_plus, r_minus = training_rewards(rm, params, train)
    if reference_is_policy(rm, params):
        r_plus, r_minus = np.zeros_like(r_plus), np.zeros_like(r_minus)
    g = np.asarray(objective_weight(objective, jnp.asarray(r_plus), jnp.asarray(r_minus)))
    if method == "ntk":
        before, unit_delta, kern = _ntk(
            rm, params, mask, train, unseen, optimizer, decompose, chunk_size, progress, mesh, objective
        )
        if reference_is_policy(rm, params):
            # π = π_ref: every IM-RM reward is 0 by definition. Decided structurally, not by comparing two
            # differently compiled forward passes whose rounding differs (≈ 1e-7 in float32).
            before = np.zeros_like(before)
        delta = lr * unit_delta
    else:
        before, kern = _closed_form(rm, params, train, unseen, chunk_size, vocab_chunk)
        delta = lr * ((kern[:, :B] - kern[:, B:]) @ (g / B))
    meta = {
        "reward": reward_name(rm),
        "beta": getattr(rm, "beta", None),
        "pooling": getattr(rm, "pooling", None),
        "params": spec,
        "n_trained": count_selected(params, mask),
        "untied": was_tied and not rm.lm.config.tie_embeddings,
        "method": method,
        "optimizer": optimizer,
        "lr": float(lr),
        "n_train": B,
        "n_unseen": unseen.batch_size,
        "chunk_size": chunk_size,
        "devices": 1 if mesh is None else int(mesh.size),
        "param_sharding": None if mesh is None else param_sharding,
        "objective": (objective or Objective()).to_dict(),
    }
    return DeltaResult(
        delta=np.asarray(delta, np.float64),
        reward_before=np.asarray(before, np.float64),
        bt_weight=g.astype(np.float64),
        train_chosen_reward=r_plus.astype(np.float64),
        train_rejected_reward=r_minus.astype(np.float64),
        kernel_chosen=None if kern is None else np.asarray(kern[:, :B], np.float64),
        kernel_rejected=None if kern is None else np.asarray(kern[:, B:], np.float64),
        meta=meta,
    )


def _check_inputs(
    rm: RewardModel,
    train: PreferenceBatch,
    unseen: PairBatch,
    *,
    lr: float,
    method: str,
    optimizer: str,
    chunk_size: int,
) -> None:
    """The option and data checks of `delta_reward` (its Raises section), before any computation."""
    if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        raise ConfigError(f"learning rate must be a finite number > 0, got {lr!r}")
    if method not in ("ntk", "closed_form"):
        raise ConfigError(f"unknown method {method!r}; expected ntk or closed_form")
    if optimizer not in ("sgd", "adam"):
        raise ConfigError(f"unknown optimizer {optimizer!r}; expected sgd or adam")
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be ≥ 1, got {chunk_size}")
    if isinstance(rm, GenerativeRM):
        raise ConfigError("Δr is defined for Bradley-Terry reward models (EX-RM, IM-RM), not the EX-GRM")
    check_nonempty_responses(unseen, "unseen pairs")
    check_nonempty_responses(train.chosen, "training chosen responses")
    check_nonempty_responses(train.rejected, "training rejected responses")


def _check_closed_form(rm: RewardModel, spec: str, optimizer: str) -> None:
    """Raise `ConfigError` unless the closed form covers this case: Assumption 1 and SGD (docs/math.md §3.1, §3.2)."""
    covered = "head" if isinstance(rm, ExplicitRM) else "unembed"
    if spec != covered:
        raise ConfigError(
            f"closed_form covers Assumption 1 only ({reward_name(rm)}: parameter selection {covered!r}); "
            f"got {spec!r}: use method ntk"
        )
    if optimizer != "sgd":
        raise ConfigError("closed_form is the SGD step of docs/math.md §3; Adam's step needs method ntk")
    if isinstance(rm, ImplicitRM) and rm.lm.config.final_logit_softcap is not None:
        raise ConfigError("closed_form (Eq. (5)) assumes logits W h; Gemma 2's final soft-cap needs method ntk")
    if getattr(rm, "length_normalised", False):
        raise ConfigError("closed_form (Eq. (5)) is for the summed log-probability; a length-normalised IM-RM "
                          "(SimPO) needs method ntk")  # fmt: skip


def _place_on_mesh(params, train: PreferenceBatch, mesh, method: str, chunk_size: int, param_sharding: str):
    """(params placed per `param_sharding`, the training batch replicated) on `mesh`, after checking the options."""
    from dynamics.sharding import AXIS, replicate, shard_params

    if method != "ntk":
        raise ConfigError("a device mesh is supported with method ntk")
    if chunk_size % mesh.shape[AXIS]:
        raise ConfigError(f"chunk_size {chunk_size} must be a multiple of the {mesh.shape[AXIS]} devices")
    return shard_params(params, mesh, param_sharding), replicate(strip(train), mesh)

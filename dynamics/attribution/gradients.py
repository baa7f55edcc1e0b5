"""Per-sequence reward gradients ∇r(x, y) over the trainable parameters, one backward pass per sequence.

The contribution matrix of docs/math.md §10 needs the gradient of every training response and of every eval item's
reward (or margin) exactly once: 2N + 2M backward passes for M eval pairs, 2N + M for M single responses, the floor
for exact attribution. `gradient_features` computes them in fixed-size blocks of rows (one compiled program per
block shape), each row's gradient by its own backward pass (`jax.vmap` of `jax.grad` of a one-row reward), and
returns them flattened to rows of a [n, P] matrix, P the number of trainable scalars, in the order of
`dynamics.masks.leaf_paths`.

For an IM-RM the reference log-probability is a constant of θ, so ∇r_IM = β ∇ln π_θ(y|x): the gradient pass skips
the reference forward pass (`policy_reward`), which halves its cost and changes no number.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from dynamics.batches import PairBatch
from dynamics.chunking import batch_chunks
from dynamics.masks import combine
from dynamics.rewards import ImplicitRM, RewardModel

__all__ = ["Features", "flat_rows", "gradient_features", "n_backward_passes", "policy_reward", "row_gradients"]

#: A map from a `PairBatch` of n sequences to their gradient features [n, dim] (exact or projected).
Features = Callable[[PairBatch], jax.Array]


def policy_reward(rm: RewardModel, params, batch: PairBatch) -> jax.Array:
    """r(x, y) [B] up to a constant of θ: the IM-RM without its reference term, any other reward unchanged.

    ∇_θ of this is ∇_θ r exactly (docs/math.md §1: ln π_ref does not depend on θ).
    """
    if isinstance(rm, ImplicitRM) and not rm.reference_free:
        return rm.reward(params, batch, ref_logprob=jnp.zeros(jnp.asarray(batch.tokens).shape[0]))
    return rm.reward(params, batch)


def flat_rows(tree) -> jax.Array:
    """A tree whose leaves are stacked [n, ...] as one [n, P] matrix (leaves in tree order, each flattened)."""
    leaves = [x for x in jax.tree.leaves(tree) if x is not None]
    n = leaves[0].shape[0]
    return jnp.concatenate([x.reshape(n, -1) for x in leaves], axis=1)


def row_gradients(rm: RewardModel, train_tree, frozen, batch: PairBatch) -> jax.Array:
    """∇r(x_n, y_n) for every row n of `batch`, flattened: [n, P] (one backward pass per row).

    Args:
      rm: the reward model (static under jit).
      train_tree, frozen: the trainable and frozen parameters (`dynamics.masks.partition`).
      batch: a stripped `PairBatch` [n, T].
    """

    def one(tr, tokens, attention, response):
        row = PairBatch(tokens[None], attention[None], response[None])
        return policy_reward(rm, combine(tr, frozen), row)[0]

    grads = jax.vmap(jax.grad(one), in_axes=(None, 0, 0, 0))(
        train_tree, jnp.asarray(batch.tokens), jnp.asarray(batch.attention_mask), jnp.asarray(batch.response_mask)
    )
    return flat_rows(grads)


_row_gradients_jit = jax.jit(row_gradients, static_argnums=0)


def gradient_features(
    rm: RewardModel,
    train_tree,
    frozen,
    *,
    block: int = 8,
    mesh=None,
    progress: Any = None,
) -> Features:
    """The exact features: `batch` ↦ [∇r(x_n, y_n)]_n, [n, P], computed `block` rows at a time.

    Args:
      rm: the reward model.
      train_tree, frozen: the partitioned parameters.
      block: rows per compiled backward pass (memory ∝ block × P); with a mesh, a multiple of its devices.
      mesh: a `jax.sharding.Mesh`: each block's rows are split over its devices.
      progress: a tqdm-like bar to advance by the number of rows done, or None.
    """

    def features(batch: PairBatch) -> jax.Array:
        out = []
        for chunk, keep in batch_chunks(batch, block, mesh):
            out.append(_row_gradients_jit(rm, train_tree, frozen, chunk)[:keep])
            if progress is not None:
                progress.update(keep)
        return jnp.concatenate(out) if len(out) > 1 else out[0]

    return features


def n_backward_passes(n_train: int, n_eval: int, eval_pairs: bool) -> int:
    """2N + 2M (eval pairs) or 2N + M (single responses): the per-sequence gradients exact attribution needs."""
    return 2 * n_train + (2 if eval_pairs else 1) * n_eval

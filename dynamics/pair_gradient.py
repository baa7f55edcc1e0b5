"""∇L of a batch-mean pair loss, accumulated over chunks of pairs, and the optimizer's first update from it.

L = (1/B) Σ_i ℓ(r(x_i, y_i+) − r(x_i, y_i−)) (docs/math.md §3, §11). One backward pass through all B pairs
holds the activations of 2B sequences at once: on SmolLM2-135M with every parameter trainable, 80 Persona pairs
already take more than 24 GiB. `loss_gradient` sums the gradients of chunks of `chunk` pairs instead, so memory
does not grow with B. The result is the same gradient; only the order of the float sums changes.
`dynamics.delta` and `dynamics.step_check` use it for batches larger than one chunk.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dynamics.batches import PreferenceBatch
from dynamics.chunking import chunks, strip
from dynamics.errors import ConfigError
from dynamics.masks import combine
from dynamics.objectives import Objective

__all__ = ["TRAIN_CHUNK", "first_update", "loss_gradient"]

#: Pairs per backward pass of `loss_gradient` (16 sequences).
TRAIN_CHUNK = 8


def _chunk_gradient(rm, train_tree, frozen, batch: PreferenceBatch, weight, objective: Objective):
    """∇ Σ_i weight_i ℓ_i over one chunk (weight 0 on the padding rows)."""

    def total(tr):
        p = combine(tr, frozen)
        losses = objective.losses(rm.reward(p, batch.chosen), rm.reward(p, batch.rejected))
        return jnp.sum(weight.astype(losses.dtype) * losses)

    return jax.grad(total)(train_tree)


_chunk_gradient_jit = jax.jit(_chunk_gradient, static_argnums=(0, 5))


def loss_gradient(
    rm, train_tree, frozen, train: PreferenceBatch, objective: Objective | None = None, chunk: int = TRAIN_CHUNK
) -> Any:
    """∇L = (1/B) Σ_i ∇ℓ_i over the trainable tree, in chunks of `chunk` pairs (the module docstring).

    Args:
      rm: the reward model (static under jit).
      train_tree, frozen: the trainable and frozen parameters (`dynamics.masks.partition`).
      train: the B training pairs.
      objective: the per-pair loss (None: Bradley-Terry).
      chunk: pairs per backward pass (memory ∝ chunk).
    """
    objective = objective or Objective()
    t = strip(train)
    total = None
    for idx, keep in chunks(t.batch_size, chunk):
        weight = jnp.asarray(np.arange(len(idx)) < keep)
        g = _chunk_gradient_jit(rm, train_tree, frozen, strip(t.select(idx)), weight, objective)
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    return jax.tree.map(lambda x: x / t.batch_size, total)


def first_update(grads, optimizer: str, train_tree, lr: float = 1.0) -> Any:
    """The first update of SGD (−η ∇L) or of Adam (optax.adam(η), its first step) from the gradient ∇L.

    Raises:
      ConfigError: an optimizer other than sgd or adam.
    """
    if optimizer == "sgd":
        return jax.tree.map(lambda g: -lr * g, grads)
    if optimizer == "adam":
        opt = optax.adam(lr)
        updates, _ = opt.update(grads, opt.init(train_tree), train_tree)
        return updates
    raise ConfigError(f"unknown optimizer {optimizer!r}; expected sgd or adam")

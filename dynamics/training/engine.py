"""The jitted training step: per-pair losses from hidden states, gradient accumulation, the optimizer update.

`compile_step(rm, start, optimizer)` returns the jitted functions of one (reward model, frozen prefix,
optimizer), shared by the runs of a process; `accumulate_gradients` runs one optimizer step's micro-batches.
The gradient of a step is Σ_i ∇ℓ_i over its micro-batches divided by the number of rows, so accumulation
equals the full-batch step of the batch-mean loss, also for a short last batch (docs/math.md §6).
The reward math is `dynamics.rewards`' (its functions of hidden states), read from `hidden_states`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dynamics.masks import combine
from dynamics.models import Params
from dynamics.objectives import Objective
from dynamics.rewards import (
    GenerativeRM,
    ImplicitRM,
    RewardModel,
    answer_logprobs_from_hidden,
    bt_losses,
    exgrm_losses,
    gathered_response_logprob,
    gathered_token_logprobs,
    head_reward,
    pooled_features,
    response_lengths,
)
from dynamics.sharding import data_devices, place_rows
from dynamics.training.batching import PairSet, pass_limit, pass_rows, split_passes
from dynamics.training.build import make_optimizer
from dynamics.training.config import OptimizerSpec, TrainConfig
from dynamics.training.hidden import hidden_states, lower_hidden, packed_hidden, packed_lower_hidden
from dynamics.training.rows import Rows, response_index, take_rows

__all__ = ["CompiledStep", "accumulate_gradients", "compile_step", "pair_losses", "sequence_rewards"]


def sequence_rewards(rm: RewardModel, params: Params, rows: Rows, hidden: Any) -> Any:
    """r(x, y) [B] of an EX-RM (⟨u, h⟩, docs/math.md §1, §6.4) or EX-GRM (π("Yes"), §6.5) from hidden states."""
    if isinstance(rm, GenerativeRM):
        lp = answer_logprobs_from_hidden(rm.lm, params["lm"], hidden, rows.attention_mask, rm.yes_id, rm.no_id)
        return jnp.exp(lp[:, 0])
    features = pooled_features(hidden, rows.attention_mask, rows.response_mask, rm.pooling)
    return head_reward(features, params["head"]["u"])


def _policy_logprob(rm: RewardModel, lm_params: Params, rows: Rows, hidden: Any) -> Any:
    return gathered_response_logprob(rm.lm, lm_params, hidden, rows.resp_src, rows.resp_tgt, rows.resp_valid)


def pair_losses(
    rm: RewardModel, params: Params, both: Rows, ref: Any, b: int, start: int, objective: Objective | None = None
) -> tuple[Any, Any, Any]:
    """Per-pair losses ℓ_i [b] and rewards (r+, r−) of b pairs whose chosen rows come first in `both` [2b, T].

    BT (docs/math.md §1): ℓ_i = −ln σ(r(x_i,y_i+) − r(x_i,y_i−)), with r_IM = β (ln π_θ − ln π_ref) and the cached
    ln π_ref `ref` [2b]; another `objective` (docs/math.md §11) replaces ℓ (None: BT). EX-GRM (docs/math.md §6.5):
    `dynamics.rewards.exgrm_losses`.
    """
    hidden = hidden_states(rm.lm, params["lm"], both, start)
    if isinstance(rm, GenerativeRM):
        lp = answer_logprobs_from_hidden(rm.lm, params["lm"], hidden, both.attention_mask, rm.yes_id, rm.no_id)
        rewards = jnp.exp(lp[:, 0])
        return exgrm_losses(lp[:b], lp[b:]), rewards[:b], rewards[b:]
    if isinstance(rm, ImplicitRM):
        rewards = rm.beta * (_policy_logprob(rm, params["lm"], both, hidden) - ref)
        if rm.length_normalised:
            rewards = rewards / response_lengths(both.resp_valid)
    else:
        rewards = sequence_rewards(rm, params, both, hidden)
    losses = bt_losses if objective is None else objective.losses
    return losses(rewards[:b], rewards[b:]), rewards[:b], rewards[b:]


def _counted(traces: dict[str, int], name: str, fn: Callable) -> Callable:
    """`fn`, counting in traces[name] how often it runs (under jit: how often it is traced)."""

    @functools.wraps(fn)
    def wrapper(*args):
        traces[name] += 1
        return fn(*args)

    return wrapper


def _micro_grads(rm: RewardModel, start: int, objective: Any, train: Params, frozen: Params, both: Rows, ref: Any):
    """(Σ_i ∇ℓ_i over the pass's pairs, Σ_i ℓ_i, wins with ties ½)."""
    b = both.tokens.shape[0] // 2

    def total(t):
        losses, rc, rr = pair_losses(rm, combine(t, frozen), both, ref, b, start, objective)
        return jnp.sum(losses), (losses, rc, rr)

    (_, (losses, rc, rr)), grads = jax.value_and_grad(total, has_aux=True)(train)
    wins = jnp.sum((rc > rr).astype(jnp.float32)) + 0.5 * jnp.sum((rc == rr).astype(jnp.float32))
    return grads, jnp.sum(losses), wins


def _apply(tx: Any, train: Params, opt_state: Any, acc: Params, n: Any):
    """One optimizer update with the mean gradient acc / n; returns (params, state, ‖mean gradient‖₂)."""
    import optax

    grads = jax.tree.map(lambda g: g / n.astype(g.dtype), acc)
    updates, opt_state = tx.update(grads, opt_state, train)
    return optax.apply_updates(train, updates), opt_state, optax.tree.norm(grads)


def _score(rm: RewardModel, start: int, params: Params, rows: Rows):
    return sequence_rewards(rm, params, rows, hidden_states(rm.lm, params["lm"], rows, start))


def _logprob(rm: RewardModel, start: int, lm_params: Params, rows: Rows):
    if rows.resp_owner is not None:  # packed prefix trees: each response node once, summed per row by its owner
        h = packed_hidden(rm.lm, lm_params, rows, start)  # [b, P, D]
        lp = gathered_token_logprobs(rm.lm, lm_params, h, rows.resp_src, rows.resp_tgt, rows.resp_valid)
        return rows.resp_owner.astype(lp.dtype) @ jnp.reshape(lp, (-1,))  # [b, K] → [b·K], owner [B, b·K]
    return _policy_logprob(rm, lm_params, rows, hidden_states(rm.lm, lm_params, rows, start))


def _lower(rm: RewardModel, start: int, lm_params: Params, tokens: Any, mask: Any):
    return lower_hidden(rm.lm, lm_params, tokens, mask, start)


def _lower_packed(rm: RewardModel, start: int, lm_params: Params, rows: Rows):
    return packed_lower_hidden(rm.lm, lm_params, rows, start)


class CompiledStep:
    """The jitted functions of one (reward model, frozen prefix, optimizer), each with a trace counter.

    Attributes:
      rm: the reward model.
      tx: the optax transformation.
      start: blocks below this index are frozen and their output is cached (0: no cache).
      traces: how often each function was traced.
      first_micro_step: (train, frozen, rows [2b], ref [2b] | None) → (Σ gradients, Σ losses, wins).
      micro_step: (train, frozen, acc, rows, ref) → (acc + Σ gradients, Σ losses, wins); `acc` is donated.
      apply: (train, opt_state, acc, n rows) → (train, opt_state, gradient norm); train and opt_state are donated.
      score: (params, rows) → rewards [B] (EX-RM, EX-GRM).
      logprob: (lm_params, rows with response positions) → ln π(y|x) [B].
      lower: (lm_params, tokens, mask) → the residual stream after the frozen blocks.
      lower_packed: (lm_params, packed rows) → the same for the packed rows [b, P, D] (`packed_eval`).
    """

    def __init__(self, rm: RewardModel, tx: Any, start: int, objective: Objective | None = None):
        self.rm, self.tx, self.start, self.objective = rm, tx, start, objective
        self.traces: dict[str, int] = {
            "micro_step": 0,
            "apply": 0,
            "score": 0,
            "logprob": 0,
            "lower": 0,
            "lower_packed": 0,
        }
        first = _counted(self.traces, "micro_step", functools.partial(_micro_grads, rm, start, objective))

        def accumulate(train, frozen, acc, both, ref):
            grads, loss, wins = first(train, frozen, both, ref)
            return jax.tree.map(lambda a, g: a + g.astype(a.dtype), acc, grads), loss, wins

        self.first_micro_step = jax.jit(first)
        self.micro_step = jax.jit(accumulate, donate_argnums=(2,))
        # donating the parameters and the optimizer state lets XLA update them in place: on CPU,
        # allocating fresh outputs for a 135M-parameter Adam step costs several times the arithmetic
        self.apply = jax.jit(_counted(self.traces, "apply", functools.partial(_apply, tx)), donate_argnums=(0, 1))
        self.score = jax.jit(_counted(self.traces, "score", functools.partial(_score, rm, start)))
        self.logprob = jax.jit(_counted(self.traces, "logprob", functools.partial(_logprob, rm, start)))
        self.lower = jax.jit(_counted(self.traces, "lower", functools.partial(_lower, rm, start)))
        self.lower_packed = jax.jit(_counted(self.traces, "lower_packed", functools.partial(_lower_packed, rm, start)))

    def prepare(self, rows: Rows, idx: np.ndarray, bucket: int) -> Rows:
        """Rows `idx` of one sequence set cut to their bucketed length, with IM-RM response positions added."""
        out = take_rows([rows], idx, bucket)[0]
        return response_index(out, bucket) if isinstance(self.rm, ImplicitRM) else out


@functools.lru_cache(maxsize=16)
def compile_step(
    rm: RewardModel, start: int, optimizer: OptimizerSpec, objective: Objective | None = None
) -> CompiledStep:
    """The jitted functions of a reward model, frozen prefix, optimizer and objective, shared by the runs of one
    process.

    Args:
      rm: the reward model (hashable).
      start: blocks below this index are frozen and their output is cached (`frozen_prefix`; 0: no cache).
      optimizer: the optimizer (`OptimizerSpec.from_config(config)`).
      objective: the preference loss (`TrainConfig.objective_spec`; None: Bradley-Terry).
    """
    return CompiledStep(rm, make_optimizer(optimizer), start, objective)


def accumulate_gradients(
    step: CompiledStep,
    train_tree: Params,
    frozen: Params,
    micro_batches: Sequence[np.ndarray],
    pairs: PairSet,
    config: TrainConfig,
    mesh: Any = None,
) -> tuple[Params, dict[str, float], dict[str, int]]:
    """Σ of per-pair gradients over the micro-batches of one optimizer step, and the step's loss and accuracy.

    Each micro-batch runs as one forward/backward pass, or as several (`split_passes`) when it holds more than
    `pass_limit(config)` positions. The first pass's gradients start the sum (no zero tree is allocated); later
    ones are added in place (the accumulator is donated). On a mesh each pass is split over its devices along
    the rows.

    Args:
      step: the compiled functions (`compile_step`).
      train_tree: the trainable parameters.
      frozen: the frozen parameters (without π_ref).
      micro_batches: the pair indices of each micro-batch (`batch_plan`).
      pairs: the training pairs, with the cached ln π_ref of an IM-RM.
      config: the run's options (bucket, packing, pass limit).
      mesh: the device mesh, or None.

    Returns:
      (summed gradients, {"loss", "accuracy", "rows"}: batch means over the step's pairs and their count,
      {"packed_micro_batches", "passes", "packed_passes"}: the micro-batches that ran packed (in some pass),
      the passes, and the passes that ran packed).
    """
    acc = None
    loss_sum, wins, rows = 0.0, 0.0, 0
    counts = {"packed_micro_batches": 0, "passes": 0, "packed_passes": 0}
    limit = pass_limit(config)
    options = {"pack": config.pack_pairs, "response_positions": isinstance(step.rm, ImplicitRM)}
    for idx in micro_batches:
        first = pass_rows(pairs, idx, config.bucket, **options)
        parts = split_passes(idx, first[0].positions(), limit, data_devices(mesh))
        passes = [first] if len(parts) == 1 else [pass_rows(pairs, i, config.bucket, **options) for i in parts]
        counts["packed_micro_batches"] += any(packed for _, _, packed in passes)
        for both, ref, packed in passes:
            both, ref = place_rows((both, ref), mesh)
            if acc is None:
                acc, l_sum, w_sum = step.first_micro_step(train_tree, frozen, both, ref)
            else:
                acc, l_sum, w_sum = step.micro_step(train_tree, frozen, acc, both, ref)
            loss_sum, wins = loss_sum + l_sum, wins + w_sum
            counts["passes"] += 1
            counts["packed_passes"] += packed
        rows += len(idx)
    stats = {"loss": float(loss_sum) / rows, "accuracy": float(wins) / rows, "rows": rows}
    return acc, stats, counts

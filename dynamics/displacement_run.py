"""Likelihood displacement along a real training run, from its checkpoints (docs/math.md §12.1).

`dynamics.displacement` predicts the change of ln π_θ(y|x) after one step. A DPO run takes many. For an IM-RM run
of `dynamics.training.train` with checkpoints θ_{t_0} = θ_0, θ_{t_1}, …, θ_{t_C}, every step s of the interval
[t_c, t_{c+1}) is linearised at the interval's checkpoint θ_t = θ_{t_c}: the step's update Δθ_s is the run's own
optimizer (its optax transformation and saved state) applied to the batch gradient ∇L_{B_s}(θ_t), with B_s the
batch the trainer took at step s, and the predicted change of every response's log-likelihood over the interval is

    Δ ln π(y|x) ≈ ⟨∇ ln π_θ(y|x) |_{θ_t}, Σ_{s ∈ [t_c, t_{c+1})} Δθ_s⟩          (= Δr_IM / β; |y| Δr / β for SimPO)

computed as one forward-mode JVP per interval, so no per-sequence gradient is ever held: memory is that of a few
copies of the trainable parameters, whatever the number of responses. The actual change is read from the
checkpoints: ln π at θ_{t_c} minus ln π at θ_0. With a checkpoint every step the prediction is first order in each
step's update (error O(η²) per step); with a checkpoint every k steps all k steps use θ_t's gradients.

The responses are those of `dynamics.displacement`: the chosen and rejected response of every training pair, then
any eval responses.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dynamics.batches import PairBatch, PreferenceBatch
from dynamics.errors import ConfigError

__all__ = ["displacement_along_run"]


def _interval_update(run, tree, opt_state, batches: list[np.ndarray], train: PreferenceBatch, chunk: int):
    """Σ_s Δθ_s over the steps `batches`, each the run's optimizer update from ∇L_{B_s} at the checkpoint `tree`
    (its state advanced step by step), as a tree like `tree` (π_ref's subtree kept as it is: no leaves)."""
    from dynamics.attribution.along_run import without_ref
    from dynamics.pair_gradient import loss_gradient

    objective = run.config.objective_spec
    total = None
    for b in batches:
        g = without_ref(loss_gradient(run.rm, tree, run.frozen, train.select(b), objective, chunk=chunk))
        update, opt_state = run.tx.update(g, opt_state, without_ref(tree))
        total = update if total is None else jax.tree.map(jnp.add, total, update)
    return {**total, **({"ref": tree["ref"]} if "ref" in tree else {})}


def _directional_change(run, tree, direction, sequences: PairBatch, chunk: int) -> np.ndarray:
    """⟨∇r(y) at θ_t, direction⟩ for every row of `sequences`, [R] float64 (reward units), by JVP."""
    from dynamics.chunking import batch_chunks
    from dynamics.delta import jvp_rewards_jit

    stacked = jax.tree.map(lambda x: x[None], direction)
    out = []
    for part, keep in batch_chunks(sequences, chunk):
        _, tangent = jvp_rewards_jit(run.rm, tree, run.frozen, stacked, part)
        out.append(np.asarray(tangent[0])[:keep])
    return np.concatenate(out).astype(np.float64)


def _meta(run, steps: list[int], n: int, n_eval: int) -> dict[str, Any]:
    from dynamics.attribution.trajectory import training_batches
    from dynamics.outputs import portable_path

    c = run.config
    return {
        "run_dir": portable_path(run.run_dir),
        "params": c.params,
        "optimizer": c.optimizer,
        "lr": c.lr,
        "objective": c.objective,
        "beta": c.beta,
        "n_train": n,
        "n_eval": n_eval,
        "steps": steps[-1],
        "checkpoints": len(steps) - 1,
        "longest_interval": int(max(np.diff(steps))),
        "complete": run.complete and steps[-1] == len(training_batches(c, n)),
        "approximation": "first order in each step's update, linearised at the interval's checkpoint (JVP)",
    }


def displacement_along_run(
    run_dir: str | os.PathLike,
    lm: Any,
    lm_params: Any,
    train: PreferenceBatch,
    *,
    eval_responses: PairBatch | None = None,
    chunk_size: int = 8,
    require_all: bool = True,
    progress: bool = False,
):
    """Predicted and actual Δ ln π_θ of every training response (and eval response) over a whole IM-RM run.

    Args:
      run_dir: a run directory of `dynamics.training.train` with reward "im" and its checkpoints kept.
      lm, lm_params: the language model and the parameters the run started from.
      train: the run's N training pairs (checked against the run's record).
      eval_responses: M more responses, or None.
      chunk_size: pairs per backward pass and sequences per JVP.
      require_all: refuse a run whose checkpoints were not all kept (else linearise over the longer intervals).
      progress: a progress bar over the optimizer steps.

    Returns:
      A `dynamics.displacement.Displacement`: `chosen`, `rejected`, `eval` the predicted total change (nats),
      `actual_*` the change read from the last checkpoint, `path_*` both at every checkpoint, CHES at θ_0.

    Raises:
      ConfigError: not an IM-RM run, and the errors of `dynamics.attribution.along_run.load_run_model` (another
        model, other training data) and of its checkpoint plan (no checkpoint, missing ones); chunk_size < 1.
    """
    from tqdm.auto import tqdm

    from dynamics.attribution.along_run import checkpoint_plan, load_run_model
    from dynamics.attribution.contributions import batch_rewards
    from dynamics.attribution.trajectory import training_batches
    from dynamics.displacement import Displacement, ches_scores, log_likelihood_scale, response_sequences, split_rows

    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be ≥ 1, got {chunk_size}")
    run = load_run_model(run_dir, lm, lm_params, train, reward="im")
    n = train.batch_size
    steps = checkpoint_plan(run, n, require_all)
    batches = training_batches(run.config, n)[: steps[-1]]
    sequences = response_sequences(train, eval_responses)
    scale = log_likelihood_scale(run.rm, sequences)
    values, predicted = [], [np.zeros(sequences.batch_size)]
    with tqdm(total=steps[-1], desc="steps along the run", unit="step", disable=not progress, leave=False) as bar:
        for a, b in zip(steps, steps[1:], strict=False):
            tree, opt_state = run.state(a)
            values.append(batch_rewards(run.rm, run.params_at(tree), sequences, chunk_size))
            direction = _interval_update(run, tree, opt_state, batches[a:b], train, chunk_size)
            predicted.append(predicted[-1] + _directional_change(run, tree, direction, sequences, chunk_size))
            bar.update(b - a)
    values.append(batch_rewards(run.rm, run.params_at(run.state(steps[-1])[0]), sequences, chunk_size))
    path_predicted = np.stack(predicted) * scale
    path_actual = (np.stack(values) - values[0]) * scale
    chosen, rejected, ev = split_rows(path_predicted[-1], n)
    a_chosen, a_rejected, a_eval = split_rows(path_actual[-1], n)
    ches, ln_ches = ches_scores(run.rm.lm, run.params["lm"], train)
    meta = _meta(run, steps, n, sequences.batch_size - 2 * n)
    return Displacement(
        chosen, rejected, ev, ches, ln_ches, meta, a_chosen, a_rejected, a_eval,
        path_steps=np.asarray(steps, np.int64), path_predicted=path_predicted, path_actual=path_actual,
    )  # fmt: skip

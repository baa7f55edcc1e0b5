"""Theorem 2's jitted simulator: EX-RM and IM-RM trained by full-batch GD on one problem, all seeds at once.

Both heads are trained by full-batch gradient descent on the Bradley-Terry loss L = mean_i softplus(−m_i),
m_i = r(x_i, y_i+) − r(x_i, y_i−) (docs/math.md §1). The loop is a `lax.scan` over the segments of a log-spaced
recording grid (`theory.theorem2.result.recording_grid`), each segment a `lax.fori_loop` over its GD steps;
the whole run is jitted and vmapped over seeds.

**IM-RM reward differences are computed structurally.** Both tokens of a comparison share the prompt, so the
log-softmax normaliser cancels and, with ΔW = W(t) − W(0),

    r_IM(x, y+) − r_IM(x, y−) = β ⟨ΔW_{y+} − ΔW_{y−}, h_x⟩              (docs/math.md §5, proof idea)

This is what the simulator evaluates, for the loss, the gradient and the accuracies. The gradient only touches
the rows of training tokens (a scatter-add into zeros), so the rows of unseen tokens stay bitwise equal to
W(0), their ΔW rows are exactly 0, and the reward difference of two unseen tokens is exactly 0.0: a tie
decided by structure, with no tolerance. (Going through `log_softmax` would leave rounding noise of ~1e-15
that breaks the ties at random; docs/math.md §5 measured 0.514 instead of 0.5 that way.) Accuracy counts ties
as ½: acc = mean(1[r+ > r−]) + ½ mean(1[r+ = r−]) (docs/math.md §1).

**Seen and unseen.** The seen tokens of a seed are the tokens of its training triples. An evaluation pair is
*unseen* when both tokens are outside that set and *seen* when both are inside; mixed pairs count in neither.
The split is computed per seed inside the simulator.

Shapes: S seeds, P prompts, T tokens (the local vocabulary), D hidden size (D_ex for the EX-RM states), n
training triples, m evaluation triples, G recording points.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dynamics.errors import ConfigError
from theory.theorem2.problem import (
    Theorem2Problem,
    broadcast_problem,
    max_margin_directions,
    select_seeds,
    validate_problem,
)
from theory.theorem2.result import SERIES, Theorem2Config, Theorem2Result, recording_grid

__all__ = ["simulate_theorem2", "simulator_trace_count"]

# ----------------------------------------------------------------------------------------------------------
# The jitted simulator

_LOG_SOFTPLUS_SWITCH = 40.0
_TRACES = [0]


def simulator_trace_count() -> int:
    """How many times the single-run body has been traced (a guard against silent recompilation)."""
    return _TRACES[0]


def _log_softplus_neg(m: jax.Array) -> jax.Array:
    """ln softplus(−m) = ln ln(1 + e^{−m}), without underflow for large margins (≈ −m beyond 40)."""
    big = m > _LOG_SOFTPLUS_SWITCH
    return jnp.where(big, -m, jnp.log(jax.nn.softplus(-jnp.where(big, 0.0, m))))


def _log_loss(m: jax.Array) -> jax.Array:
    """ln L with L = mean_i softplus(−m_i), the BT loss of margins m [n] (docs/math.md §1)."""
    return jax.nn.logsumexp(_log_softplus_neg(m)) - jnp.log(m.shape[0])


def _descent_weights(m: jax.Array, schedule: str) -> jax.Array:
    """−∂L/∂m_i [n] (plain) or −∂L/∂m_i / L (normalized), computed in log space for the latter."""
    if schedule == "plain":
        return jax.nn.sigmoid(-m) / m.shape[0]
    return jnp.exp(-jax.nn.softplus(m) - jax.nn.logsumexp(_log_softplus_neg(m)))


def _accuracy(diff: jax.Array, mask: jax.Array) -> jax.Array:
    """mean over mask of 1[d > 0] + ½·1[d = 0] (docs/math.md §1); NaN for an empty mask."""
    score = jnp.where(diff > 0, 1.0, jnp.where(diff == 0, 0.5, 0.0)).astype(diff.dtype)
    count = jnp.sum(mask)
    return jnp.where(count > 0, jnp.sum(jnp.where(mask, score, 0.0)) / jnp.maximum(count, 1), jnp.nan)


def _ex_reward_diff(u: jax.Array, h_pair: jax.Array, triples: jax.Array) -> jax.Array:
    """r_EX(x, y+) − r_EX(x, y−) = ⟨u, h_{x,y+}⟩ − ⟨u, h_{x,y−}⟩ for triples [k, 3] → [k] (docs/math.md §1)."""
    x, yp, ym = triples[:, 0], triples[:, 1], triples[:, 2]
    return h_pair[x, yp] @ u - h_pair[x, ym] @ u


def _im_reward_diff(w: jax.Array, w0: jax.Array, h_prompt: jax.Array, beta: jax.Array, triples: jax.Array) -> jax.Array:
    """r_IM(x, y+) − r_IM(x, y−) = β⟨ΔW_{y+} − ΔW_{y−}, h_x⟩, ΔW = W − W(0) (module doc) → [k]."""
    x, yp, ym = triples[:, 0], triples[:, 1], triples[:, 2]
    dw = w - w0
    r_pos = beta * jnp.sum(dw[yp] * h_prompt[x], axis=-1)
    r_neg = beta * jnp.sum(dw[ym] * h_prompt[x], axis=-1)
    return r_pos - r_neg


def _primal_step(params: jax.Array, margins_fn: Any, lr: jax.Array, schedule: str) -> jax.Array:
    """θ + lr·Σ_i w_i ∇m_i(θ): one GD step on the BT loss, by one VJP of the margins (reference method)."""
    m, vjp = jax.vjp(margins_fn, params)
    (direction,) = vjp(_descent_weights(m, schedule))
    return params + lr * direction


def _dual_step(c: jax.Array, m0: jax.Array, gram: jax.Array, lr: jax.Array, schedule: str) -> jax.Array:
    """c + lr·w(m) with m = m0 + K c: the same GD step in the coefficients of θ − θ(0) = Σ_i c_i ∇m_i."""
    m = m0 + jnp.sum(gram * c[None, :], axis=1)
    return c + lr * _descent_weights(m, schedule)


def _run_one(
    problem: Theorem2Problem,
    u_star: jax.Array,
    u_init: jax.Array,
    deltas: jax.Array,
    hyper: jax.Array,
    schedule: str,
    method: str,
) -> dict[str, jax.Array]:
    """One seed: GD on both heads over the segments `deltas` [G] (deltas[0] = 0); metrics after each."""
    _TRACES[0] += 1
    lr, im_lr, beta = hyper[0], hyper[1], hyper[2]
    h_pair, h_prompt, w0 = problem.h_pair, problem.h_prompt, problem.unembedding
    train, ev = problem.train, problem.eval_triples
    n_tokens = w0.shape[0]
    seen = jnp.zeros(n_tokens, bool).at[train[:, 1]].set(True).at[train[:, 2]].set(True)
    seen_pair = seen[ev[:, 1]] & seen[ev[:, 2]]
    unseen_pair = ~seen[ev[:, 1]] & ~seen[ev[:, 2]]
    u_star_norm = jnp.linalg.norm(u_star)
    ex_margins = lambda u: _ex_reward_diff(u, h_pair, train)
    im_margins = lambda w: _im_reward_diff(w, w0, h_prompt, beta, train)

    def metrics(u: jax.Array, w: jax.Array) -> dict[str, jax.Array]:
        m_ex, m_im = ex_margins(u), im_margins(w)
        d_ex = _ex_reward_diff(u, h_pair, ev)
        d_im = _im_reward_diff(w, w0, h_prompt, beta, ev)
        u_norm = jnp.linalg.norm(u)
        cos = jnp.where(u_norm > 0, (u @ u_star) / (jnp.where(u_norm > 0, u_norm, 1.0) * u_star_norm), 0.0)
        row_change = jnp.where(~seen[:, None], jnp.abs(w - w0), 0.0)
        return {
            "cos_u_star": cos,
            "log_loss_ex": _log_loss(m_ex),
            "log_loss_im": _log_loss(m_im),
            "train_acc_ex": _accuracy(m_ex, jnp.ones_like(m_ex, bool)),
            "train_acc_im": _accuracy(m_im, jnp.ones_like(m_im, bool)),
            "acc_seen_ex": _accuracy(d_ex, seen_pair),
            "acc_unseen_ex": _accuracy(d_ex, unseen_pair),
            "acc_seen_im": _accuracy(d_im, seen_pair),
            "acc_unseen_im": _accuracy(d_im, unseen_pair),
            "max_unseen_row_change": jnp.max(row_change),
            "max_unseen_reward_diff_im": jnp.max(jnp.where(unseen_pair, jnp.abs(d_im), 0.0)),
        }

    if method == "primal":
        # The reference: u and W themselves, stepped along autodiff gradients of the reward differences.
        # The VJP of the row gathers scatter-adds into zeros, so unseen rows get exactly 0.0.
        def to_params(state: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
            return state

        def step(_: jax.Array, state: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
            u, w = state
            return _primal_step(u, ex_margins, lr, schedule), _primal_step(w, im_margins, im_lr, schedule)

        init = (u_init, w0)
    else:
        # GD keeps θ − θ(0) in the span of the margin gradients, so it runs on coefficients c [n] with the
        # Gram matrices of those gradients: EX-RM ∇m_i = z_i; IM-RM ∇m_i = β a_i h_{x_i}^T with the token
        # incidence a_i = e_{y+} − e_{y−}, so K_ij = (a_i·a_j)(h_{x_i}·h_{x_j}). Rows of A^T for unseen tokens
        # are all zero, so W(t) = W(0) + β A^T diag(c) H keeps those rows bitwise at W(0).
        z = h_pair[train[:, 0], train[:, 1]] - h_pair[train[:, 0], train[:, 2]]
        one_hot = lambda t: jax.nn.one_hot(t, n_tokens, dtype=w0.dtype)
        incidence = one_hot(train[:, 1]) - one_hot(train[:, 2])
        h_train = h_prompt[train[:, 0]]
        gram_ex = z @ z.T
        gram_im = beta**2 * (incidence @ incidence.T) * (h_train @ h_train.T)
        m0_ex = z @ u_init
        m0_im = jnp.zeros_like(m0_ex)

        def to_params(state: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
            c_ex, c_im = state
            return u_init + z.T @ c_ex, w0 + beta * (incidence.T @ (c_im[:, None] * h_train))

        def step(_: jax.Array, state: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
            c_ex, c_im = state
            return (
                _dual_step(c_ex, m0_ex, gram_ex, lr, schedule),
                _dual_step(c_im, m0_im, gram_im, im_lr, schedule),
            )

        init = (jnp.zeros_like(m0_ex), jnp.zeros_like(m0_ex))

    def segment(state: tuple[jax.Array, jax.Array], n: jax.Array) -> tuple[Any, dict[str, jax.Array]]:
        state = jax.lax.fori_loop(0, n, step, state)
        return state, metrics(*to_params(state))

    # deltas[0] = 0, so the first segment records t = 0 (one trace of `metrics`, not two).
    final, series = jax.lax.scan(segment, init, deltas)
    u_fin, w_fin = to_params(final)
    d_star = _ex_reward_diff(u_star, h_pair, ev)
    return {
        **series,
        "u_star_acc_seen": _accuracy(d_star, seen_pair),
        "u_star_acc_unseen": _accuracy(d_star, unseen_pair),
        "n_eval_seen": jnp.sum(seen_pair),
        "n_eval_unseen": jnp.sum(unseen_pair),
        "final_u": u_fin,
        "final_unembedding": w_fin,
    }


@partial(jax.jit, static_argnames=("schedule", "method"))
def _run_seed(problem, u_star, u_init, deltas, hyper, schedule, method):  # noqa: ANN001, ANN202
    return _run_one(problem, u_star, u_init, deltas, hyper, schedule, method)


@partial(jax.jit, static_argnames=("schedule", "method"))
def _run_seeds(problem, u_star, u_init, deltas, hyper, schedule, method):  # noqa: ANN001, ANN202
    run = partial(_run_one, schedule=schedule, method=method)
    return jax.vmap(run, in_axes=(0, 0, 0, None, None))(problem, u_star, u_init, deltas, hyper)


@contextlib.contextmanager
def _precision(dtype: str) -> Iterator[None]:
    if dtype == "float64":
        with jax.enable_x64(True):
            yield
    else:
        yield


def _cast(problem: Theorem2Problem, dtype: Any) -> Theorem2Problem:
    return replace(
        problem,
        h_pair=jnp.asarray(problem.h_pair, dtype),
        h_prompt=jnp.asarray(problem.h_prompt, dtype),
        unembedding=jnp.asarray(problem.unembedding, dtype),
        train=jnp.asarray(problem.train, jnp.int32),
        eval_triples=jnp.asarray(problem.eval_triples, jnp.int32),
    )


def simulate_theorem2(
    problem: Theorem2Problem,
    config: Theorem2Config | None = None,
    *,
    u_star: Any = None,
    u_init: Any = None,
    seed: int | None = None,
    vectorize: bool = True,
    progress: Callable[[str], None] | None = None,
) -> Theorem2Result:
    """Trains EX-RM and IM-RM by full-batch GD on every seed of `problem` and records Theorem 2's quantities.

    Implements docs/math.md §5 under Assumptions 1 and 2 (see this module's docstring for the exact IM-RM
    reward difference and the seen/unseen split, `theory.theorem2.problem` for sub-vocabularies and
    `theory.theorem2.result` for the schedules).

    Args:
      problem: a batched `Theorem2Problem` ([S, ...] arrays) or an unbatched one (S = 1).
      config: simulator options; default `Theorem2Config()`.
      u_star: [S, D_ex] max-margin directions; None computes them (`max_margin_directions`, a QP per seed).
      u_init: [S, D_ex] or [D_ex] initial EX-RM heads; None means u(0) = 0.
      seed: the base seed, recorded in the result only.
      vectorize: True runs one jitted, vmapped computation over all seeds; False loops over seeds in Python,
        calling the jitted single-seed function (for benchmarks; the numbers are the same).
      progress: called with a short line at each stage (compiling, running, and the seconds each took); with it
        the vmapped computation is compiled ahead of time and then run, so that both can be reported.

    Returns:
      A `Theorem2Result` with [S, G] series on the grid `recording_grid(config.n_steps, config.n_grid)`.

    Raises:
      ConfigError: a malformed problem or option, or u_star / u_init of the wrong shape.
      RmdynError: training differences that are not linearly separable (when u_star is computed).
    """
    config = config or Theorem2Config()
    validate_problem(problem)
    if not problem.batched:
        problem = broadcast_problem(problem, 1)
    n_seeds, d_ex = problem.n_seeds, int(np.shape(problem.h_pair)[-1])
    if u_star is None:
        u_star = np.stack([r.direction for r in max_margin_directions(problem)])
    u_star = np.asarray(u_star, dtype=np.float64)
    if u_star.shape != (n_seeds, d_ex):
        raise ConfigError(f"u_star must have shape {(n_seeds, d_ex)} = [S, D_ex], got {u_star.shape}")
    u0 = np.zeros((n_seeds, d_ex)) if u_init is None else np.asarray(u_init, dtype=np.float64)
    if u0.shape == (d_ex,):
        u0 = np.broadcast_to(u0, (n_seeds, d_ex))
    if u0.shape != (n_seeds, d_ex) or not np.all(np.isfinite(u0)):
        raise ConfigError(f"u_init must be finite of shape [D_ex] or [S, D_ex] = {(n_seeds, d_ex)}, got {u0.shape}")
    steps = recording_grid(config.n_steps, config.n_grid)

    with _precision(config.dtype):
        dt = jnp.float64 if config.dtype == "float64" else jnp.float32
        prob = _cast(problem, dt)
        deltas = jnp.asarray(np.diff(steps, prepend=0), jnp.int32)
        hyper = jnp.asarray([config.lr, config.resolved_im_lr, config.beta], dt)
        us, u0s = jnp.asarray(u_star, dt), jnp.asarray(u0, dt)
        if vectorize and progress is not None:
            t0 = time.perf_counter()
            progress(
                f"compiling the simulator (one jitted, vmapped call: {n_seeds} seeds × {config.n_steps} "
                f"{config.schedule} GD steps, {config.method} method, {config.dtype}) …"
            )
            static = {"schedule": config.schedule, "method": config.method}
            compiled = _run_seeds.lower(prob, us, u0s, deltas, hyper, **static).compile()
            t1 = time.perf_counter()
            progress(f"compiled in {t1 - t0:.1f} s; running {config.n_steps} steps on {n_seeds} seeds …")
            out = jax.block_until_ready(compiled(prob, us, u0s, deltas, hyper))
            progress(f"ran in {time.perf_counter() - t1:.1f} s")
        elif vectorize:
            out = _run_seeds(prob, us, u0s, deltas, hyper, config.schedule, config.method)
        else:
            runs = [
                _run_seed(select_seeds(prob, s), us[s], u0s[s], deltas, hyper, config.schedule, config.method)
                for s in range(n_seeds)
            ]
            out = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *runs)
        out = {k: np.asarray(v) for k, v in out.items()}

    return Theorem2Result(
        steps=steps,
        **{k: out[k] for k in SERIES},
        u_star_acc_seen=out["u_star_acc_seen"],
        u_star_acc_unseen=out["u_star_acc_unseen"],
        n_eval_seen=out["n_eval_seen"],
        n_eval_unseen=out["n_eval_unseen"],
        u_star=u_star,
        final_u=out["final_u"],
        final_unembedding=out["final_unembedding"],
        config=config,
        source=problem.source,
        seed=seed,
    )

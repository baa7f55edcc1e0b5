"""Theorem 2: the single-token simulator of EX-RM vs IM-RM gradient descent (docs/math.md §5).

Under Assumption 1 (fixed hidden representations; only the last linear layer trains) and Assumption 2
(single-token responses):

- EX-RM: r_EX(x, y) = ⟨u, h_{x,y}⟩, the head u trains. The training differences z_i = h_{x_i,y_i+} −
  h_{x_i,y_i−} define the max-margin direction u* (`theory.maxmargin`); GD drives u(t)/‖u(t)‖ → u*/‖u*‖
  (claim 1).
- IM-RM: r_IM(x, y) = β[ln softmax(W h_x)_y − ln π_ref(y|x)] with π_ref = π_{W(0)}; the unembedding W trains.
  The rows of tokens never seen in training keep their initial value, so every pair of unseen tokens ties at
  every t and the IM-RM's accuracy on unseen pairs is exactly ½ (claim 2).

Both heads are trained by full-batch gradient descent on the Bradley-Terry loss L = mean_i softplus(−m_i),
m_i = r(x_i, y_i+) − r(x_i, y_i−) (docs/math.md §1). The loop is a `lax.scan` over the segments of a log-spaced
recording grid, each segment a `lax.fori_loop` over its GD steps; the whole run is jitted and vmapped over
seeds.

**IM-RM reward differences are computed structurally.** Both tokens of a comparison share the prompt, so the
log-softmax normaliser cancels and, with ΔW = W(t) − W(0),

    r_IM(x, y+) − r_IM(x, y−) = β ⟨ΔW_{y+} − ΔW_{y−}, h_x⟩              (docs/math.md §5, proof idea)

This is what the simulator evaluates, for the loss, the gradient and the accuracies. The gradient only touches
the rows of training tokens (a scatter-add into zeros), so the rows of unseen tokens stay bitwise equal to
W(0), their ΔW rows are exactly 0, and the reward difference of two unseen tokens is exactly 0.0: a tie
decided by structure, with no tolerance. (Going through `log_softmax` would leave rounding noise of ~1e-15
that breaks the ties at random; docs/math.md §5 measured 0.514 instead of 0.5 that way.) Accuracy counts ties
as ½: acc = mean(1[r+ > r−]) + ½ mean(1[r+ = r−]) (docs/math.md §1).

**Sub-vocabularies are exact.** Reward differences, the loss, its gradient and hence every recorded number
depend on W only through the rows of the tokens that appear in the training or evaluation triples. A
problem may therefore carry just those rows (`Theorem2Problem.unembedding` of shape [T, D] for T local
tokens, with `token_ids` mapping them to vocabulary ids), e.g. a handful of SmolLM2's 49,152 tokens, and
vmapping 100 seeds stays cheap. Only absolute IM-RM rewards (which need the full normaliser) are out of
reach, and nothing here uses them.

**Seeds.** In the synthetic source a seed draws the representations (the semantic direction c, the token parts
E_t, the prompt states h_x), the initial unembedding W(0) and the training triples (one random seen good and
seen bad token per prompt). The evaluation triples are the same for every seed. Another source decides itself
what its seeds vary (e.g. the sampled training triples over fixed model representations).

**Other sources.** Any arrays can be simulated: build a `Theorem2Problem` (e.g. SmolLM2's final hidden states
h_{x,y} and h_x on persona prompts and the rows of its untied unembedding for the tokens that occur).
`rmdyn theorem2 --source model` expects `experiments.studies.theorem2_model.model_problem(n_seeds=..., seed=...)` to
return one, batched over seeds or not (an unbatched problem is repeated).

**Seen and unseen.** The seen tokens of a seed are the tokens of its training triples. An evaluation pair is
*unseen* when both tokens are outside that set and *seen* when both are inside; mixed pairs count in neither.
The split is computed per seed inside the simulator.

**Step sizes.** `schedule="plain"` is GD with a constant step, the theorem's setting; its direction
converges only logarithmically (cos(u, u*) ≈ 0.99 needs ~1e7 steps). `schedule="normalized"` divides the
step by the current loss, η_t = η / L(θ_t), and converges in direction far faster. The schedule applies to
both heads. The IM-RM's margin is β⟨ΔW, φ_i⟩ with φ_i = (e_{y+} − e_{y−}) h_x^T, so its step defaults to
η/β², which makes it GD with step η on βΔW.

Shapes: S seeds, P prompts, T tokens (the local vocabulary), D hidden size (D_ex for the EX-RM states), n
training triples, m evaluation triples, G recording points.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dynamics.errors import ConfigError
from dynamics.outputs import jsonable, write_json_atomic
from theory.maxmargin import MaxMarginResult, max_margin_direction

__all__ = [
    "METHODS",
    "SCHEDULES",
    "SYNTHETIC_BAD_TOKENS",
    "SYNTHETIC_GOOD_TOKENS",
    "SYNTHETIC_SEEN_BAD",
    "SYNTHETIC_SEEN_GOOD",
    "TIE_RULE",
    "Theorem2Config",
    "Theorem2Problem",
    "Theorem2Result",
    "broadcast_problem",
    "max_margin_directions",
    "recording_grid",
    "select_seeds",
    "simulate_theorem2",
    "simulator_trace_count",
    "synthetic_problem",
    "synthetic_problems",
    "training_differences",
    "validate_problem",
]

SCHEDULES = ("plain", "normalized")
METHODS = ("dual", "primal")
SYNTHETIC_GOOD_TOKENS = (0, 1, 2, 6, 7, 8, 9, 10, 11, 12)
SYNTHETIC_BAD_TOKENS = (3, 4, 5, 13, 14, 15, 16, 17, 18, 19)
SYNTHETIC_SEEN_GOOD = (0, 1, 2)
SYNTHETIC_SEEN_BAD = (3, 4, 5)
TIE_RULE = (
    "ties count 1/2; IM-RM reward differences are beta*<dW[y+] - dW[y-], h_x> with dW = W(t) - W(0) "
    "(the log-softmax normaliser cancels for a shared prompt), exactly 0.0 for tokens whose rows never "
    "moved; a tie is r+ == r- exactly, no tolerance"
)


# ----------------------------------------------------------------------------------------------------------
# Problem


@partial(
    jax.tree_util.register_dataclass,
    data_fields=["h_pair", "h_prompt", "unembedding", "train", "eval_triples"],
    meta_fields=["token_ids", "token_names", "source"],
)
@dataclass(frozen=True)
class Theorem2Problem:
    """One Theorem-2 instance, or S of them stacked on a leading seed axis (a JAX pytree).

    Triples are (prompt index, y+ local token, y− local token), integers indexing the P prompts and the T
    local tokens.

    Attributes:
      h_pair: [S?, P, T, D_ex] h_{x,y}: the EX-RM representation of prompt x followed by token y.
      h_prompt: [S?, P, D] h_x: the state after reading x, which gives the next-token logits W h_x (IM-RM).
      unembedding: [S?, T, D] W(0), rows of the local tokens (a sub-vocabulary is exact, see module doc).
      train: [S?, n, 3] int training triples.
      eval_triples: [S?, m, 3] int evaluation triples; split into seen/unseen per seed by the simulator.
      token_ids: vocabulary id of each local token ([T]); () means the identity.
      token_names: display name of each local token ([T]); () means none.
      source: where the arrays come from ("synthetic", "model", ...).
    """

    h_pair: Any
    h_prompt: Any
    unembedding: Any
    train: Any
    eval_triples: Any
    token_ids: tuple[int, ...] = ()
    token_names: tuple[str, ...] = ()
    source: str = "custom"

    @property
    def batched(self) -> bool:
        """Whether the arrays carry a leading seed axis."""
        return np.ndim(self.h_prompt) == 3

    @property
    def n_seeds(self) -> int:
        """S (1 for an unbatched problem)."""
        return int(np.shape(self.h_prompt)[0]) if self.batched else 1

    @property
    def n_tokens(self) -> int:
        """T, the size of the local vocabulary."""
        return int(np.shape(self.unembedding)[-2])


def _fail(msg: str) -> None:
    raise ConfigError(msg)


def _check_triples(name: str, triples: np.ndarray, n_prompts: int, n_tokens: int, batched: bool) -> None:
    want = 3 if batched else 2
    if triples.ndim != want or triples.shape[-1] != 3 or triples.shape[-2] < 1:
        _fail(f"{name} must have shape {'[S, k, 3]' if batched else '[k, 3]'} with k >= 1, got {triples.shape}")
    if not np.issubdtype(triples.dtype, np.integer):
        _fail(f"{name} must hold integers (prompt, y+, y-), got dtype {triples.dtype}")
    flat = triples.reshape(-1, triples.shape[-2], 3)
    for col, (what, bound) in enumerate((("prompt", n_prompts), ("y+ token", n_tokens), ("y- token", n_tokens))):
        vals = flat[..., col]
        bad = np.argwhere((vals < 0) | (vals >= bound))
        if bad.size:
            s, r = (int(v) for v in bad[0])
            where = f"{name}[seed {s}, row {r}]" if batched else f"{name}[row {r}]"
            space = "vocabulary" if col else "prompts"
            _fail(f"{where} has {what} {int(vals[s, r])}, outside the {space} of size {bound} (valid 0..{bound - 1})")


def validate_problem(problem: Theorem2Problem) -> None:
    """Checks shapes, index ranges and values of a problem (batched or not) before it is traced.

    Raises:
      ConfigError: naming the field, the shape or the offending index and value.
    """
    hp = np.asarray(problem.h_pair)
    hx = np.asarray(problem.h_prompt)
    w = np.asarray(problem.unembedding)
    batched = hx.ndim == 3
    lead = "[S, " if batched else "["
    if hx.ndim not in (2, 3):
        _fail(f"h_prompt must have shape [P, D] or [S, P, D], got {hx.shape}")
    if hp.ndim != hx.ndim + 1:
        _fail(f"h_pair must have shape {lead}P, T, D_ex] (h_prompt has shape {hx.shape}), got {hp.shape}")
    if w.ndim != hx.ndim:
        _fail(f"unembedding must have shape {lead}T, D] (h_prompt has shape {hx.shape}), got {w.shape}")
    if batched and not (hp.shape[0] == w.shape[0] == hx.shape[0]):
        _fail(f"seed axes differ: h_pair {hp.shape}, h_prompt {hx.shape}, unembedding {w.shape}")
    n_prompts, dim = hx.shape[-2], hx.shape[-1]
    n_tokens = w.shape[-2]
    if hp.shape[-3] != n_prompts:
        _fail(f"h_pair has {hp.shape[-3]} prompts (shape {hp.shape}), h_prompt has {n_prompts} ({hx.shape})")
    if hp.shape[-2] != n_tokens:
        _fail(f"h_pair has {hp.shape[-2]} tokens (shape {hp.shape}), unembedding has {n_tokens} ({w.shape})")
    if w.shape[-1] != dim:
        _fail(f"unembedding has hidden size {w.shape[-1]} (shape {w.shape}), h_prompt has {dim} ({hx.shape})")
    if n_tokens < 2 or n_prompts < 1 or dim < 1 or hp.shape[-1] < 1:
        _fail(f"need P >= 1 prompts, T >= 2 tokens, D >= 1; got P={n_prompts}, T={n_tokens}, D={dim}")
    for name, arr in (("h_pair", hp), ("h_prompt", hx), ("unembedding", w)):
        if not np.issubdtype(arr.dtype, np.floating):
            _fail(f"{name} must be floating point, got dtype {arr.dtype}")
        if not np.all(np.isfinite(arr)):
            where = tuple(int(i) for i in np.argwhere(~np.isfinite(arr))[0])
            _fail(f"{name} has a non-finite entry at index {where}")
    train = np.asarray(problem.train)
    _check_triples("train", train, n_prompts, n_tokens, batched)
    _check_triples("eval_triples", np.asarray(problem.eval_triples), n_prompts, n_tokens, batched)
    same = np.argwhere(train[..., 1] == train[..., 2])
    if same.size:
        where = tuple(int(i) for i in same[0])
        _fail(f"train row {where} has y+ == y- (token {int(train[..., 1][where])})")
    if problem.token_ids and len(problem.token_ids) != n_tokens:
        _fail(f"token_ids has {len(problem.token_ids)} entries, the problem has T={n_tokens} tokens")
    if problem.token_names and len(problem.token_names) != n_tokens:
        _fail(f"token_names has {len(problem.token_names)} entries, the problem has T={n_tokens} tokens")


def broadcast_problem(problem: Theorem2Problem, n_seeds: int) -> Theorem2Problem:
    """Stacks an unbatched problem `n_seeds` times (seeds then differ only by `u_init`)."""
    if problem.batched:
        return problem
    return jax.tree_util.tree_map(lambda a: np.broadcast_to(np.asarray(a), (n_seeds, *np.shape(a))), problem)


def select_seeds(problem: Theorem2Problem, index: Any) -> Theorem2Problem:
    """The seeds `index` (an int, slice or index array) of a batched problem; an int drops the seed axis."""
    if not problem.batched:
        raise ConfigError("select_seeds needs a batched problem (arrays with a leading seed axis)")
    return jax.tree_util.tree_map(lambda a: a[index], problem)


# ----------------------------------------------------------------------------------------------------------
# Synthetic source (docs/math.md §5 "Simulation recipe")


def synthetic_problem(
    key: jax.Array,
    *,
    n_prompts: int = 30,
    dim: int = 16,
    semantic_norm: float = 1.0,
    token_noise: float = 0.5,
    prompt_weight: float = 0.5,
) -> Theorem2Problem:
    """Draws one synthetic Theorem-2 problem (docs/math.md §5 "Simulation recipe"); vmap it over keys for seeds.

    V = 20 tokens: good {0,1,2} ∪ {6..12}, bad {3,4,5} ∪ {13..19}; seen tokens 0..5. A shared semantic
    direction c = semantic_norm·g/‖g‖ with g ~ N(0, I_D) (a random unit direction by default). Token parts
    E_t = ±c + token_noise·N(0, I_D) (+ for good tokens), prompt states h_x ~ N(0, I_D), EX-RM states
    h_{x,t} = prompt_weight·h_x + E_t, unembedding W(0) ~ N(0, I_D/D). Training: one triple per prompt,
    (x_i, a random seen good token, a random seen bad token). Evaluation: every (x_i, good, bad) pair with
    both tokens seen, then every one with both tokens unseen (P·9 + P·49 triples).

    Args:
      key: a JAX PRNG key; everything random derives from it.
      n_prompts: P (30 in the recipe).
      dim: D (16 in the recipe), shared by the EX-RM and the IM-RM states.
      semantic_norm: ‖c‖.
      token_noise: standard deviation of the token-specific part of E_t.
      prompt_weight: weight of h_x in h_{x,t}.

    Returns:
      An unbatched float32 `Theorem2Problem` with T = 20 tokens.
    """
    n_tokens = 20
    k_c, k_e, k_h, k_w, k_pos, k_neg = jax.random.split(key, 6)
    g = jax.random.normal(k_c, (dim,), jnp.float32)
    c = semantic_norm * g / jnp.linalg.norm(g)
    sign = jnp.zeros(n_tokens, jnp.float32).at[jnp.array(SYNTHETIC_GOOD_TOKENS)].set(1.0)
    sign = sign.at[jnp.array(SYNTHETIC_BAD_TOKENS)].set(-1.0)
    e = sign[:, None] * c[None, :] + token_noise * jax.random.normal(k_e, (n_tokens, dim), jnp.float32)
    h_x = jax.random.normal(k_h, (n_prompts, dim), jnp.float32)
    h_pair = prompt_weight * h_x[:, None, :] + e[None, :, :]
    w0 = jax.random.normal(k_w, (n_tokens, dim), jnp.float32) / math.sqrt(dim)
    prompts = jnp.arange(n_prompts, dtype=jnp.int32)
    y_pos = jax.random.choice(k_pos, jnp.array(SYNTHETIC_SEEN_GOOD, jnp.int32), (n_prompts,))
    y_neg = jax.random.choice(k_neg, jnp.array(SYNTHETIC_SEEN_BAD, jnp.int32), (n_prompts,))
    train = jnp.stack([prompts, y_pos, y_neg], axis=1)
    unseen_good = [t for t in SYNTHETIC_GOOD_TOKENS if t not in SYNTHETIC_SEEN_GOOD]
    unseen_bad = [t for t in SYNTHETIC_BAD_TOKENS if t not in SYNTHETIC_SEEN_BAD]
    pairs = [(a, b) for a in SYNTHETIC_SEEN_GOOD for b in SYNTHETIC_SEEN_BAD]
    pairs += [(a, b) for a in unseen_good for b in unseen_bad]
    eval_triples = np.array([(i, a, b) for a, b in pairs for i in range(n_prompts)], dtype=np.int32)
    return Theorem2Problem(
        h_pair=h_pair,
        h_prompt=h_x,
        unembedding=w0,
        train=train,
        eval_triples=jnp.asarray(eval_triples),
        token_ids=tuple(range(n_tokens)),
        token_names=tuple(f"{'good' if t in SYNTHETIC_GOOD_TOKENS else 'bad'}{t}" for t in range(n_tokens)),
        source="synthetic",
    )


def synthetic_problems(key: jax.Array | int, n_seeds: int, **kwargs: Any) -> Theorem2Problem:
    """`synthetic_problem` for `n_seeds` seeds, vmapped over `jax.random.split(key, n_seeds)`.

    Args:
      key: a PRNG key or an integer seed.
      n_seeds: S >= 1.
      **kwargs: forwarded to `synthetic_problem`.

    Returns:
      A batched `Theorem2Problem` (leading axis S), float32 numpy-backed JAX arrays.
    """
    if n_seeds < 1:
        raise ConfigError(f"n_seeds must be >= 1, got {n_seeds}")
    if isinstance(key, int):
        key = jax.random.key(key)
    keys = jax.random.split(key, n_seeds)
    return _synthetic_batch(keys, tuple(sorted(kwargs.items())))


@partial(jax.jit, static_argnums=1)
def _synthetic_batch(keys: jax.Array, kwargs: tuple[tuple[str, Any], ...]) -> Theorem2Problem:
    return jax.vmap(partial(synthetic_problem, **dict(kwargs)))(keys)


# ----------------------------------------------------------------------------------------------------------
# Max-margin direction, once per seed, outside jit


def training_differences(problem: Theorem2Problem) -> np.ndarray:
    """z_i = h_{x_i,y_i+} − h_{x_i,y_i−} as float64 numpy, [S?, n, D_ex] (docs/math.md §5, claim 1)."""
    hp = np.asarray(problem.h_pair, dtype=np.float64)
    tr = np.asarray(problem.train)
    if not problem.batched:
        return hp[tr[:, 0], tr[:, 1]] - hp[tr[:, 0], tr[:, 2]]
    s = np.arange(hp.shape[0])[:, None]
    return hp[s, tr[..., 0], tr[..., 1]] - hp[s, tr[..., 0], tr[..., 2]]


def max_margin_directions(problem: Theorem2Problem, **kwargs: Any) -> list[MaxMarginResult]:
    """u* of every seed (a QP per seed, in a Python loop: a QP solver cannot be vmapped).

    Args:
      problem: a batched or unbatched problem.
      **kwargs: forwarded to `theory.maxmargin.max_margin_direction`.

    Returns:
      One `MaxMarginResult` per seed.

    Raises:
      RmdynError: some seed's training differences are not linearly separable (the message names the seed).
    """
    z = training_differences(problem)
    if not problem.batched:
        return [max_margin_direction(z, what="the training differences z_i", **kwargs)]
    return [
        max_margin_direction(z[s], what=f"the training differences z_i of seed {s}", **kwargs)
        for s in range(z.shape[0])
    ]


# ----------------------------------------------------------------------------------------------------------
# Configuration and result


@dataclass(frozen=True)
class Theorem2Config:
    """Options of the simulator.

    Attributes:
      n_steps: number of GD steps T (the last recording point).
      lr: EX-RM step size η (plain: constant; normalized: η / L(u_t)).
      im_lr: IM-RM step size; None means lr/β² (GD with step lr on βΔW, see module doc). With the normalized
        schedule and lr = 0.5 this runs at the edge of stability on a few synthetic seeds (the IM-RM loss is
        briefly non-monotone, ~2 in 100); the unseen-token claim does not depend on the step size.
      beta: β of the IM-RM (paper: 0.01).
      schedule: "plain" (GD, the theorem's setting) or "normalized" (η_t = η / L(θ_t)).
      n_grid: number of log-spaced recording points, t = 0 included (fewer if rounding merges some).
      dtype: "float64" (default; plain GD needs it past ~1e6 steps, where float32 updates round away) or
        "float32".
      method: "dual" (default, fast) steps the coefficients c of θ(t) − θ(0) = Σ_i c_i ∇m_i with the Gram
        matrix of the margin gradients, O(n²) per step; "primal" (the reference) steps u and W themselves
        along autodiff gradients, O(n·D + T·D) per step. Both are the same GD; tests cross-check them.
    """

    n_steps: int = 10_000
    lr: float = 0.5
    im_lr: float | None = None
    beta: float = 0.01
    schedule: str = "normalized"
    n_grid: int = 41
    dtype: str = "float64"
    method: str = "dual"

    def __post_init__(self) -> None:
        if int(self.n_steps) != self.n_steps or not 1 <= self.n_steps < 2**31:
            raise ConfigError(f"n_steps must be an integer in [1, 2**31), got {self.n_steps!r}")
        for name in ("lr", "beta"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(f"{name} must be a finite number > 0, got {v!r}")
        if self.im_lr is not None and not (math.isfinite(self.im_lr) and self.im_lr > 0):
            raise ConfigError(f"im_lr must be None or a finite number > 0, got {self.im_lr!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if int(self.n_grid) != self.n_grid or self.n_grid < 2:
            raise ConfigError(f"n_grid must be an integer >= 2, got {self.n_grid!r}")
        if self.dtype not in ("float32", "float64"):
            raise ConfigError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}")

    @property
    def resolved_im_lr(self) -> float:
        """The IM-RM step size actually used."""
        return self.im_lr if self.im_lr is not None else self.lr / self.beta**2


def recording_grid(n_steps: int, n_grid: int) -> np.ndarray:
    """Recording steps: 0, then about n_grid − 1 log-spaced integers from 1 to n_steps (duplicates merged)."""
    if n_steps < 1 or n_grid < 2:
        raise ConfigError(f"need n_steps >= 1 and n_grid >= 2, got {n_steps}, {n_grid}")
    pts = np.unique(np.round(np.logspace(0.0, math.log10(n_steps), n_grid - 1)).astype(np.int64))
    pts = pts[(pts >= 1) & (pts <= n_steps)]
    if pts[-1] != n_steps:
        pts = np.append(pts, n_steps)
    return np.concatenate([[0], pts]).astype(np.int64)


_SERIES = (
    "cos_u_star",
    "log_loss_ex",
    "log_loss_im",
    "train_acc_ex",
    "train_acc_im",
    "acc_seen_ex",
    "acc_unseen_ex",
    "acc_seen_im",
    "acc_unseen_im",
    "max_unseen_row_change",
    "max_unseen_reward_diff_im",
)


@dataclass(frozen=True)
class Theorem2Result:
    """Everything the simulator recorded (docs/math.md §5). Series are [S, G] numpy arrays over `steps`.

    Attributes:
      steps: [G] GD step t of each recording point (t = 0 is the initialisation).
      cos_u_star: cos(u(t), u*) (0 while u = 0).
      log_loss_ex, log_loss_im: ln of the training BT loss (finite even when the loss underflows).
      train_acc_ex, train_acc_im: training accuracy (ties ½).
      acc_seen_ex, acc_unseen_ex, acc_seen_im, acc_unseen_im: accuracy on evaluation pairs whose tokens are
        both seen / both unseen (ties ½; NaN if a seed has no such pair).
      max_unseen_row_change: max over unseen tokens v of |W_v(t) − W_v(0)| (Theorem 2: exactly 0).
      max_unseen_reward_diff_im: max over unseen evaluation pairs of |r_IM(x,ȳ+) − r_IM(x,ȳ−)| (exactly 0).
      u_star_acc_seen, u_star_acc_unseen: [S] accuracy of u* on the same pairs.
      n_eval_seen, n_eval_unseen: [S] number of seen / unseen evaluation pairs.
      u_star: [S, D_ex] the max-margin directions.
      final_u: [S, D_ex] u(T); final_unembedding: [S, T, D] W(T).
      config: the `Theorem2Config`; source: the problem's source; seed: the base seed, if known.
      tie_rule: how ties are decided (`TIE_RULE`).
    """

    steps: np.ndarray
    cos_u_star: np.ndarray
    log_loss_ex: np.ndarray
    log_loss_im: np.ndarray
    train_acc_ex: np.ndarray
    train_acc_im: np.ndarray
    acc_seen_ex: np.ndarray
    acc_unseen_ex: np.ndarray
    acc_seen_im: np.ndarray
    acc_unseen_im: np.ndarray
    max_unseen_row_change: np.ndarray
    max_unseen_reward_diff_im: np.ndarray
    u_star_acc_seen: np.ndarray
    u_star_acc_unseen: np.ndarray
    n_eval_seen: np.ndarray
    n_eval_unseen: np.ndarray
    u_star: np.ndarray
    final_u: np.ndarray
    final_unembedding: np.ndarray
    config: Theorem2Config
    source: str = "custom"
    seed: int | None = None
    tie_rule: str = TIE_RULE

    @property
    def n_seeds(self) -> int:
        """S."""
        return int(self.cos_u_star.shape[0])

    def summary(self) -> dict[str, float]:
        """Final-step numbers: means over seeds (and min for cos), used by the CLI table."""
        last = {name: getattr(self, name)[:, -1] for name in _SERIES}
        return {
            "steps": int(self.steps[-1]),
            "cos_u_star_mean": float(np.mean(last["cos_u_star"])),
            "cos_u_star_min": float(np.min(last["cos_u_star"])),
            "train_acc_ex": float(np.mean(last["train_acc_ex"])),
            "train_acc_im": float(np.mean(last["train_acc_im"])),
            "acc_seen_ex": float(np.nanmean(last["acc_seen_ex"])),
            "acc_seen_im": float(np.nanmean(last["acc_seen_im"])),
            "acc_unseen_ex": float(np.nanmean(last["acc_unseen_ex"])),
            "acc_unseen_im": float(np.nanmean(last["acc_unseen_im"])),
            "u_star_acc_unseen": float(np.nanmean(self.u_star_acc_unseen)),
            "max_unseen_row_change": float(np.max(self.max_unseen_row_change)),
            "max_unseen_reward_diff_im": float(np.max(self.max_unseen_reward_diff_im)),
        }

    def to_dict(self, include_params: bool = False) -> dict[str, Any]:
        """Plain-JSON dictionary: config, steps, every [S, G] series, per-seed u* accuracies and counts.

        Args:
          include_params: also write u_star, final_u and final_unembedding (large for model problems).
        """
        out: dict[str, Any] = {
            "theorem": "2",
            "source": self.source,
            "seed": self.seed,
            "n_seeds": self.n_seeds,
            "config": {f.name: getattr(self.config, f.name) for f in fields(self.config)},
            "im_lr": self.config.resolved_im_lr,
            "tie_rule": self.tie_rule,
            "summary": self.summary(),
            "steps": self.steps,
        }
        for name in (*_SERIES, "u_star_acc_seen", "u_star_acc_unseen", "n_eval_seen", "n_eval_unseen"):
            out[name] = getattr(self, name)
        if include_params:
            out.update(u_star=self.u_star, final_u=self.final_u, final_unembedding=self.final_unembedding)
        return jsonable(out)

    def to_json(self, path: str | os.PathLike[str], include_params: bool = False) -> Path:
        """Writes `to_dict(include_params)` to `path` atomically; returns the path."""
        return write_json_atomic(path, self.to_dict(include_params))


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

    Implements docs/math.md §5 under Assumptions 1 and 2 (see the module docstring for the exact IM-RM reward
    difference, the sub-vocabulary, the seen/unseen split and the schedules).

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
        **{k: out[k] for k in _SERIES},
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

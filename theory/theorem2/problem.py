"""Theorem 2's problem: the arrays one simulation runs on, their checks, the synthetic source and u* per seed.

A `Theorem2Problem` holds fixed hidden representations (Assumption 1: only the last linear layer trains) for
single-token responses (Assumption 2): the EX-RM states h_{x,y}, the prompt states h_x, the initial
unembedding W(0), and training / evaluation triples (docs/math.md §5).

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

**u*.** The max-margin direction of the training differences z_i = h_{x_i,y_i+} − h_{x_i,y_i−}
(`theory.maxmargin`) is a QP per seed, solved here outside jit (`max_margin_directions`).

Shapes: S seeds, P prompts, T tokens (the local vocabulary), D hidden size (D_ex for the EX-RM states), n
training triples, m evaluation triples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dynamics.errors import ConfigError
from theory.maxmargin import MaxMarginResult, max_margin_direction

__all__ = [
    "SYNTHETIC_BAD_TOKENS",
    "SYNTHETIC_GOOD_TOKENS",
    "SYNTHETIC_SEEN_BAD",
    "SYNTHETIC_SEEN_GOOD",
    "Theorem2Problem",
    "broadcast_problem",
    "max_margin_directions",
    "select_seeds",
    "synthetic_problem",
    "synthetic_problems",
    "training_differences",
    "validate_problem",
]

SYNTHETIC_GOOD_TOKENS = (0, 1, 2, 6, 7, 8, 9, 10, 11, 12)
SYNTHETIC_BAD_TOKENS = (3, 4, 5, 13, 14, 15, 16, 17, 18, 19)
SYNTHETIC_SEEN_GOOD = (0, 1, 2)
SYNTHETIC_SEEN_BAD = (3, 4, 5)


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

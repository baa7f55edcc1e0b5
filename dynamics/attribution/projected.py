"""Random projections Φg of per-sequence reward gradients: one TensorSketch of the whole gradient (the default,
`method="sketch"`) or Kronecker-factored per weight matrix (`method="kronecker"`) (docs/math.md §10.2).

Exact attribution (`dynamics.attribution.gradients`) keeps one gradient g = ∇r(x, y) of P scalars per sequence;
projected mode keeps k_total numbers Φg instead, with one fixed random Φ (drawn from `seed`) for every sequence,
so that the features of eval and training sequences are comparable and

    E_Φ[⟨Φg, Φg'⟩] = ⟨g, g'⟩     exactly (an unbiased estimate of every inner product A_ij of §10.1).

Both methods use the same groups of trainable leaves (`projection_plan`: Einsum weights as [C, O], 2-D tables, one
vector group) and the same interceptor, which adds a zero "adapter" to every trainable Einsum's output so that the
backward pass yields the projection of G = Σ_t a_t g_tᵀ without forming G.

Sketch (default; `dynamics.attribution.sketch`, whose docstring has the proof of unbiasedness): all groups add
into ONE k-vector, k_total = k; coordinate (c, o) of a group goes to bucket (h1(c) + h2(o)) mod k with sign
s1(c) s2(o) (hashes and signs independent per group). An Einsum's sketch Σ_t conv(CS1 a_t, CS2 g_t) is ∂r/∂S of
the adapter y_t += CS2ᵀ corr(S, CS1 a_t), S ∈ R^k shared by all layers; tables and the vector group are
differentiated exactly and sketched by the same rule. The variance of ⟨Φg, Φg'⟩ is O(1/k) over the whole k.

Kronecker (LoGra; its variance for a rank-one G is ≈ 1/k_in + 1/k_out = 2/√b per group, b = k/G, far above the
sketch's 1/k): Φ is block-diagonal over groups of trainable leaves; the feature vector is the groups' blocks
concatenated in `ProjectionPlan.groups` order (each block row-major):

- a weight matrix W viewed as [C, O] (an `Einsum` weight: its first n axes, those the layer contracts, are C; a 2-D
  table: embed/embedding or lm_head/w as stored) gets the Kronecker (LoGra) projection

      G ↦ P_inᵀ G P_out  (k_in × k_out),    P_in [C, k_in] ~ N(0, 1/k_in),  P_out [O, k_out] ~ N(0, 1/k_out),

  independent, so E[P_in P_inᵀ] = I_C, E[P_out P_outᵀ] = I_O and
  E⟨P_inᵀ G P_out, P_inᵀ G' P_out⟩ = tr(Gᵀ E[P_in P_inᵀ] G' E[P_out P_outᵀ]) = ⟨G, G'⟩ (a factor with k = its
  dimension is the identity instead: still E[P Pᵀ] = I, with no noise);
- every other trainable leaf (norm scales and biases, Einsum biases, the EX-RM head u) is flattened, all of them
  concatenated into one vector v of n1 scalars, projected densely: v ↦ Pᵀ v with P [n1, k1] ~ N(0, 1/k1).

An Einsum weight's per-sequence gradient G = Σ_t a_t g_tᵀ (a_t: the layer's input rows, g_t: the gradient of r with
respect to its output rows) is never formed: a Flax method interceptor adds ((x P_in) S) P_outᵀ to the layer's
output, with S a zero [k_in, k_out] "core" that is what the backward pass differentiates. At S = 0 the forward is
unchanged and ∂r/∂S = Σ_t P_inᵀ a_t g_tᵀ P_out = P_inᵀ G P_out exactly, at the cost of two thin matmuls per layer;
the Einsum weights themselves are held constant, so no [C, O] gradient exists anywhere. The other leaves are
differentiated exactly in the same backward pass and projected afterwards: the 2-D tables' gradients (e.g. the
[V, D] unembedding of an IM-RM) are materialised per row within a block, memory ∝ block × V × D.

The IM-RM reference pass is skipped (`dynamics.attribution.gradients.policy_reward`), so only the policy forward
is intercepted; every trainable Einsum must be called exactly once per forward pass (a `ModelError` otherwise).

k allocation (`projection_plan`): the requested k is split evenly over the G groups (every matrix leaf, plus the
vector group if any): share b = max(1, ⌊k / G⌋). A matrix gets k_in = min(C, ⌊√b⌋), k_out = min(O, ⌊b / k_in⌋),
then k_in = min(C, ⌊b / k_out⌋) (so k_in·k_out ≤ b, near-square); the vector group gets k1 = min(n1, b). The
width actually used, k_total = Σ k_in·k_out + k1, is ≤ k when k ≥ G (≥ 1 per group otherwise):
`ProjectionPlan.k_total`.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from dynamics.attribution.gradients import Features, policy_reward
from dynamics.attribution.sketch import SketchPlan, adapter_term, draw_hashes, matrix_sketch
from dynamics.batches import PairBatch
from dynamics.chunking import batch_chunks
from dynamics.errors import ModelError
from dynamics.masks import combine, leaf_paths
from dynamics.models.layers import Einsum, contracted_axes
from dynamics.rewards import RewardModel

__all__ = [
    "VECTOR",
    "Group",
    "ProjectionPlan",
    "draw_projections",
    "einsum_sites",
    "projected_features",
    "projected_rows",
    "projection_plan",
    "sketch_plan",
]

#: The name of the group of all non-matrix trainable leaves (projected densely together).
VECTOR = "<vector>"


@dataclasses.dataclass(frozen=True)
class Group:
    """One block of Φ.

    Attributes:
      path: the leaf path ("lm/layers_1/attn/q/w"), or `VECTOR` for the dense group.
      kind: "einsum" (gradient through the interceptor's core), "table" (exact 2-D gradient, then projected) or
        "vector" (the concatenated non-matrix leaves).
      n_in, n_out: the matrix view [C, O] of the leaf ([n1, 1] for the vector group).
      k_in, k_out: the projected block's shape (k_out = 1 for the vector group); k_in·k_out features.
      leaves: the vector group's member leaf paths, in tree order (empty otherwise).
    """

    path: str
    kind: str
    n_in: int
    n_out: int
    k_in: int
    k_out: int
    leaves: tuple[str, ...] = ()

    @property
    def width(self) -> int:
        """k_in·k_out: this group's number of features."""
        return self.k_in * self.k_out


@dataclasses.dataclass(frozen=True)
class ProjectionPlan:
    """The groups of Φ in feature order, and the k that was asked for (hashable: a static jit argument)."""

    groups: tuple[Group, ...]
    requested: int

    @property
    def k_total(self) -> int:
        """The feature width actually used, Σ k_in·k_out over the groups."""
        return sum(g.width for g in self.groups)

    def entries(self) -> list[tuple[str, int, int]]:
        """(leaf path, k_in, k_out) per group, in feature order."""
        return [(g.path, g.k_in, g.k_out) for g in self.groups]

    def einsum_paths(self) -> frozenset[str]:
        """The leaf paths of the trainable Einsum weights (differentiated through cores)."""
        return frozenset(g.path for g in self.groups if g.kind == "einsum")


def _is_einsum_call(context) -> bool:
    return context.method_name == "__call__" and isinstance(context.module, Einsum)


def _site_path(module) -> str:
    """The parameter path of an Einsum's weight: the RM applies the LM with params["lm"]."""
    return "/".join(("lm", *module.path, "w"))


def einsum_sites(rm: RewardModel, params) -> tuple[dict[str, tuple[str, tuple[int, ...]]], Counter]:
    """The Einsum layers one policy forward pass calls: ({weight path: (spec, weight shape)}, calls per path).

    Traced abstractly (`jax.eval_shape`, a one-row two-token batch): nothing is computed.
    """
    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    calls: Counter = Counter()

    def record(next_fun, args, kwargs, context):
        if _is_einsum_call(context):
            path = _site_path(context.module)
            found[path] = (context.module.spec, tuple(context.module.shape))
            calls[path] += 1
        return next_fun(*args, **kwargs)

    row = PairBatch(np.zeros((1, 2), np.int32), np.ones((1, 2), np.int32), np.array([[0, 1]], np.int32))
    with nn.intercept_methods(record):
        jax.eval_shape(lambda p: policy_reward(rm, p, row), params)
    return found, calls


def _split(b: int, n_in: int, n_out: int) -> tuple[int, int]:
    """(k_in, k_out), k_in·k_out ≤ max(b, 1), near-square, k_in ≤ n_in, k_out ≤ n_out."""
    k_in = max(1, min(n_in, math.isqrt(max(b, 1))))
    k_out = max(1, min(n_out, b // k_in))
    return max(1, min(n_in, b // k_out)), k_out


def _check_sites(paths: list[str], sites: dict, calls: Counter) -> None:
    """Every trainable Einsum weight is called exactly once; every trainable "w" of the LM is an Einsum's."""
    for p in paths:
        if p in sites and calls[p] != 1:
            raise ModelError(
                f"projected attribution: the trainable Einsum {p} is called {calls[p]} times in one forward pass; "
                "its Kronecker core needs exactly one call"
            )
        if p.startswith("lm/") and p.endswith("/w") and p != "lm/lm_head/w" and p not in sites:
            raise ModelError(
                f"projected attribution: the trainable weight {p} is not an Einsum layer of the forward pass "
                "(the interceptor never saw it), so its gradient cannot be projected"
            )


def projection_plan(rm: RewardModel, train_tree, frozen, k: int) -> ProjectionPlan:
    """The groups of Φ for the trainable leaves of `train_tree` and their (k_in, k_out), for a requested k ≥ 1.

    Matrix groups (trainable Einsum weights, 2-D tables) in tree order (`dynamics.masks.leaf_paths`), then the
    vector group; the rule that splits k is the module docstring's. `plan.entries()` lists (path, k_in, k_out),
    `plan.k_total` the feature width.

    Raises:
      ModelError: a trainable Einsum called other than once per forward pass, a trainable LM weight "w" that is
        no Einsum of the forward pass, or an Einsum whose spec is not a contraction of x's last axes.
    """
    sites, calls = einsum_sites(rm, combine(train_tree, frozen))
    paths = leaf_paths(train_tree)
    shapes = dict(zip(paths, (x.shape for x in jax.tree.leaves(train_tree)), strict=True))
    _check_sites(paths, sites, calls)
    matrices, vector = [], []
    for p in paths:
        if p in sites:
            spec, shape = sites[p]
            n = contracted_axes(spec)
            if n is None:
                raise ModelError(f"projected attribution: Einsum {p} has spec {spec!r}, not a contraction of x's "
                                 "last axes with w's first axes")  # fmt: skip
            matrices.append((p, "einsum", math.prod(shape[:n]), math.prod(shape[n:])))
        elif len(shapes[p]) == 2 and not p.endswith("/b"):
            matrices.append((p, "table", *shapes[p]))
        else:
            vector.append(p)
    n_groups = len(matrices) + (1 if vector else 0)
    b = max(1, k // n_groups)
    groups = [Group(p, kind, c, o, *_split(b, c, o)) for p, kind, c, o in matrices]
    if vector:
        n1 = sum(math.prod(shapes[p]) for p in vector)
        groups.append(Group(VECTOR, "vector", n1, 1, min(n1, b), 1, tuple(vector)))
    return ProjectionPlan(tuple(groups), int(k))


def draw_projections(plan: ProjectionPlan, seed: int, dtype) -> dict[str, tuple[jax.Array, jax.Array]]:
    """{group path: (P_in [n_in, k_in] ~ N(0, 1/k_in), P_out [n_out, k_out] ~ N(0, 1/k_out))}, from `seed`.

    Group i draws from `fold_in(PRNGKey(seed), i)`. A factor as wide as its dimension (k_in = n_in, k_out = n_out,
    e.g. the vector group's P_out = [[1]]) is the identity: nothing to compress, the factor is exact. Deterministic;
    in `dtype` (the parameters' dtype).
    """
    return _draw_jit(plan, jax.random.PRNGKey(seed), np.dtype(dtype))


def _gaussian(key, n: int, k: int, dtype) -> jax.Array:
    """[n, k] ~ N(0, 1/k); the identity when k = n (no compression, so no noise: E[P Pᵀ] = I either way)."""
    if k == n:
        return jnp.eye(n, dtype=dtype)
    return jax.random.normal(key, (n, k), dtype) / jnp.sqrt(jnp.asarray(k, dtype))


def _draw(plan: ProjectionPlan, key, dtype) -> dict[str, tuple[jax.Array, jax.Array]]:
    out = {}
    for i, g in enumerate(plan.groups):
        k_in, k_out = jax.random.split(jax.random.fold_in(key, i))
        out[g.path] = (_gaussian(k_in, g.n_in, g.k_in, dtype), _gaussian(k_out, g.n_out, g.k_out, dtype))
    return out


_draw_jit = jax.jit(_draw, static_argnums=(0, 2))


def _split_trainable(train_tree, frozen, einsum: frozenset[str]):
    """(rest, fixed): the trainable tree without the Einsum weights, and the frozen tree with them."""
    is_none = lambda x: x is None
    t_leaves, treedef = jax.tree.flatten(train_tree, is_leaf=is_none)
    f_leaves = jax.tree.flatten(frozen, is_leaf=is_none)[0]
    paths = leaf_paths(combine(train_tree, frozen))
    rest, fixed = [], []
    for p, t, f in zip(paths, t_leaves, f_leaves, strict=True):
        move = t is not None and p in einsum
        rest.append(None if move else t)
        fixed.append(t if move else f)
    return jax.tree.unflatten(treedef, rest), jax.tree.unflatten(treedef, fixed)


def _core_term(x, y, core, p_in, p_out):
    """((x2 P_in) S) P_outᵀ reshaped like y: zero at S = 0, its S-gradient P_inᵀ G P_out."""
    x2 = jnp.reshape(x, (-1, p_in.shape[0])).astype(core.dtype)
    return jnp.reshape(((x2 @ p_in) @ core) @ p_out.T, y.shape).astype(y.dtype)


def _intercepted_reward(rm, term, paths: frozenset[str], fixed, row: PairBatch):
    """(adapters, rest) ↦ r(x, y) of one row, with term(path, x, y, adapters) added to every trainable Einsum's
    output (`paths`): the Kronecker cores or the shared sketch vector."""

    def reward(adapters, rest):
        calls: Counter = Counter()

        def add_term(next_fun, args, kwargs, context):
            y = next_fun(*args, **kwargs)
            if not _is_einsum_call(context):
                return y
            path = _site_path(context.module)
            if path not in paths:
                return y
            calls[path] += 1
            return y + term(path, args[0], y, adapters)

        with nn.intercept_methods(add_term):
            r = policy_reward(rm, combine(rest, fixed), row)[0]
        wrong = {p: calls[p] for p in paths if calls[p] != 1}
        if wrong:
            raise ModelError(f"projected attribution: trainable Einsum layers called other than once per forward "
                             f"pass: {wrong}")  # fmt: skip
        return r

    return reward


def _row_features(rm, plan: ProjectionPlan, projections, rest, fixed, tokens, attention, response) -> jax.Array:
    """Φ∇r(x, y) of one row, [k_total]: one backward pass for the cores and the other trainable leaves."""
    dtype = projections[plan.groups[0].path][0].dtype
    cores = {g.path: jnp.zeros((g.k_in, g.k_out), dtype) for g in plan.groups if g.kind == "einsum"}
    row = PairBatch(tokens[None], attention[None], response[None])
    term = lambda path, x, y, c: _core_term(x, y, c[path], *projections[path])
    reward = _intercepted_reward(rm, term, plan.einsum_paths(), fixed, row)
    g_cores, g_rest = jax.grad(reward, argnums=(0, 1))(cores, rest)
    exact = dict(zip(leaf_paths(g_rest), jax.tree.leaves(g_rest), strict=True))
    out = []
    for g in plan.groups:
        p_in, p_out = projections[g.path]
        if g.kind == "einsum":
            block = g_cores[g.path]
        elif g.kind == "table":
            block = p_in.T @ (exact[g.path].astype(dtype) @ p_out)
        else:
            v = jnp.concatenate([jnp.reshape(exact[p], (-1,)).astype(dtype) for p in g.leaves])
            block = v @ p_in
        out.append(jnp.reshape(block, (-1,)))
    return jnp.concatenate(out)


def _sketch_row_features(rm, plan: SketchPlan, hashes, rest, fixed, tokens, attention, response) -> jax.Array:
    """The TensorSketch Φ∇r(x, y) of one row, [k]: one backward pass for the shared vector S and the other leaves."""
    dtype = hashes[plan.groups[0].path][1].dtype
    k = plan.requested
    row = PairBatch(tokens[None], attention[None], response[None])
    term = lambda path, x, y, s: adapter_term(x, y, s, hashes[path])
    reward = _intercepted_reward(rm, term, plan.einsum_paths(), fixed, row)
    out, g_rest = jax.grad(reward, argnums=(0, 1))(jnp.zeros((k,), dtype), rest)
    exact = dict(zip(leaf_paths(g_rest), jax.tree.leaves(g_rest), strict=True))
    for g in plan.groups:
        if g.kind == "table":
            out = out + matrix_sketch(exact[g.path].astype(dtype), hashes[g.path], k)
        elif g.kind == "vector":
            v = jnp.concatenate([jnp.reshape(exact[p], (-1,)).astype(dtype) for p in g.leaves])
            out = out + matrix_sketch(v[:, None], hashes[g.path], k)
    return out


def projected_rows(rm: RewardModel, plan, projections, rest, fixed, batch: PairBatch) -> jax.Array:
    """Φ∇r(x_n, y_n) for every row n of `batch`, [n, k_total] (one backward pass per row, `jax.vmap` over rows).

    Args:
      rm: the reward model (static under jit).
      plan: the groups of Φ (static): a `ProjectionPlan` (Kronecker) or a `SketchPlan` (TensorSketch).
      projections: `draw_projections(plan, ...)`, or `dynamics.attribution.sketch.draw_hashes(plan, ...)`.
      rest, fixed: the trainable tree without its Einsum weights and the frozen tree with them.
      batch: a stripped `PairBatch` [n, T].
    """
    arrays = (jnp.asarray(batch.tokens), jnp.asarray(batch.attention_mask), jnp.asarray(batch.response_mask))
    one = _sketch_row_features if isinstance(plan, SketchPlan) else _row_features
    return jax.vmap(lambda *row: one(rm, plan, projections, rest, fixed, *row))(*arrays)


_projected_rows_jit = jax.jit(projected_rows, static_argnums=(0, 1))


def sketch_plan(rm: RewardModel, train_tree, frozen, k: int) -> SketchPlan:
    """The groups of the TensorSketch (those of `projection_plan`, whose k_in/k_out it ignores) and k; k_total = k.

    Raises:
      ModelError: see `projection_plan`.
    """
    return SketchPlan(projection_plan(rm, train_tree, frozen, max(int(k), 1)).groups, int(k))


def projected_features(
    rm: RewardModel,
    train_tree,
    frozen,
    *,
    k: int,
    seed: int,
    block: int = 8,
    mesh=None,
    progress: Any = None,
    plan: ProjectionPlan | SketchPlan | None = None,
    method: str = "sketch",
) -> Features:
    """The projected features: `batch` ↦ [Φ∇r(x_n, y_n)]_n, [n, k_total], `block` rows at a time.

    The same Φ (from `seed`) for every call; E[⟨Φg, Φg'⟩] = ⟨g, g'⟩ over the draw of Φ. Features are in the
    parameters' dtype, in reward units per unit of parameter, like the exact gradients.

    Args:
      rm: the reward model.
      train_tree, frozen: the partitioned parameters (`dynamics.masks.partition`).
      k: the requested projection size (≥ 1).
      seed: the seed of Φ.
      block: rows per compiled backward pass; with a mesh, a multiple of its devices.
      mesh: a `jax.sharding.Mesh`: each block's rows are split over its devices.
      progress: a tqdm-like bar to advance by the number of rows done, or None.
      plan: `sketch_plan(...)` or `projection_plan(...)` (matching `method`) if already made (then `k` is not read
        again).
      method: "sketch" (default: one TensorSketch of width k_total = k over all groups,
        `dynamics.attribution.sketch`) or "kronecker" (LoGra P_inᵀ G P_out per matrix, k split over the groups,
        k_total ≤ k: `projection_plan`).

    Returns:
      The features map; its attribute `plan` is the plan used (`plan.k_total` the feature width).

    Raises:
      ModelError: see `projection_plan`.
      ValueError: an unknown `method`, or a `plan` of the other method.
    """
    kinds = {"sketch": (SketchPlan, sketch_plan), "kronecker": (ProjectionPlan, projection_plan)}
    if method not in kinds:
        raise ValueError(f"projected attribution: method {method!r} is not one of {sorted(kinds)}")
    plan_type, make = kinds[method]
    plan = make(rm, train_tree, frozen, k) if plan is None else plan
    if not isinstance(plan, plan_type):
        raise ValueError(f"projected attribution: method {method!r} needs a {plan_type.__name__}, not {plan!r}")
    dtype = jax.tree.leaves(train_tree)[0].dtype
    draw = draw_hashes if method == "sketch" else draw_projections
    projections = draw(plan, seed, dtype)
    rest, fixed = _split_trainable(train_tree, frozen, plan.einsum_paths())

    def features(batch: PairBatch) -> jax.Array:
        out = []
        for chunk, keep in batch_chunks(batch, block, mesh):
            out.append(_projected_rows_jit(rm, plan, projections, rest, fixed, chunk)[:keep])
            if progress is not None:
                progress.update(keep)
        return jnp.concatenate(out) if len(out) > 1 else out[0]

    features.plan = plan  # type: ignore[attr-defined]
    return features

"""Projected attribution features (dynamics.attribution.projected, docs/math.md §10.2) against exact gradients.

- the Kronecker cores' gradient equals P_inᵀ G P_out of the exact per-sequence gradient G (jax.grad), every group;
- E_Φ⟨Φg_a, Φg_b⟩ = ⟨g_a, g_b⟩: the mean over many seeds is within 5 standard errors of the exact value;
- the interceptor sees every trainable Einsum once, and refuses a model that breaks that;
- determinism, the reported width, and `contribution_matrix(mode="projected")` approaching exact as k grows.

Tiny random models in float64 (`x64` fixture), built as in tests/test_delta.py.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_delta import _rm, _setup

from dynamics.attribution import EvalSet, contribution_matrix
from dynamics.attribution.gradients import gradient_features
from dynamics.attribution.projected import (
    VECTOR,
    draw_projections,
    einsum_sites,
    projected_features,
    projection_plan,
    sketch_plan,
)
from dynamics.attribution.sketch import circular_conv, circular_corr, draw_hashes
from dynamics.batches import PairBatch
from dynamics.chunking import strip
from dynamics.errors import ModelError
from dynamics.masks import combine, leaf_paths, partition, prepare, trainable_mask
from dynamics.models.layers import contracted_axes
from dynamics.rewards import ExplicitRM


def _trees(kind, spec, family="llama", tied=True, n_train=1):
    lm, params, train, unseen = _setup(family, tied, n_train)
    rm, p = _rm(kind, lm, params)
    rm, p, spec = prepare(rm, p, spec)
    train_tree, frozen = partition(p, trainable_mask(rm, p, spec))
    return rm, p, train_tree, frozen, train, strip(unseen)


def _with_variants(batch: PairBatch) -> PairBatch:
    """Rows [a0, a0', a1, a1', a2, a2']: a' is a with its first response token changed (correlated gradients)."""
    tok, att, resp = (np.asarray(x)[:3] for x in (batch.tokens, batch.attention_mask, batch.response_mask))
    var = tok.copy()
    first = np.argmax(resp, axis=1)
    var[np.arange(3), first] = (var[np.arange(3), first] + 7) % 40
    inter = lambda a, b: np.stack([a, b], axis=1).reshape(6, -1)
    return PairBatch(inter(tok, var), inter(att, att), inter(resp, resp))


def _explicit_projection(rm, train_tree, frozen, plan, projections, batch: PairBatch) -> np.ndarray:
    """P_inᵀ G P_out (and Pᵀ v) of the exact per-sequence gradient from jax.grad of the full reward, [n, k_total]."""
    grad_fn = jax.jit(jax.grad(lambda tr, *row: rm.reward(combine(tr, frozen), PairBatch(*row))[0]))
    rows = []
    for n in range(batch.batch_size):
        grad = grad_fn(train_tree, *(np.asarray(x)[n : n + 1] for x in (batch.tokens, batch.attention_mask,
                                                                          batch.response_mask)))  # fmt: skip
        exact = dict(zip(leaf_paths(grad), (np.asarray(x) for x in jax.tree.leaves(grad)), strict=True))
        out = []
        for g in plan.groups:
            p_in, p_out = (np.asarray(x) for x in projections[g.path])
            if g.kind == "vector":
                out.append(np.concatenate([exact[p].ravel() for p in g.leaves]) @ p_in)
            else:
                G = exact[g.path].reshape(g.n_in, g.n_out)  # an Einsum's contracted axes lead
                out.append((p_in.T @ G @ p_out).ravel())
        rows.append(np.concatenate(out))
    return np.stack(rows)


@pytest.mark.parametrize(
    "kind,spec,family,tied",
    [("ex", "all", "llama", True), pytest.param("im", "last:1", "llama", True, marks=pytest.mark.slow),
     ("im", "all", "gpt_neox", False), pytest.param("ex-mean", "last:1", "gpt_neox", False, marks=pytest.mark.slow)],
)  # fmt: skip
def test_core_gradient_is_the_projection_of_the_exact_gradient(x64, kind, spec, family, tied):
    rm, _, train_tree, frozen, _, unseen = _trees(kind, spec, family, tied)
    unseen = unseen.select(np.arange(3))
    plan = projection_plan(rm, train_tree, frozen, 96)
    kinds = {g.kind for g in plan.groups}
    assert "einsum" in kinds and "vector" in kinds
    assert ("table" in kinds) == (spec == "all" or kind == "im")  # embedding (all) or the untied unembedding
    feats = np.asarray(projected_features(rm, train_tree, frozen, k=96, seed=3, block=3, method="kronecker")(unseen))
    want = _explicit_projection(rm, train_tree, frozen, plan, draw_projections(plan, 3, jnp.float64), unseen)
    assert feats.shape == want.shape == (unseen.batch_size, plan.k_total)
    assert np.abs(want).max() > 1e-6
    assert np.abs(feats - want).max() <= 1e-10 * np.abs(want).max()


def test_plan_covers_every_trainable_leaf_once(x64):
    rm, params, train_tree, frozen, _, _ = _trees("im", "all", "gpt_neox", False)
    sites, calls = einsum_sites(rm, params)
    assert set(calls.values()) == {1}  # every Einsum of the policy forward, once (no reference pass)
    c = rm.lm.config
    assert len(sites) == (7 if c.gated_mlp else 6) * c.n_layers
    plan = projection_plan(rm, train_tree, frozen, 200)
    covered = [g.path for g in plan.groups if g.kind != "vector"] + list(plan.groups[-1].leaves)
    assert sorted(covered) == sorted(leaf_paths(train_tree))
    assert {g.path for g in plan.groups if g.kind == "einsum"} == set(sites)
    for g in plan.groups:
        if g.kind == "einsum":
            spec, shape = sites[g.path]
            n = contracted_axes(spec)
            assert (g.n_in, g.n_out) == (math.prod(shape[:n]), math.prod(shape[n:]))
        assert 1 <= g.k_in <= g.n_in and 1 <= g.k_out <= g.n_out
    assert plan.groups[-1].path == VECTOR and plan.groups[-1].k_out == 1
    assert plan.k_total == sum(a * b for _, a, b in plan.entries()) <= 200
    # fewer than one feature per group: every group keeps one
    assert projection_plan(rm, train_tree, frozen, 1).k_total == len(plan.groups)


@dataclasses.dataclass(frozen=True)
class _TwiceRM(ExplicitRM):
    """An EX-RM whose reward runs the LM twice: its Einsums are called twice per reward."""

    def reward(self, params, batch):
        return super().reward(params, batch) + 0.5 * super().reward(params, batch)


def test_interceptor_refuses_what_it_cannot_project(x64):
    rm, params, train_tree, frozen, _, unseen = _trees("ex", "last:1")
    twice = _TwiceRM(rm.lm)
    with pytest.raises(ModelError, match="called 2 times"):
        projected_features(twice, train_tree, frozen, k=32, seed=0, method="kronecker")
    with pytest.raises(ModelError, match="called 2 times"):
        projected_features(twice, train_tree, frozen, k=32, seed=0)
    extra = {**train_tree, "lm": {**train_tree["lm"], "extra": {"w": jnp.ones((3, 3))}}}
    extra_frozen = {**frozen, "lm": {**frozen["lm"], "extra": {"w": None}}}
    with pytest.raises(ModelError, match="lm/extra/w is not an Einsum"):
        projection_plan(rm, extra, extra_frozen, 32)


@pytest.mark.parametrize("method", [pytest.param("kronecker", marks=pytest.mark.slow), "sketch"])
@pytest.mark.parametrize("kind", ["ex", "im"])
@pytest.mark.parametrize("spec", ["all", "last:1"])
def test_inner_products_are_unbiased(x64, kind, spec, method):
    rm, _, train_tree, frozen, _, unseen = _trees(kind, spec)
    batch = _with_variants(unseen)
    g = np.asarray(gradient_features(rm, train_tree, frozen, block=6)(batch))
    exact = g @ g.T
    plan = (projection_plan if method == "kronecker" else sketch_plan)(rm, train_tree, frozen, 128)
    draws = []
    for seed in range(200):
        f = projected_features(rm, train_tree, frozen, k=128, seed=seed, block=6, plan=plan, method=method)(batch)
        f = np.asarray(f)
        draws.append(f @ f.T)
    draws = np.stack(draws)
    mean, se = draws.mean(0), draws.std(0, ddof=1) / np.sqrt(len(draws))
    assert np.all(np.abs(mean - exact) <= 5 * se + 1e-12 * np.abs(exact).max())
    # the test has power: on each sequence and on each pair (a, a') the standard error is a small fraction
    for a in (0, 2, 4):
        assert se[a, a] <= 0.1 * exact[a, a]
        assert se[a, a + 1] <= 0.2 * abs(exact[a, a + 1])


def test_features_are_deterministic_and_as_wide_as_reported(x64):
    rm, _, train_tree, frozen, _, unseen = _trees("im", "last:1")
    f = projected_features(rm, train_tree, frozen, k=40, seed=5, block=3)
    a, b = np.asarray(f(unseen)), np.asarray(f(unseen))
    again = np.asarray(projected_features(rm, train_tree, frozen, k=40, seed=5, block=2)(unseen))
    other = np.asarray(projected_features(rm, train_tree, frozen, k=40, seed=6, block=3)(unseen))
    assert a.shape == (unseen.batch_size, f.plan.k_total) and f.plan.k_total == 40  # the sketch: k_total = k
    kron = projected_features(rm, train_tree, frozen, k=40, seed=5, block=3, method="kronecker")
    assert np.asarray(kron(unseen)).shape == (unseen.batch_size, kron.plan.k_total) and kron.plan.k_total <= 40
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(again, a, rtol=1e-12, atol=1e-14)  # same Φ whatever the block
    assert np.abs(other - a).max() > 1e-3 * np.abs(a).max()


@pytest.mark.parametrize("kind", [pytest.param("ex", marks=pytest.mark.slow), "im"])
def test_contribution_matrix_projected_approaches_exact(x64, kind):
    """contribution_matrix(mode="projected") (the sketch): the mean squared error of C over seeds falls by far from
    k = 8 to k = 4096 (O(1/k)), and the weights are exact."""
    rm, params, _, _, train, unseen = _trees(kind, "last:1", n_train=6)
    evalset = EvalSet(unseen)
    exact = contribution_matrix(rm, params, train, evalset, params_spec="last:1", lr=0.1, block=4)
    err = {}
    for k in (8, 4096):
        runs = [
            contribution_matrix(rm, params, train, evalset, params_spec="last:1", lr=0.1, block=4,
                                mode="projected", project=k, seed=seed)
            for seed in range(4)
        ]  # fmt: skip
        for run in runs:
            assert run.contribution.shape == (5, 6)
            assert run.meta["mode"] == "projected" and run.meta["project"] == k
            np.testing.assert_allclose(run.weight, exact.weight, rtol=1e-12)
        diff = np.stack([run.contribution - exact.contribution for run in runs])
        err[k] = np.mean(np.square(diff)) / np.mean(np.square(exact.contribution))
    assert err[4096] < 0.05 * err[8]


def test_circular_correlation_is_the_adjoint_of_convolution(x64):
    rng = np.random.default_rng(0)
    for k in (7, 16):
        s, u, v = (rng.standard_normal(k) for _ in range(3))
        want = np.array([sum(u[i] * v[(b - i) % k] for i in range(k)) for b in range(k)])  # conv by its definition
        conv = np.asarray(circular_conv(jnp.asarray(u), jnp.asarray(v)))
        np.testing.assert_allclose(conv, want, rtol=1e-12, atol=1e-12)
        corr = np.asarray(circular_corr(jnp.asarray(s), jnp.asarray(u)))
        np.testing.assert_allclose(s @ conv, corr @ v, rtol=1e-12)


def _explicit_sketch(rm, train_tree, frozen, plan, hashes, batch: PairBatch) -> np.ndarray:
    """The CountSketch (bucket (h1(c) + h2(o)) mod k, sign s1(c) s2(o)) of the exact per-sequence gradient from
    jax.grad of the full reward, applied by plain numpy: [n, k]."""
    grad_fn = jax.jit(jax.grad(lambda tr, *row: rm.reward(combine(tr, frozen), PairBatch(*row))[0]))
    k, rows = plan.k_total, []
    for n in range(batch.batch_size):
        grad = grad_fn(train_tree, *(np.asarray(x)[n : n + 1] for x in (batch.tokens, batch.attention_mask,
                                                                          batch.response_mask)))  # fmt: skip
        exact = dict(zip(leaf_paths(grad), (np.asarray(x) for x in jax.tree.leaves(grad)), strict=True))
        out = np.zeros(k)
        for g in plan.groups:
            h1, s1, h2, s2 = (np.asarray(x) for x in hashes[g.path])
            if g.kind == "vector":
                G = np.concatenate([exact[p].ravel() for p in g.leaves])[:, None]
            else:
                G = exact[g.path].reshape(g.n_in, g.n_out)
            np.add.at(out, ((h1[:, None] + h2[None, :]) % k).ravel(), (s1[:, None] * s2[None, :] * G).ravel())
        rows.append(out)
    return np.stack(rows)


@pytest.mark.parametrize(
    "kind,spec,family,tied",
    [("ex", "all", "llama", True), ("im", "last:1", "llama", True), ("im", "all", "gpt_neox", False)],
)  # fmt: skip
def test_sketch_is_the_count_sketch_of_the_exact_gradient(x64, kind, spec, family, tied):
    rm, _, train_tree, frozen, _, unseen = _trees(kind, spec, family, tied)
    unseen = unseen.select(np.arange(3))
    plan = sketch_plan(rm, train_tree, frozen, 96)
    assert {g.kind for g in plan.groups} >= {"einsum", "vector"}
    f = projected_features(rm, train_tree, frozen, k=96, seed=3, block=3)
    assert f.plan == plan and plan.k_total == 96
    feats = np.asarray(f(unseen))
    want = _explicit_sketch(rm, train_tree, frozen, plan, draw_hashes(plan, 3, jnp.float64), unseen)
    assert feats.shape == want.shape == (unseen.batch_size, 96)
    assert np.abs(want).max() > 1e-6
    assert np.abs(feats - want).max() <= 1e-10 * np.abs(want).max()


def test_sketch_beats_kronecker_at_equal_k(x64):
    """The mean squared error of the inner products over seeds, at the same k: the sketch's is the smaller."""
    rm, _, train_tree, frozen, _, unseen = _trees("im", "all")
    batch = _with_variants(unseen)
    g = np.asarray(gradient_features(rm, train_tree, frozen, block=6)(batch))
    exact = g @ g.T
    k, mse = 256, {}
    for method, make in (("kronecker", projection_plan), ("sketch", sketch_plan)):
        plan = make(rm, train_tree, frozen, k)
        err = []
        for seed in range(40):
            f = np.asarray(projected_features(rm, train_tree, frozen, k=k, seed=seed, block=6, plan=plan,
                                              method=method)(batch))  # fmt: skip
            err.append(np.mean(np.square(f @ f.T - exact)))
        mse[method] = np.mean(err) / np.mean(np.square(exact))
    assert mse["sketch"] < 0.5 * mse["kronecker"], mse

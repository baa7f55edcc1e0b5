"""Bootstrap intervals over seeds and prompts (dynamics.intervals, docs/math.md §6.2.2): the replicates and the
percentile interval recomputed by hand, loops and sorting, on a fixed small sample; the bootstrap distribution's
mean and variance against exact enumeration; pairing; bad input."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from dynamics.errors import DataError
from dynamics.intervals import bootstrap_interval, paired_difference


def _hand_quantile(sorted_values, q):
    """The linear-interpolation quantile, written out: position q (n − 1) between two order statistics."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (pos - lo) * (sorted_values[hi] - sorted_values[lo])


def test_matches_a_hand_computation():
    v = [[1.0, 0.0, 0.5], [0.5, 1.0, 1.0]]  # 2 seeds × 3 prompts
    B, seed = 40, 7
    got = bootstrap_interval(v, n_boot=B, level=0.9, seed=seed)
    rng = np.random.default_rng(seed)  # the documented draw order: all seed draws, then all prompt draws
    seeds = rng.integers(0, 2, size=(B, 2)).tolist()
    prompts = rng.integers(0, 3, size=(B, 3)).tolist()
    replicates = []
    for b in range(B):
        total = 0.0
        for s in seeds[b]:
            for p in prompts[b]:
                total += v[s][p]
        replicates.append(total / 6)
    replicates.sort()
    assert got.mean == pytest.approx(4.0 / 6)
    assert got.low == pytest.approx(_hand_quantile(replicates, 0.05), abs=1e-12)
    assert got.high == pytest.approx(_hand_quantile(replicates, 0.95), abs=1e-12)
    assert (got.n_seeds, got.n_prompts, got.n_boot, got.level) == (2, 3, B, 0.9)


def test_bootstrap_distribution_against_exact_enumeration():
    """One seed, four prompts: the 4⁴ equally likely resamples give the exact mean and variance of v̄*."""
    v = np.array([0.0, 0.25, 1.0, 1.0])
    means = [np.mean(v[list(idx)]) for idx in itertools.product(range(4), repeat=4)]
    exact_var = np.var(means)
    got = bootstrap_interval(v, n_boot=20_000, seed=1)
    assert got.mean == pytest.approx(v.mean())
    # the interval of a distribution with mean 0.5625, sd ≈ 0.21: its ends lie within ~2 sd of the mean
    assert got.low < v.mean() < got.high
    assert (got.high - got.low) == pytest.approx(2 * 1.96 * math.sqrt(exact_var), rel=0.25)
    assert abs(exact_var - np.var(v) / 4) < 1e-12  # the bootstrap variance of a mean: σ̂² / n


def test_paired_difference_and_constant_values():
    a = np.array([[1.0, 1.0, 0.0], [1.0, 0.5, 0.5]])
    b = a - 0.25
    d = paired_difference(a, b, n_boot=500)
    assert (d.mean, d.low, d.high) == pytest.approx((0.25, 0.25, 0.25))  # a constant difference has no spread
    assert d.excludes(0.0) and not d.excludes(0.25)
    flat = bootstrap_interval(np.ones((3, 5)), n_boot=100)
    assert (flat.low, flat.high) == (1.0, 1.0)


def test_bad_input():
    with pytest.raises(DataError, match=r"\[S seeds, P prompts\]"):
        bootstrap_interval(np.ones((2, 2, 2)))
    with pytest.raises(DataError, match=r"with S, P ≥ 1, got \(1, 0\)"):
        bootstrap_interval([])
    with pytest.raises(DataError, match="finite"):
        bootstrap_interval([1.0, float("nan")])
    with pytest.raises(DataError, match="one shape"):
        paired_difference(np.ones((2, 3)), np.ones((3, 2)))
    with pytest.raises(ValueError, match="level"):
        bootstrap_interval([1.0], level=1.0)

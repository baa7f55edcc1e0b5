"""Theorem 1 (docs/math.md §4): the verifier construction, its bound and the odds-ratio identity.

Expected values are computed here independently (closed forms in numpy/math), never copied from the code.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import logsumexp

from dynamics.errors import ConfigError
from theory.theorem1 import (
    check_verifier,
    construction_from_counts,
    construction_from_masses,
    verifier_construction,
)


@st.composite
def instances(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, float, float]:
    """A random full-support π_ref [P, N], a non-trivial C, β and δ (e^{δ/β} up to e^{5000})."""
    seed = draw(st.integers(0, 2**32 - 1))
    n_prompts = draw(st.integers(1, 4))
    n_resp = draw(st.integers(2, 12))
    rng = np.random.default_rng(seed)
    # log-uniform probabilities over many orders of magnitude, normalised
    ref = np.exp(rng.uniform(-30, 0, size=(n_prompts, n_resp)))
    ref /= ref.sum(axis=1, keepdims=True)
    correct = np.zeros((n_prompts, n_resp), dtype=bool)
    for i in range(n_prompts):
        k = rng.integers(1, n_resp)
        correct[i, rng.choice(n_resp, size=k, replace=False)] = True
    beta = draw(st.floats(1e-3, 10.0))
    delta = draw(st.floats(1e-3, 5.0))
    return ref, correct, beta, delta


@settings(max_examples=150, deadline=None)
@given(instances())
def test_construction_is_a_delta_verifier_within_the_bound(inst: tuple) -> None:
    ref, correct, beta, delta = inst
    res = verifier_construction(ref, correct, beta, delta)
    tilt = delta / beta

    # Independent construction: ln π = ln π_ref + tilt·1[C] − ln Z, ln Z by logsumexp per prompt.
    log_ref = np.log(ref) - logsumexp(np.log(ref), axis=1, keepdims=True)
    tilted = log_ref + tilt * correct
    log_pi = tilted - logsumexp(tilted, axis=1, keepdims=True)
    np.testing.assert_allclose(res.log_pi, log_pi, rtol=1e-12, atol=1e-9)

    rewards = beta * (log_pi - log_ref)
    margin = np.array([r[c].min() - r[~c].max() for r, c in zip(rewards, correct, strict=True)])
    assert np.all(margin >= delta - 1e-9 * max(1.0, delta))
    np.testing.assert_allclose(res.margin, delta, rtol=1e-9, atol=1e-9)
    assert np.all(res.is_verifier)

    # π(C) ≤ e^{δ/β} π_ref(C), in logs.
    log_ref_c = np.array([logsumexp(lr[c]) for lr, c in zip(log_ref, correct, strict=True)])
    log_pi_c = np.array([logsumexp(lp[c]) for lp, c in zip(log_pi, correct, strict=True)])
    assert np.all(log_pi_c <= tilt + log_ref_c + 1e-9)
    assert np.all(res.masses.log_mass <= res.masses.log_bound + 1e-9)

    # Odds ratio = e^{δ/β}: ln odds(π) − ln odds(π_ref) = δ/β.
    log_not = lambda lp, c: logsumexp(lp[~c])  # noqa: E731
    odds_pi = np.array([a - log_not(lp, c) for a, lp, c in zip(log_pi_c, log_pi, correct, strict=True)])
    odds_ref = np.array([a - log_not(lr, c) for a, lr, c in zip(log_ref_c, log_ref, correct, strict=True)])
    np.testing.assert_allclose(odds_pi - odds_ref, tilt, rtol=1e-9, atol=1e-8)
    np.testing.assert_allclose(res.masses.log_odds_ratio, tilt, rtol=1e-9, atol=1e-8)


def test_huge_tilt_does_not_overflow() -> None:
    """β = 0.01, δ = 1: e^{100}; δ = 10: e^{1000} overflows float64 unless done in logs."""
    ref = np.array([1e-12, 0.5 - 1e-12, 0.5])
    correct = np.array([True, False, False])
    for delta in (1.0, 10.0):
        res = verifier_construction(ref, correct, beta=0.01, delta=delta)
        assert np.all(np.isfinite(res.log_pi)) and np.all(np.isfinite(res.rewards))
        assert res.masses.log_odds_ratio[0] == pytest.approx(delta / 0.01, rel=1e-12)
        assert res.masses.log_bound[0] == pytest.approx(delta / 0.01 + math.log(1e-12), rel=1e-12)
        # Z = 1 + (e^{δ/β} − 1)p, π(C) = e^{δ/β}p/Z, in logs.
        log_z = np.logaddexp(delta / 0.01 + math.log(1e-12), math.log1p(-1e-12))
        assert res.masses.log_mass[0] == pytest.approx(delta / 0.01 + math.log(1e-12) - log_z, abs=1e-12)
        np.testing.assert_allclose(res.margin, delta, rtol=1e-12)
    assert np.isinf(res.masses.bound[0])  # e^{1000}·1e-12 overflows; the log is what to read
    assert json.loads(json.dumps(res.to_dict()))["bound"] == ["inf"]


def test_counts_match_the_enumerated_response_set() -> None:
    """Uniform π_ref over 7! orderings with 14 correct (a 7-cycle): counts vs the explicit vector."""
    n_total, n_correct = math.factorial(7), 14
    ref = np.full((1, n_total), 1.0 / n_total)
    mask = np.zeros((1, n_total), dtype=bool)
    mask[0, :n_correct] = True
    for delta in (1.0, 0.05, 0.01):
        vec = verifier_construction(ref, mask, beta=0.01, delta=delta)
        cnt = construction_from_counts(n_correct, n_total, beta=0.01, delta=delta)
        p = n_correct / n_total
        expected = math.log(math.exp(delta / 0.01) * p / (1 + (math.exp(delta / 0.01) - 1) * p))
        assert cnt.log_mass[0] == pytest.approx(expected, rel=1e-12, abs=1e-12)
        assert vec.masses.log_mass[0] == pytest.approx(expected, rel=1e-9, abs=1e-9)
        assert cnt.log_odds_ratio[0] == pytest.approx(delta / 0.01, rel=1e-12)


def test_hamiltonian_numbers() -> None:
    """N = 10: π_ref(C) = 20/10!; with δ = 0.01, β = 0.01 the gain is below e."""
    cnt = construction_from_counts(20, math.factorial(10), beta=0.01, delta=0.01)
    assert cnt.ref_mass[0] == pytest.approx(20 / 3_628_800, rel=1e-12)
    assert cnt.mass[0] <= math.e * 20 / 3_628_800
    assert cnt.mass[0] == pytest.approx(math.e * 20 / 3_628_800 / (1 + (math.e - 1) * 20 / 3_628_800), rel=1e-12)


def test_masses_equal_counts() -> None:
    a = construction_from_masses([math.log(0.25)], [math.log(0.75)], beta=0.5, delta=1.0)
    b = construction_from_counts(1, 4, beta=0.5, delta=1.0)
    np.testing.assert_allclose(a.log_mass, b.log_mass, rtol=1e-14)


@settings(max_examples=100, deadline=None)
@given(instances(), st.integers(0, 2**32 - 1))
def test_check_verifier_on_any_distribution(inst: tuple, seed: int) -> None:
    """For any π: ln odds ratio ≥ margin/β; for δ-verifiers therefore ≥ δ/β (docs/math.md §4 "Tightness")."""
    ref, correct, beta, delta = inst
    rng = np.random.default_rng(seed)
    pi = rng.dirichlet(np.ones(ref.shape[1]), size=ref.shape[0])
    chk = check_verifier(pi, ref, correct, beta, delta)
    rewards = beta * (np.log(pi) - np.log(ref))
    margin = np.array([r[c].min() - r[~c].max() for r, c in zip(rewards, correct, strict=True)])
    np.testing.assert_allclose(chk.margin, margin, rtol=1e-9, atol=1e-9)
    odds = lambda p, c: math.log(p[c].sum()) - math.log(p[~c].sum())  # noqa: E731
    log_or = np.array([odds(p, c) - odds(r, c) for p, r, c in zip(pi, ref, correct, strict=True)])
    np.testing.assert_allclose(chk.masses.log_odds_ratio, log_or, rtol=1e-7, atol=1e-7)
    assert np.all(log_or >= margin / beta - 1e-7 * np.maximum(1, np.abs(margin / beta)))
    assert np.all(chk.respects_odds_bound)
    np.testing.assert_array_equal(chk.is_verifier, margin >= delta - 1e-9)


def test_check_verifier_on_the_construction_and_on_stronger_verifiers() -> None:
    ref = np.array([[0.1, 0.2, 0.3, 0.4]])
    correct = np.array([[True, False, True, False]])
    beta, delta = 0.5, 0.3
    pi = np.exp(verifier_construction(ref, correct, beta, delta).log_pi)
    chk = check_verifier(pi, ref, correct, beta, delta)
    assert chk.is_verifier.all() and chk.respects_odds_bound.all() and chk.within_generation_bound.all()
    assert chk.masses.log_odds_ratio[0] == pytest.approx(delta / beta, rel=1e-9)
    # A verifier with margin 2δ raises π(C) beyond e^{δ/β}π_ref(C) when π_ref(C) is small enough.
    ref2 = np.array([[0.01, 0.99]])
    c2 = np.array([[True, False]])
    pi2 = np.exp(verifier_construction(ref2, c2, beta, 2 * delta).log_pi)
    chk2 = check_verifier(pi2, ref2, c2, beta, delta)
    assert chk2.is_verifier.all() and chk2.respects_odds_bound.all()
    assert not chk2.within_generation_bound.any()
    # π = π_ref: margin 0, not a verifier.
    chk3 = check_verifier(ref, ref, correct, beta, delta)
    assert not chk3.is_verifier.any()
    # zero mass on a correct response: reward −∞, not a verifier, no warning.
    chk4 = check_verifier([[0.0, 0.5, 0.5, 0.0]], ref, correct, beta, delta)
    assert not chk4.is_verifier.any()


def test_save_roundtrip(tmp_path) -> None:  # noqa: ANN001
    res = verifier_construction([[0.2, 0.3, 0.5]], [[True, False, False]], beta=0.1, delta=0.2)
    path = res.save(tmp_path / "t1.json")
    data = json.loads(path.read_text())
    assert data["margin"] == pytest.approx([0.2])
    assert data["log_odds_ratio"] == pytest.approx([2.0])
    assert len(data["rewards"][0]) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["t1.json"]  # no temporary file left behind


@pytest.mark.parametrize(
    ("ref", "correct", "kwargs", "match"),
    [
        ([[0.5, 0.6]], [[True, False]], {}, r"sums to 1\.1"),
        ([[-0.1, 1.1]], [[True, False]], {}, r"must be >= 0"),
        ([[0.0, 1.0]], [[True, False]], {}, r"full support"),
        ([[0.5, 0.5]], [[True, False, False]], {}, r"shape \(1, 3\), expected \(1, 2\)"),
        ([[0.5, 0.5]], [[False, False]], {}, r"C is empty for prompt 0"),
        ([[0.5, 0.5]], [[True, True]], {}, r"contains every response"),
        ([[0.5, 0.5]], [[True, False]], {"beta": 0.0}, r"beta must be a finite number > 0"),
        ([[0.5, 0.5]], [[True, False]], {"delta": -1.0}, r"delta must be a finite number > 0"),
        ([[[0.5, 0.5]]], [[True, False]], {}, r"shape \[n_prompts, n_responses\]"),
        ([[0.5, np.nan]], [[True, False]], {}, r"non-finite"),
    ],
)
def test_bad_input(ref: list, correct: list, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        verifier_construction(ref, correct, **kwargs)


def test_bad_input_check_and_counts() -> None:
    with pytest.raises(ConfigError, match=r"probs has shape \(1, 3\), ref_probs has shape \(1, 2\)"):
        check_verifier([[0.2, 0.3, 0.5]], [[0.5, 0.5]], [[True, False]])
    with pytest.raises(ConfigError, match=r"0 < n_correct < n_total"):
        construction_from_counts(5, 5, 0.01, 1.0)
    with pytest.raises(ConfigError, match=r"sum to"):
        construction_from_masses([math.log(0.5)], [math.log(0.6)], 0.01, 1.0)

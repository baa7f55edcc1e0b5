"""dynamics.metrics: accuracy with ties = 1/2, normalized margin, TRL names (docs/math.md §1)."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from dynamics.errors import DataError
from dynamics.metrics import PreferenceMetrics, preference_metrics


def test_ties_count_half_and_strict_counts_zero():
    # wins: pairs 0, 1; tie: pair 2; loss: pair 3
    m = preference_metrics([2.0, 1.0, 0.5, -1.0], [1.0, 0.0, 0.5, 1.0])
    assert m.accuracy == pytest.approx((2 + 0.5) / 4)
    assert m.accuracy_strict == pytest.approx(2 / 4)
    assert m.tie_fraction == pytest.approx(1 / 4)
    assert m.n == 4 and m.tie_tol == 0.0


def test_all_ties_give_one_half():
    m = preference_metrics(np.zeros(5), np.zeros(5))
    assert (m.accuracy, m.accuracy_strict, m.tie_fraction) == (0.5, 0.0, 1.0)
    assert m.normalized_margin == 0.0


def test_tie_tolerance_is_applied_and_recorded():
    chosen, rejected = np.array([1.0, 1.0 + 1e-12, 2.0]), np.array([1.0, 1.0, 1.0])
    exact = preference_metrics(chosen, rejected)
    loose = preference_metrics(chosen, rejected, tie_tol=1e-9)
    assert exact.tie_fraction == pytest.approx(1 / 3) and loose.tie_fraction == pytest.approx(2 / 3)
    assert loose.accuracy == pytest.approx((1 + 0.5 * 2) / 3) and loose.tie_tol == 1e-9
    assert loose.to_dict()["tie_tol"] == 1e-9


def test_normalized_margin_against_a_hand_computation():
    rng = np.random.default_rng(0)
    chosen, rejected = rng.normal(1.0, 2.0, 50), rng.normal(0.0, 1.0, 50)
    pooled = [*chosen.tolist(), *rejected.tolist()]
    mean = sum(pooled) / len(pooled)
    std = (sum((x - mean) ** 2 for x in pooled) / (len(pooled) - 1)) ** 0.5  # unbiased, like torch .std()
    expected = sum(abs(a - b) for a, b in zip(chosen, rejected, strict=True)) / 50 / (std + 1e-8)
    m = preference_metrics(chosen, rejected)
    assert m.normalized_margin == pytest.approx(expected, rel=1e-12)
    assert std == pytest.approx(np.std(pooled, ddof=1), rel=1e-12)
    assert m.mean_margin == pytest.approx(np.mean(chosen - rejected))
    assert (m.mean_chosen, m.mean_rejected) == pytest.approx((chosen.mean(), rejected.mean()))


def test_trl_names_and_prefix():
    m = preference_metrics(jnp.array([1.0, 0.0]), jnp.array([0.0, 0.0]))
    d = m.as_trl_dict(prefix="eval_")
    assert set(d) == {
        "eval_rewards/chosen",
        "eval_rewards/rejected",
        "eval_rewards/margins",
        "eval_rewards/accuracies",
        "eval_rewards/accuracy_strict",
        "eval_rewards/normalized_margin",
        "eval_rewards/ties",
    }
    assert d["eval_rewards/accuracies"] == 0.75 and d["eval_rewards/accuracy_strict"] == 0.5
    assert d["eval_rewards/margins"] == 0.5 and d["eval_rewards/ties"] == 0.5
    assert json.loads(json.dumps(m.to_dict())) == m.to_dict()
    assert PreferenceMetrics(**m.to_dict()) == m


@pytest.mark.parametrize(
    ("chosen", "rejected", "message"),
    [
        ([1.0, 2.0], [1.0], "shape"),
        ([], [], "shape"),
        ([[1.0]], [[1.0]], "shape"),
        ([1.0, np.nan], [0.0, 0.0], r"NaN or infinite at pairs \[1\]"),
        ([1.0, 2.0], [0.0, np.inf], r"pairs \[1\]"),
    ],
)
def test_bad_inputs(chosen, rejected, message):
    with pytest.raises(DataError, match=message):
        preference_metrics(chosen, rejected)
    with pytest.raises(DataError, match="tie_tol"):
        preference_metrics([1.0], [0.0], tie_tol=-1.0)


@settings(max_examples=50, deadline=None)
@given(
    arrays(np.float64, 12, elements=st.floats(-5, 5)),
    arrays(np.float64, 12, elements=st.floats(-5, 5)),
)
def test_swapping_sides_mirrors_accuracy(chosen, rejected):
    m, swapped = preference_metrics(chosen, rejected), preference_metrics(rejected, chosen)
    assert m.accuracy == pytest.approx(1.0 - swapped.accuracy)
    assert m.accuracy == pytest.approx(m.accuracy_strict + 0.5 * m.tie_fraction)
    assert 0.0 <= m.accuracy <= 1.0 and m.normalized_margin >= 0.0
    assert m.normalized_margin == pytest.approx(swapped.normalized_margin)

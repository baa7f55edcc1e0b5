"""The max-margin direction u* (docs/math.md §5, claim 1): KKT checked independently, agreement with SLSQP."""

from __future__ import annotations

import numpy as np
import pytest
import qpsolvers
from scipy.optimize import linprog, minimize

from dynamics.errors import ConfigError, RmdynError
from theory.maxmargin import default_qp_solver, max_margin_direction


def _separable(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """n random vectors flipped to the positive side of a planted direction, with a positive margin."""
    w = rng.normal(size=d)
    x = rng.normal(size=(n, d))
    x *= np.sign(x @ w)[:, None]
    return x + 0.1 * w / np.linalg.norm(w)


def _slsqp(z: np.ndarray) -> np.ndarray:
    """argmin ½‖u‖² s.t. z u ≥ 1 by SLSQP, started from a feasible point found by an LP."""
    n, d = z.shape
    start = linprog(np.zeros(d), A_ub=-z, b_ub=-np.ones(n), bounds=[(None, None)] * d, method="highs")
    assert start.status == 0
    res = minimize(
        lambda u: 0.5 * u @ u,
        start.x,
        jac=lambda u: u,
        constraints=[{"type": "ineq", "fun": lambda u: z @ u - 1.0, "jac": lambda u: z}],
        method="SLSQP",
        options={"ftol": 1e-14, "maxiter": 1000},
    )
    assert res.success, res.message
    return res.x


@pytest.mark.parametrize(("n", "d"), [(3, 2), (5, 5), (10, 4), (25, 10), (40, 16), (8, 30)])
def test_kkt_and_slsqp(n: int, d: int) -> None:
    rng = np.random.default_rng(1000 * n + d)
    for _ in range(5):
        z = _separable(rng, n, d)
        res = max_margin_direction(z)
        u, alpha = res.direction, res.dual
        margins = z @ u
        scale = 1 + np.abs(z).max() * np.abs(alpha).sum()
        # primal feasibility
        assert margins.min() >= 1 - 1e-7
        np.testing.assert_allclose(res.margins, margins, rtol=1e-12, atol=1e-12)
        # dual feasibility and stationarity: u* = Σ α_i z_i with α ≥ 0
        assert alpha.min() >= 0
        np.testing.assert_allclose(u, z.T @ alpha, atol=1e-6 * scale)
        # complementary slackness
        assert np.max(np.abs(alpha * (margins - 1))) <= 1e-6 * scale
        # support vectors sit on the margin
        assert res.support.any()
        np.testing.assert_allclose(margins[res.support], 1.0, atol=1e-6)
        # same optimum as a general-purpose solver
        u_ref = _slsqp(z)
        np.testing.assert_allclose(u, u_ref, rtol=1e-5, atol=1e-5 * np.linalg.norm(u_ref))
        assert 0.5 * u @ u <= 0.5 * u_ref @ u_ref * (1 + 1e-6)
        assert res.polished  # general position: the active-set refinement certifies itself


def test_near_duplicate_rows_keep_kkt() -> None:
    """Rows equal up to 1e-7 (float32 rounding in the synthetic source): the solver's point, KKT to 1e-6."""
    rng = np.random.default_rng(3)
    base = _separable(rng, 6, 8)
    z = np.repeat(base, 5, axis=0) + 1e-7 * rng.normal(size=(30, 8))
    res = max_margin_direction(z)
    assert (z @ res.direction).min() >= 1 - 1e-7
    np.testing.assert_allclose(res.direction, z.T @ res.dual, atol=1e-6)
    np.testing.assert_allclose(res.direction, _slsqp(z), rtol=1e-4, atol=1e-5)


def test_closed_form_cases() -> None:
    np.testing.assert_allclose(max_margin_direction([[1.0, 0.0], [0.0, 1.0]]).direction, [1.0, 1.0], atol=1e-7)
    np.testing.assert_allclose(max_margin_direction([[2.0, 0.0], [2.0, 5.0]]).direction, [0.5, 0.0], atol=1e-7)
    # duplicated rows are fine (the synthetic source of Theorem 2 has many)
    res = max_margin_direction([[1.0, 1.0]] * 4 + [[1.0, -1.0]])
    np.testing.assert_allclose(res.direction, [1.0, 0.0], atol=1e-7)
    assert res.to_dict()["geometric_margin"] == pytest.approx(1.0, rel=1e-7)


def test_default_solver_is_clarabel() -> None:
    if "clarabel" in qpsolvers.available_solvers:
        assert default_qp_solver() == "clarabel"


@pytest.mark.skipif("cvxopt" not in qpsolvers.available_solvers, reason="cvxopt not installed")
def test_cvxopt_fallback_agrees() -> None:
    z = _separable(np.random.default_rng(7), 12, 6)
    a = max_margin_direction(z)
    b = max_margin_direction(z, solver="cvxopt")
    assert b.solver == "cvxopt"
    np.testing.assert_allclose(a.direction, b.direction, rtol=1e-5, atol=1e-6)


def test_not_separable_is_a_clear_error() -> None:
    with pytest.raises(RmdynError, match=r"not linearly separable.*rows \[0, 1\]"):
        max_margin_direction([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    # a zero difference (y+ and y− with identical representations) can never have a positive margin
    with pytest.raises(RmdynError, match=r"not linearly separable.*rows \[1\]"):
        max_margin_direction([[1.0, 0.0], [0.0, 0.0]])
    # three vectors in the plane whose cone is everything
    with pytest.raises(RmdynError, match=r"not linearly separable"):
        max_margin_direction([[1.0, 0.0], [-0.5, 0.8], [-0.5, -0.8]])


@pytest.mark.parametrize(
    ("z", "match"),
    [
        ([1.0, 2.0], r"shape \[n_pairs, D\]"),
        (np.zeros((0, 3)), r"shape \[n_pairs, D\]"),
        ([[1.0, np.nan]], r"non-finite entry in row 0"),
    ],
)
def test_bad_input(z: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        max_margin_direction(z)

"""The hard-margin, bias-free SVM direction u* of Theorem 2 (docs/math.md §5, claim 1).

    u* = argmin_u ½‖u‖²  subject to  ⟨u, z_i⟩ ≥ 1 for every i,     z_i = h_{x_i,y_i+} − h_{x_i,y_i−}.

Gradient descent on the logistic (Bradley-Terry) loss of a linear EX-RM head converges in direction to u*
(Soudry et al. 2018). The QP is solved by a maintained solver through `qpsolvers` (Clarabel, an interior-point
method; cvxopt or OSQP only if Clarabel is not installed), never by hand. Separability is checked first with a
linear program (scipy's HiGHS): infeasibility gives a clear error that names rows with a convex combination
equal to 0 (a Farkas certificate), instead of a solver status.

The interior-point solution is then refined by one least-squares solve on its active set, kept only if it
satisfies the KKT conditions (like OSQP's "polish"), so u* is accurate to ~1e-12 rather than √tol; for
nearly degenerate data (e.g. near-duplicate rows) the refinement does not certify itself and the solver's
point is kept (`MaxMarginResult.polished` says which).

KKT conditions of the QP (with dual variables α ≥ 0): u* = Σ_i α_i z_i (stationarity), ⟨u*, z_i⟩ ≥ 1 (primal
feasibility) and α_i (⟨u*, z_i⟩ − 1) = 0 (complementary slackness). Support vectors are the z_i with α_i > 0.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dynamics.errors import ConfigError, RmdynError
from dynamics.outputs import jsonable, write_json_atomic

__all__ = ["MaxMarginResult", "default_qp_solver", "max_margin_direction"]

_SOLVER_PREFERENCE = ("clarabel", "cvxopt", "osqp", "quadprog", "proxqp", "piqp", "daqp", "ecos", "scs")
# Clarabel's defaults are 1e-8; the KKT conditions are checked to ~1e-7 downstream, so ask for more.
_SOLVER_SETTINGS: dict[str, dict[str, float]] = {
    "clarabel": {"tol_gap_abs": 1e-10, "tol_gap_rel": 1e-10, "tol_feas": 1e-10},
    "osqp": {"eps_abs": 1e-10, "eps_rel": 1e-10, "polish": True, "max_iter": 100_000},
}
_SPARSE_SOLVERS = frozenset({"clarabel", "osqp", "scs", "piqp"})


@dataclass(frozen=True)
class MaxMarginResult:
    """The max-margin direction and its certificate (docs/math.md §5, claim 1).

    Attributes:
      direction: [D] u*, the minimum-norm u with ⟨u, z_i⟩ ≥ 1.
      margins: [n] ⟨u*, z_i⟩ (≥ 1 up to the solver tolerance; = 1 on support vectors).
      dual: [n] α ≥ 0, the QP's dual variables: u* = Σ α_i z_i.
      support: [n] bool, α_i > support_tol·max(α), the support vectors.
      solver: the qpsolvers backend that solved the QP.
      support_tol: relative threshold on α used for `support`.
      polished: whether the active-set refinement certified itself and replaced the solver's point (it does
        not for nearly degenerate data, e.g. near-duplicate rows; then u* is the solver's, accurate to ~1e-6).
    """

    direction: np.ndarray
    margins: np.ndarray
    dual: np.ndarray
    support: np.ndarray
    solver: str
    support_tol: float
    polished: bool = False

    @property
    def norm(self) -> float:
        """‖u*‖; the geometric margin of the training differences is 1/‖u*‖."""
        return float(np.linalg.norm(self.direction))

    @property
    def unit_direction(self) -> np.ndarray:
        """[D] u*/‖u*‖."""
        return self.direction / self.norm

    @property
    def support_indices(self) -> np.ndarray:
        """Indices i of the support vectors."""
        return np.flatnonzero(self.support)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dictionary of every field, plus ‖u*‖ and the geometric margin 1/‖u*‖."""
        return jsonable(
            {
                "direction": self.direction,
                "norm": self.norm,
                "geometric_margin": 1.0 / self.norm,
                "margins": self.margins,
                "dual": self.dual,
                "support_indices": self.support_indices,
                "solver": self.solver,
                "support_tol": self.support_tol,
                "polished": self.polished,
            }
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Writes `to_dict()` to `path` as JSON, atomically; returns the path."""
        return write_json_atomic(path, self.to_dict())


def default_qp_solver() -> str:
    """The QP backend used by default: Clarabel if installed, else the first installed of cvxopt, OSQP, ...

    Raises:
      RmdynError: no supported QP solver is installed.
    """
    import qpsolvers

    for name in _SOLVER_PREFERENCE:
        if name in qpsolvers.available_solvers:
            return name
    raise RmdynError(f"no QP solver found by qpsolvers (installed: {qpsolvers.available_solvers}); install clarabel")


def _as_differences(z: Any) -> np.ndarray:
    arr = np.asarray(z, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ConfigError(f"z must have shape [n_pairs, D] with n_pairs, D >= 1, got shape {np.shape(z)}")
    if not np.all(np.isfinite(arr)):
        row = int(np.argwhere(~np.isfinite(arr))[0, 0])
        raise ConfigError(f"z has a non-finite entry in row {row}")
    return arr


def _separability_certificate(z: np.ndarray) -> np.ndarray | None:
    """None if some u has ⟨u, z_i⟩ ≥ 1 ∀i; otherwise α ≥ 0, Σα = 1 with Σ α_i z_i = 0 (Farkas/Gordan).

    Both are linear programs (scipy HiGHS). Exactly one of them is feasible.
    """
    from scipy.optimize import linprog

    n, d = z.shape
    primal = linprog(c=np.zeros(d), A_ub=-z, b_ub=-np.ones(n), bounds=[(None, None)] * d, method="highs")
    if primal.status == 0:
        return None
    if primal.status != 2:  # neither solved nor infeasible: let the QP decide
        return None
    dual = linprog(
        c=np.zeros(n),
        A_eq=np.vstack([z.T, np.ones((1, n))]),
        b_eq=np.concatenate([np.zeros(d), [1.0]]),
        bounds=[(0, None)] * n,
        method="highs",
    )
    return dual.x if dual.status == 0 else np.full(n, np.nan)


def _not_separable(z: np.ndarray, alpha: np.ndarray, what: str) -> RmdynError:
    if np.all(np.isfinite(alpha)):
        rows = np.flatnonzero(alpha > 1e-9 * alpha.max())
        shown = ", ".join(str(int(i)) for i in rows[:12]) + (" ..." if rows.size > 12 else "")
        detail = f"rows [{shown}] of z ({z.shape[0]} x {z.shape[1]}) have a convex combination equal to 0"
    else:
        detail = f"the linear program for ⟨u, z_i⟩ ≥ 1 is infeasible for z of shape {z.shape}"
    return RmdynError(
        f"{what} are not linearly separable: no u has ⟨u, z_i⟩ > 0 for every i ({detail}); "
        "the max-margin direction u* of Theorem 2 does not exist"
    )


def _solve_qp(z: np.ndarray, solver: str) -> tuple[np.ndarray, np.ndarray] | None:
    import qpsolvers
    import scipy.sparse as sp

    n, d = z.shape
    p_mat: Any = np.eye(d)
    g_mat: Any = -z
    if solver in _SPARSE_SOLVERS:
        p_mat, g_mat = sp.csc_matrix(p_mat), sp.csc_matrix(g_mat)
    problem = qpsolvers.Problem(P=p_mat, q=np.zeros(d), G=g_mat, h=-np.ones(n))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # solver status warnings: the result is checked below instead
        solution = qpsolvers.solve_problem(problem, solver=solver, **_SOLVER_SETTINGS.get(solver, {}))
    if not solution.found or solution.x is None or solution.z is None:
        return None
    return np.asarray(solution.x, dtype=np.float64), np.asarray(solution.z, dtype=np.float64)


def _polish(z: np.ndarray, margins: np.ndarray, active_tol: float = 1e-4) -> tuple[np.ndarray, np.ndarray] | None:
    """Active-set refinement of an interior-point solution, or None if it does not certify itself.

    An interior-point method stops with u accurate only to about √(its gap tolerance). On the active set
    S = {i : ⟨u, z_i⟩ ≤ 1 + active_tol} the optimum solves min ‖u‖² s.t. Z_S u = 1, i.e. u = Z_S^T λ with
    (Z_S Z_S^T) λ = 1 (one least-squares solve). The refined point is kept only if it satisfies the KKT
    conditions: λ ≥ 0 and ⟨u, z_i⟩ ≥ 1 for every i (up to 1e-9 relative).
    """
    active = margins <= 1.0 + active_tol
    if not active.any():
        return None
    zs = z[active]
    lam, *_ = np.linalg.lstsq(zs @ zs.T, np.ones(zs.shape[0]), rcond=None)
    u = zs.T @ lam
    scale = 1.0 + float(np.abs(lam).max())
    if lam.min() < -1e-9 * scale or (z @ u).min() < 1.0 - 1e-9 or not np.allclose(zs @ u, 1.0, atol=1e-9):
        return None
    alpha = np.zeros(z.shape[0])
    alpha[active] = np.maximum(lam, 0.0)
    return u, alpha


def max_margin_direction(
    z: Any,
    *,
    solver: str | None = None,
    feasibility_tol: float = 1e-6,
    support_tol: float = 1e-6,
    what: str = "the training differences z_i",
) -> MaxMarginResult:
    """Hard-margin, bias-free SVM: u* = argmin ½‖u‖² s.t. ⟨u, z_i⟩ ≥ 1 (docs/math.md §5, claim 1).

    Args:
      z: [n, D] the training differences z_i = h_{x_i,y_i+} − h_{x_i,y_i−} (EX-RM representation units).
      solver: a qpsolvers backend name; None picks `default_qp_solver()` (Clarabel).
      feasibility_tol: the solution must satisfy ⟨u*, z_i⟩ ≥ 1 − feasibility_tol, else an error.
      support_tol: α_i > support_tol·max(α) marks a support vector.
      what: how to name z in error messages.

    Returns:
      A `MaxMarginResult` with u* [D], margins [n], duals α [n] and the support-vector mask [n].

    Raises:
      ConfigError: z is not a finite [n, D] array.
      RmdynError: the z_i are not linearly separable (an LP certificate names the rows), or the QP solver
        fails or returns a point violating the constraints.
    """
    z = _as_differences(z)
    certificate = _separability_certificate(z)
    if certificate is not None:
        raise _not_separable(z, certificate, what)
    solver = solver or default_qp_solver()
    solved = _solve_qp(z, solver)
    if solved is None:
        raise RmdynError(
            f"QP solver {solver!r} found no solution for the max-margin problem on {what} of shape {z.shape} "
            "(they may not be linearly separable)"
        )
    u, alpha = solved
    margins = z @ u
    if margins.min() < 1.0 - feasibility_tol:
        raise RmdynError(
            f"QP solver {solver!r} returned u with min ⟨u, z_i⟩ = {margins.min():.3g} < 1 on {what} "
            f"(row {int(np.argmin(margins))}); the z_i may not be linearly separable"
        )
    alpha = np.maximum(alpha, 0.0)
    polished = _polish(z, margins)
    if polished is not None:
        u, alpha = polished
        margins = z @ u
    support = alpha > support_tol * max(float(alpha.max()), np.finfo(np.float64).tiny)
    return MaxMarginResult(
        direction=u,
        margins=margins,
        dual=alpha,
        support=support,
        solver=solver,
        support_tol=support_tol,
        polished=polished is not None,
    )

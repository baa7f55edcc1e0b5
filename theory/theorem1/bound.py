"""Theorem 1 from probability masses alone: the construction's π(C|x), its bound and its odds ratio.

The tilt π(y|x) ∝ π_ref(y|x) · exp((δ/β) · 1[y ∈ C(x)]) (docs/math.md §4, proof) moves mass only between the
correct set C(x) and its complement, so π(C|x) depends on π_ref(C|x) only:

    π(C|x) = e^{δ/β} π_ref(C|x) / Z(x) ≤ e^{δ/β} π_ref(C|x),   Z(x) = 1 + (e^{δ/β} − 1) π_ref(C|x),

and the odds ratio (π(C)/(1−π(C))) / (π_ref(C)/(1−π_ref(C))) is e^{δ/β} exactly. `GenerationBound` holds these
per-prompt masses in natural log, which is all that response sets too large to enumerate allow
(`construction_from_masses`, `construction_from_counts`); `theory.theorem1.verifier` builds them from an
enumerated response set.

Float64 numpy, in log space throughout (logaddexp, never 1 − p), so e^{δ/β} = e^{100} (β = 0.01, δ = 1)
neither overflows nor cancels. Shapes: P prompts.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dynamics.errors import ConfigError
from dynamics.outputs import jsonable, write_json_atomic

__all__ = [
    "GenerationBound",
    "construction_from_counts",
    "construction_from_masses",
    "positive_scalar",
]


def positive_scalar(name: str, value: float) -> float:
    """`value` as a float if it is a finite number > 0 (β, δ of Theorem 1).

    Raises:
      ConfigError: naming `name` and the value otherwise.
    """
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
    return value


# ----------------------------------------------------------------------------------------------------------
# Masses only (works for response sets too large to enumerate)


@dataclass(frozen=True)
class GenerationBound:
    """Per-prompt probability masses of the Theorem-1 construction (docs/math.md §4), all in natural log.

    Attributes:
      beta: β > 0 of r_IM = β ln π/π_ref.
      delta: verifier margin δ > 0 (reward units).
      log_ref_mass: [P] ln π_ref(C|x).
      log_ref_mass_incorrect: [P] ln π_ref(V* \\ C|x) = ln(1 − π_ref(C|x)).
      log_mass: [P] ln π(C|x) of the constructed π.
      log_mass_incorrect: [P] ln(1 − π(C|x)).
    """

    beta: float
    delta: float
    log_ref_mass: np.ndarray
    log_ref_mass_incorrect: np.ndarray
    log_mass: np.ndarray
    log_mass_incorrect: np.ndarray

    @property
    def log_bound(self) -> np.ndarray:
        """[P] ln(e^{δ/β} π_ref(C|x)) = δ/β + ln π_ref(C|x), the log of Theorem 1's upper bound on π(C|x)."""
        return self.delta / self.beta + self.log_ref_mass

    @property
    def log_odds_ratio(self) -> np.ndarray:
        """[P] ln[(π(C)/(1−π(C))) / (π_ref(C)/(1−π_ref(C)))]; δ/β for the construction (docs/math.md §4)."""
        return (self.log_mass - self.log_mass_incorrect) - (self.log_ref_mass - self.log_ref_mass_incorrect)

    @property
    def log_ratio(self) -> np.ndarray:
        """[P] ln(π(C|x)/π_ref(C|x)), the generation gain; ≤ δ/β for the construction."""
        return self.log_mass - self.log_ref_mass

    @property
    def ref_mass(self) -> np.ndarray:
        """[P] π_ref(C|x)."""
        return np.exp(self.log_ref_mass)

    @property
    def mass(self) -> np.ndarray:
        """[P] π(C|x)."""
        return np.exp(self.log_mass)

    @property
    def bound(self) -> np.ndarray:
        """[P] e^{δ/β} π_ref(C|x); may exceed 1 (a vacuous bound) or overflow to inf (see log_bound)."""
        with np.errstate(over="ignore"):
            return np.exp(self.log_bound)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dictionary of every field and derived quantity (natural logs and linear values)."""
        return jsonable(
            {
                "beta": self.beta,
                "delta": self.delta,
                "delta_over_beta": self.delta / self.beta,
                "ref_mass": self.ref_mass,
                "mass": self.mass,
                "bound": self.bound,
                "log_ref_mass": self.log_ref_mass,
                "log_ref_mass_incorrect": self.log_ref_mass_incorrect,
                "log_mass": self.log_mass,
                "log_mass_incorrect": self.log_mass_incorrect,
                "log_bound": self.log_bound,
                "log_ratio": self.log_ratio,
                "log_odds_ratio": self.log_odds_ratio,
            }
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Writes `to_dict()` to `path` as JSON, atomically; returns the path."""
        return write_json_atomic(path, self.to_dict())


def construction_from_masses(
    log_ref_mass: Any, log_ref_mass_incorrect: Any, beta: float, delta: float
) -> GenerationBound:
    """Theorem 1's construction from the reference masses alone (docs/math.md §4, proof).

    The tilt π ∝ π_ref·exp((δ/β)1[y∈C]) moves mass only between C and its complement, so π(C) depends on
    π_ref(C) only: ln Z = logaddexp(δ/β + ln π_ref(C), ln(1−π_ref(C))), ln π(C) = δ/β + ln π_ref(C) − ln Z and
    ln(1−π(C)) = ln(1−π_ref(C)) − ln Z. Use this for response sets too large to enumerate.

    Args:
      log_ref_mass: [P] (or scalar) ln π_ref(C|x), finite (C has positive reference mass).
      log_ref_mass_incorrect: [P] (or scalar) ln(1 − π_ref(C|x)), finite; passed separately so that masses
        near 1 keep their precision. The two must describe a distribution: exp of both sums to 1 (atol 1e-9).
      beta: β > 0.
      delta: δ > 0, the margin in reward units.

    Returns:
      A `GenerationBound` with [P] arrays.

    Raises:
      ConfigError: β or δ not a positive finite number, non-finite log masses, shape mismatch, or masses that
        do not sum to 1.
    """
    beta = positive_scalar("beta", beta)
    delta = positive_scalar("delta", delta)
    a = np.atleast_1d(np.asarray(log_ref_mass, dtype=np.float64))
    b = np.atleast_1d(np.asarray(log_ref_mass_incorrect, dtype=np.float64))
    if a.shape != b.shape or a.ndim != 1:
        raise ConfigError(
            f"log_ref_mass and log_ref_mass_incorrect must be 1-D of the same shape, got {a.shape} and {b.shape}"
        )
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ConfigError("log reference masses must be finite (C and its complement need positive mass)")
    total = np.exp(np.logaddexp(a, b))
    if np.any(np.abs(total - 1.0) > 1e-9):
        i = int(np.argmax(np.abs(total - 1.0)))
        raise ConfigError(f"reference masses of prompt {i} sum to {float(total[i])!r}, expected 1")
    tilt = delta / beta
    log_z = np.logaddexp(tilt + a, b)
    return GenerationBound(
        beta=beta,
        delta=delta,
        log_ref_mass=a,
        log_ref_mass_incorrect=b,
        log_mass=tilt + a - log_z,
        log_mass_incorrect=b - log_z,
    )


def construction_from_counts(n_correct: int, n_total: int, beta: float, delta: float) -> GenerationBound:
    """Theorem 1's construction for a uniform π_ref over `n_total` responses of which `n_correct` are correct.

    Example (docs/math.md §6.1): the 10! vertex orderings of a 10-vertex graph with one planted Hamiltonian
    cycle, which 20 orderings represent (10 rotations × 2 directions): π_ref(C) = 20/10!. Computed from
    integer counts, so 1 − π_ref(C) = (n_total − n_correct)/n_total is exact.

    Args:
      n_correct: |C|, with 0 < n_correct < n_total.
      n_total: number of responses.
      beta: β > 0.
      delta: δ > 0.

    Returns:
      A `GenerationBound` for one prompt ([1] arrays).

    Raises:
      ConfigError: counts out of range, or β, δ not positive.
    """
    n_correct, n_total = int(n_correct), int(n_total)
    if not 0 < n_correct < n_total:
        raise ConfigError(f"need 0 < n_correct < n_total, got n_correct={n_correct}, n_total={n_total}")
    log_n = math.log(n_total)
    return construction_from_masses([math.log(n_correct) - log_n], [math.log(n_total - n_correct) - log_n], beta, delta)

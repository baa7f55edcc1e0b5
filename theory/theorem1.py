"""Theorem 1: an IM-RM can verify without generating (docs/math.md §4).

For a finite response set per prompt, a reference distribution π_ref with full support, a correct set C(x),
β > 0 and a margin δ > 0, the construction

    π(y|x) ∝ π_ref(y|x) · exp((δ/β) · 1[y ∈ C(x)])                                   (docs/math.md §4, proof)

makes r_IM = β ln(π/π_ref) = δ·1[y ∈ C] − β ln Z(x) a δ-verifier while
π(C|x) = e^{δ/β} π_ref(C|x) / Z(x) ≤ e^{δ/β} π_ref(C|x), with Z(x) = 1 + (e^{δ/β} − 1) π_ref(C|x).
Its odds ratio (π(C)/(1−π(C))) / (π_ref(C)/(1−π_ref(C))) equals e^{δ/β} exactly, and any δ-verifier has an
odds ratio of at least e^{δ/β} (docs/math.md §4 "Tightness"), in fact at least e^{margin/β}.

Everything is computed in float64 numpy and in log space (logsumexp over the correct and over the incorrect
responses separately, never 1 − p), so e^{δ/β} = e^{100} (β = 0.01, δ = 1) neither overflows nor cancels. The
computation is closed-form and tiny, so it needs no JAX.

Shapes: P prompts, N responses per prompt. A 1-D input is one prompt and is treated as shape [1, N].
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import logsumexp

from dynamics.errors import ConfigError
from dynamics.outputs import jsonable, write_json_atomic

__all__ = [
    "GenerationBound",
    "VerifierCheck",
    "VerifierConstruction",
    "check_verifier",
    "construction_from_counts",
    "construction_from_masses",
    "verifier_construction",
]

# Arrays with more elements than this are left out of `to_dict()` unless include_arrays=True is asked for.
_MAX_JSON_ELEMENTS = 100_000


# ----------------------------------------------------------------------------------------------------------
# Validation


def _check_scalar(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
    return value


def _as_distribution(name: str, probs: Any, atol: float, *, full_support: bool) -> np.ndarray:
    """Checks a probability table [P, N] (or [N]) and returns it as float64 [P, N]."""
    arr = np.asarray(probs, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] < 2:
        raise ConfigError(
            f"{name} must have shape [n_prompts, n_responses] (or [n_responses]) with n_responses >= 2, "
            f"got shape {np.shape(probs)}"
        )
    if not np.all(np.isfinite(arr)):
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(arr))[0])
        raise ConfigError(f"{name} has a non-finite entry at index {bad}: {float(arr[bad])!r}")
    if np.any(arr < 0):
        bad = tuple(int(i) for i in np.argwhere(arr < 0)[0])
        raise ConfigError(f"{name} must be >= 0, got {float(arr[bad])!r} at index {bad}")
    if full_support and np.any(arr == 0):
        bad = tuple(int(i) for i in np.argwhere(arr == 0)[0])
        raise ConfigError(
            f"{name} must have full support (Theorem 1, docs/math.md §4: β ln π/π_ref is undefined where "
            f"π_ref = 0), got 0 at index {bad}"
        )
    sums = arr.sum(axis=1)
    off = np.abs(sums - 1.0)
    if np.any(off > atol):
        i = int(np.argmax(off))
        raise ConfigError(f"{name}[{i}] sums to {float(sums[i])!r}, expected 1 within atol={atol}")
    return arr


def _as_correct_mask(correct: Any, shape: tuple[int, int]) -> np.ndarray:
    mask = np.asarray(correct)
    if mask.ndim == 1:
        mask = mask[None, :]
    if mask.shape != shape:
        raise ConfigError(f"correct mask has shape {np.shape(correct)}, expected {shape} (as the probabilities)")
    if mask.dtype != np.bool_:
        if not np.all(np.isin(mask, (0, 1))):
            raise ConfigError(f"correct mask must be boolean (or 0/1), got dtype {mask.dtype} with other values")
        mask = mask.astype(bool)
    n_correct = mask.sum(axis=1)
    if np.any(n_correct == 0):
        raise ConfigError(f"the correct set C is empty for prompt {int(np.argmin(n_correct))}")
    if np.any(n_correct == shape[1]):
        raise ConfigError(
            f"the correct set C contains every response for prompt {int(np.argmax(n_correct))}: "
            "there is no incorrect response to separate from"
        )
    return mask


def _masked_logsumexp(log_p: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """ln Σ_{mask} exp(log_p) per row [P]; −inf for rows whose selected entries are all −inf."""
    with np.errstate(divide="ignore"):
        return logsumexp(np.where(mask, log_p, -np.inf), axis=1)


def _normalize(log_p: np.ndarray) -> np.ndarray:
    """Renormalises log-probabilities per row, so rows that sum to 1 only within atol sum to 1 exactly."""
    return log_p - logsumexp(log_p, axis=1, keepdims=True)


def _log(p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(p)


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

    def to_json(self, path: str | os.PathLike[str]) -> Path:
        """Writes `to_dict()` to `path` atomically; returns the path."""
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
    beta = _check_scalar("beta", beta)
    delta = _check_scalar("delta", delta)
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


# ----------------------------------------------------------------------------------------------------------
# The full construction over an enumerated response set


@dataclass(frozen=True)
class VerifierConstruction:
    """The distribution π of Theorem 1 on an enumerated response set, its IM-RM and its masses (arXiv 2507.07981
    Theorem 1; docs/math.md §4).

    Attributes:
      log_ref: [P, N] ln π_ref(y|x).
      correct: [P, N] bool, y ∈ C(x).
      log_pi: [P, N] ln π(y|x) of the construction.
      rewards: [P, N] r_IM(x,y) = β ln(π/π_ref) = δ·1[y∈C] − β ln Z(x), in reward units.
      margin: [P] min_{y∈C} r − max_{y∉C} r; equals δ up to rounding.
      masses: the per-prompt masses, bound and odds ratio (`GenerationBound`).
    """

    log_ref: np.ndarray
    correct: np.ndarray
    log_pi: np.ndarray
    rewards: np.ndarray
    margin: np.ndarray
    masses: GenerationBound

    @property
    def beta(self) -> float:
        """β of the IM-RM."""
        return self.masses.beta

    @property
    def delta(self) -> float:
        """The requested margin δ."""
        return self.masses.delta

    @property
    def is_verifier(self) -> np.ndarray:
        """[P] bool: margin ≥ δ up to 1e-9 relative rounding (it is δ in exact arithmetic)."""
        return self.margin >= self.delta * (1 - 1e-9) - 1e-12

    def to_dict(self, include_arrays: bool | None = None) -> dict[str, Any]:
        """Plain-JSON dictionary.

        Args:
          include_arrays: whether to write the [P, N] arrays (log_ref, correct, log_pi, rewards). None (the
            default) writes them when they hold at most 100,000 elements; otherwise the dictionary says
            `"arrays_omitted"` with the shape, so nothing is dropped silently.
        """
        out: dict[str, Any] = {
            "theorem": "1",
            "shape": list(self.log_ref.shape),
            "n_correct": self.correct.sum(axis=1),
            "margin": self.margin,
            "is_verifier": self.is_verifier,
            **self.masses.to_dict(),
        }
        if include_arrays is None:
            include_arrays = self.log_ref.size <= _MAX_JSON_ELEMENTS
        if include_arrays:
            out.update(log_ref=self.log_ref, correct=self.correct, log_pi=self.log_pi, rewards=self.rewards)
        else:
            out["arrays_omitted"] = f"log_ref, correct, log_pi, rewards of shape {list(self.log_ref.shape)}"
        return jsonable(out)

    def to_json(self, path: str | os.PathLike[str], include_arrays: bool | None = None) -> Path:
        """Writes `to_dict(include_arrays)` to `path` atomically; returns the path."""
        return write_json_atomic(path, self.to_dict(include_arrays))


def _margin(rewards: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """[P] min over correct rewards − max over incorrect rewards (the verifier margin of docs/math.md §4)."""
    lo = np.where(correct, rewards, np.inf).min(axis=1)
    hi = np.where(correct, -np.inf, rewards).max(axis=1)
    with np.errstate(invalid="ignore"):
        return lo - hi


def verifier_construction(
    ref_probs: Any, correct: Any, beta: float = 0.01, delta: float = 1.0, *, atol: float = 1e-6
) -> VerifierConstruction:
    """Builds Theorem 1's π(y|x) ∝ π_ref(y|x)·exp((δ/β)·1[y∈C(x)]) and its IM-RM (docs/math.md §4, proof).

    Args:
      ref_probs: [P, N] (or [N]) π_ref(y|x): finite, > 0 (full support, as Theorem 1 assumes), each row
        summing to 1 within `atol`.
      correct: [P, N] (or [N]) bool mask of C(x); per prompt neither empty nor every response.
      beta: β > 0 of r_IM = β ln(π/π_ref); the paper's experiments use 0.01.
      delta: δ > 0, the verifier margin in reward units.
      atol: tolerance on the row sums of `ref_probs`.

    Returns:
      A `VerifierConstruction`: rewards [P, N], margin [P] (= δ up to rounding), and masses with
      π(C) ≤ e^{δ/β}π_ref(C) and log odds ratio = δ/β.

    Raises:
      ConfigError: bad shapes, probabilities (negative, zero, non-finite, not summing to 1), an empty or
        full C, or β, δ not positive.
    """
    beta = _check_scalar("beta", beta)
    delta = _check_scalar("delta", delta)
    ref = _as_distribution("ref_probs", ref_probs, atol, full_support=True)
    mask = _as_correct_mask(correct, ref.shape)
    log_ref = _normalize(np.log(ref))
    tilted = log_ref + np.where(mask, delta / beta, 0.0)
    log_pi = tilted - logsumexp(tilted, axis=1, keepdims=True)
    rewards = beta * (log_pi - log_ref)
    masses = GenerationBound(
        beta=beta,
        delta=delta,
        log_ref_mass=_masked_logsumexp(log_ref, mask),
        log_ref_mass_incorrect=_masked_logsumexp(log_ref, ~mask),
        log_mass=_masked_logsumexp(log_pi, mask),
        log_mass_incorrect=_masked_logsumexp(log_pi, ~mask),
    )
    return VerifierConstruction(
        log_ref=log_ref,
        correct=mask,
        log_pi=log_pi,
        rewards=rewards,
        margin=_margin(rewards, mask),
        masses=masses,
    )


# ----------------------------------------------------------------------------------------------------------
# Checking an arbitrary π


@dataclass(frozen=True)
class VerifierCheck:
    """Whether a given π's IM-RM is a δ-verifier and what it does to generation (docs/math.md §4).

    Attributes:
      margin: [P] min_{y∈C} r_IM − max_{y∉C} r_IM, r_IM = β ln(π/π_ref) (reward units; −inf if π puts zero
        mass on some correct response).
      is_verifier: [P] bool, margin ≥ δ − tol.
      masses: ln π_ref(C), ln π(C) and their complements; `masses.log_ratio` is the generation gain
        ln(π(C)/π_ref(C)), `masses.log_odds_ratio` the log odds ratio.
      log_odds_lower_bound: [P] margin/β: every π satisfies log odds ratio ≥ margin/β (docs/math.md §4
        "Tightness", before substituting margin ≥ δ).
      respects_odds_bound: [P] bool, log odds ratio ≥ δ/β − tol where the IM-RM is a δ-verifier (vacuously
        true elsewhere). False would contradict the tightness statement.
      within_generation_bound: [P] bool, ln π(C) ≤ δ/β + ln π_ref(C) + tol. Guaranteed only for the
        construction; a verifier with a larger margin may exceed it.
      tol: absolute tolerance used above (reward units for the margin, nats for the logs).
    """

    margin: np.ndarray
    is_verifier: np.ndarray
    masses: GenerationBound
    log_odds_lower_bound: np.ndarray
    respects_odds_bound: np.ndarray
    within_generation_bound: np.ndarray
    tol: float

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dictionary of every field."""
        return jsonable(
            {
                "theorem": "1 (check)",
                "margin": self.margin,
                "is_verifier": self.is_verifier,
                "log_odds_lower_bound": self.log_odds_lower_bound,
                "respects_odds_bound": self.respects_odds_bound,
                "within_generation_bound": self.within_generation_bound,
                "tol": self.tol,
                **self.masses.to_dict(),
            }
        )

    def to_json(self, path: str | os.PathLike[str]) -> Path:
        """Writes `to_dict()` to `path` atomically; returns the path."""
        return write_json_atomic(path, self.to_dict())


def check_verifier(
    probs: Any,
    ref_probs: Any,
    correct: Any,
    beta: float = 0.01,
    delta: float = 1.0,
    *,
    atol: float = 1e-6,
    tol: float = 1e-9,
) -> VerifierCheck:
    """Checks any π against Theorem 1: is β ln(π/π_ref) a δ-verifier, and how much did it raise π(C)?

    Args:
      probs: [P, N] (or [N]) the candidate π(y|x); ≥ 0 (zeros allowed: their reward is −inf), rows sum to 1.
      ref_probs: [P, N] π_ref(y|x), full support.
      correct: [P, N] bool mask of C(x), neither empty nor full per prompt.
      beta: β > 0.
      delta: δ > 0.
      atol: tolerance on the row sums.
      tol: tolerance of the verifier and bound comparisons (see `VerifierCheck`).

    Returns:
      A `VerifierCheck` with [P] arrays.

    Raises:
      ConfigError: as `verifier_construction`, and for `probs` of a different shape.
    """
    beta = _check_scalar("beta", beta)
    delta = _check_scalar("delta", delta)
    ref = _as_distribution("ref_probs", ref_probs, atol, full_support=True)
    pi = _as_distribution("probs", probs, atol, full_support=False)
    if pi.shape != ref.shape:
        raise ConfigError(f"probs has shape {pi.shape}, ref_probs has shape {ref.shape}; they must match")
    mask = _as_correct_mask(correct, ref.shape)
    log_ref = _normalize(np.log(ref))
    log_pi = _normalize(_log(pi))
    rewards = beta * (log_pi - log_ref)
    margin = _margin(rewards, mask)
    masses = GenerationBound(
        beta=beta,
        delta=delta,
        log_ref_mass=_masked_logsumexp(log_ref, mask),
        log_ref_mass_incorrect=_masked_logsumexp(log_ref, ~mask),
        log_mass=_masked_logsumexp(log_pi, mask),
        log_mass_incorrect=_masked_logsumexp(log_pi, ~mask),
    )
    is_verifier = margin >= delta - tol
    with np.errstate(invalid="ignore"):
        log_odds = masses.log_odds_ratio
        respects = np.where(is_verifier, log_odds >= delta / beta - tol, True)
        within = masses.log_mass <= masses.log_bound + tol
    return VerifierCheck(
        margin=margin,
        is_verifier=is_verifier,
        masses=masses,
        log_odds_lower_bound=margin / beta,
        respects_odds_bound=respects,
        within_generation_bound=within,
        tol=tol,
    )

"""Theorem 1 on an enumerated response set: the verifier construction and the check of any π (docs/math.md §4).

`verifier_construction` builds π(y|x) ∝ π_ref(y|x) · exp((δ/β) · 1[y ∈ C(x)]) and its IM-RM
r_IM = β ln(π/π_ref) = δ·1[y ∈ C] − β ln Z(x), a δ-verifier whose generation gain π(C|x)/π_ref(C|x) is at most
e^{δ/β}. `check_verifier` takes any π and says whether its IM-RM is a δ-verifier and how much it raised π(C):
any δ-verifier has an odds ratio of at least e^{δ/β} (docs/math.md §4 "Tightness"), in fact at least
e^{margin/β}. The masses of both are a `theory.theorem1.bound.GenerationBound`.

Float64 numpy, in log space (logsumexp over the correct and over the incorrect responses separately, never
1 − p). Shapes: P prompts, N responses per prompt; a 1-D input is one prompt and is treated as shape [1, N].
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import logsumexp

from dynamics.errors import ConfigError
from dynamics.outputs import jsonable, write_json_atomic
from theory.theorem1.bound import GenerationBound, positive_scalar

__all__ = ["VerifierCheck", "VerifierConstruction", "check_verifier", "verifier_construction"]

# Arrays with more elements than this are left out of `to_dict()` unless include_arrays=True is asked for.
_MAX_JSON_ELEMENTS = 100_000


# ----------------------------------------------------------------------------------------------------------
# Validation


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

    def save(self, path: str | os.PathLike[str], include_arrays: bool | None = None) -> Path:
        """Writes `to_dict(include_arrays)` to `path` as JSON, atomically; returns the path."""
        return write_json_atomic(path, self.to_dict(include_arrays))


def _masses(log_ref: np.ndarray, log_pi: np.ndarray, mask: np.ndarray, beta: float, delta: float) -> GenerationBound:
    """The bound of docs/math.md §4 from ln π_ref and ln π [prompts, responses] and the correct-response mask:
    π_ref's and π's log-masses on the correct and the incorrect responses of each prompt."""
    return GenerationBound(
        beta=beta,
        delta=delta,
        log_ref_mass=_masked_logsumexp(log_ref, mask),
        log_ref_mass_incorrect=_masked_logsumexp(log_ref, ~mask),
        log_mass=_masked_logsumexp(log_pi, mask),
        log_mass_incorrect=_masked_logsumexp(log_pi, ~mask),
    )


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
    beta = positive_scalar("beta", beta)
    delta = positive_scalar("delta", delta)
    ref = _as_distribution("ref_probs", ref_probs, atol, full_support=True)
    mask = _as_correct_mask(correct, ref.shape)
    log_ref = _normalize(np.log(ref))
    tilted = log_ref + np.where(mask, delta / beta, 0.0)
    log_pi = tilted - logsumexp(tilted, axis=1, keepdims=True)
    rewards = beta * (log_pi - log_ref)
    masses = _masses(log_ref, log_pi, mask, beta, delta)
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

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Writes `to_dict()` to `path` as JSON, atomically; returns the path."""
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
    beta = positive_scalar("beta", beta)
    delta = positive_scalar("delta", delta)
    ref = _as_distribution("ref_probs", ref_probs, atol, full_support=True)
    pi = _as_distribution("probs", probs, atol, full_support=False)
    if pi.shape != ref.shape:
        raise ConfigError(f"probs has shape {pi.shape}, ref_probs has shape {ref.shape}; they must match")
    mask = _as_correct_mask(correct, ref.shape)
    log_ref = _normalize(np.log(ref))
    log_pi = _normalize(_log(pi))
    rewards = beta * (log_pi - log_ref)
    margin = _margin(rewards, mask)
    masses = _masses(log_ref, log_pi, mask, beta, delta)
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

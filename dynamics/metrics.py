"""Preference metrics of a reward model on an evaluation set (docs/math.md §1), as pure functions of rewards.

- accuracy: mean(1[r+ > r-]) + 1/2 mean(1[r+ = r-]), ties count 1/2 as in the official code (this matters for
  Theorem 2, where IM-RM ties on every unseen pair);
- normalized absolute margin: mean|r+ - r-| / (std of the pooled 2n rewards, unbiased, + 1e-8), which makes
  EX-RM and IM-RM comparable despite their different reward scales.

A tie is |r+ - r-| <= tie_tol; the tolerance is recorded in the result (architecture: IM-RM ties are decided
with an explicit tolerance that is written to the output).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from dynamics.errors import DataError

__all__ = ["PreferenceMetrics", "preference_metrics"]

_STD_EPS = 1e-8


@dataclasses.dataclass(frozen=True)
class PreferenceMetrics:
    """Accuracy and margins of rewards on n preference pairs (docs/math.md §1).

    Attributes:
      accuracy: wins + ties / 2, over n.
      accuracy_strict: wins over n (ties count 0; TRL's `rewards/accuracies` convention).
      tie_fraction: ties over n.
      mean_chosen: mean r(x, y+).
      mean_rejected: mean r(x, y-).
      mean_margin: mean (r+ - r-).
      normalized_margin: mean |r+ - r-| / (std(pooled 2n rewards, ddof=1) + 1e-8).
      n: number of pairs.
      tie_tol: a pair is a tie when |r+ - r-| <= tie_tol.
    """

    accuracy: float
    accuracy_strict: float
    tie_fraction: float
    mean_chosen: float
    mean_rejected: float
    mean_margin: float
    normalized_margin: float
    n: int
    tie_tol: float

    def to_dict(self) -> dict[str, Any]:
        """All fields by name (floats and the int n), ready for JSON."""
        return dataclasses.asdict(self)

    def as_trl_dict(self, prefix: str = "") -> dict[str, float]:
        """TRL's reward-trainer names plus ours, each prefixed (e.g. prefix="eval_").

        `rewards/accuracies` holds the paper's accuracy (ties = 1/2); TRL's own is strict, which is
        `rewards/accuracy_strict` here.

        Returns:
          {prefix + "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
           "rewards/accuracy_strict", "rewards/normalized_margin", "rewards/ties": value}.
        """
        names = {
            "rewards/chosen": self.mean_chosen,
            "rewards/rejected": self.mean_rejected,
            "rewards/margins": self.mean_margin,
            "rewards/accuracies": self.accuracy,
            "rewards/accuracy_strict": self.accuracy_strict,
            "rewards/normalized_margin": self.normalized_margin,
            "rewards/ties": self.tie_fraction,
        }
        return {prefix + k: float(v) for k, v in names.items()}


def preference_metrics(r_chosen: Any, r_rejected: Any, *, tie_tol: float = 0.0) -> PreferenceMetrics:
    """Accuracy (ties = 1/2), strict accuracy, ties and margins of rewards on n pairs (docs/math.md §1).

    Computed in float64 on the host.

    Args:
      r_chosen: rewards r(x_i, y_i+), shape [n] (numpy or jax).
      r_rejected: rewards r(x_i, y_i-), shape [n].
      tie_tol: pairs with |r+ - r-| <= tie_tol are ties (0.0: exact equality only).

    Returns:
      A `PreferenceMetrics`.

    Raises:
      DataError: shapes differ or are not [n] with n >= 1, a reward is NaN or infinite, or tie_tol < 0.
    """
    chosen = np.asarray(r_chosen, dtype=np.float64)
    rejected = np.asarray(r_rejected, dtype=np.float64)
    if chosen.ndim != 1 or chosen.shape != rejected.shape or chosen.shape[0] == 0:
        raise DataError(
            f"r_chosen and r_rejected must both have shape [n] with n >= 1, got {chosen.shape} and {rejected.shape}"
        )
    bad = np.flatnonzero(~(np.isfinite(chosen) & np.isfinite(rejected)))
    if bad.size:
        raise DataError(f"rewards are NaN or infinite at pairs {bad[:10].tolist()}")
    if not tie_tol >= 0:
        raise DataError(f"tie_tol must be >= 0, got {tie_tol}")
    diff = chosen - rejected
    tie = np.abs(diff) <= tie_tol
    win = (diff > 0) & ~tie
    pooled = np.concatenate([chosen, rejected])
    return PreferenceMetrics(
        accuracy=float(win.mean() + 0.5 * tie.mean()),
        accuracy_strict=float(win.mean()),
        tie_fraction=float(tie.mean()),
        mean_chosen=float(chosen.mean()),
        mean_rejected=float(rejected.mean()),
        mean_margin=float(diff.mean()),
        normalized_margin=float(np.abs(diff).mean() / (pooled.std(ddof=1) + _STD_EPS)),
        n=int(chosen.shape[0]),
        tie_tol=float(tie_tol),
    )

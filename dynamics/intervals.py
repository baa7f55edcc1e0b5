"""Bootstrap confidence intervals over prompts and seeds (docs/math.md §6.2.2).

A study measures a per-prompt value v[s, p] (an accuracy on prompt p of the run with seed s) on S seeds and P
prompts shared by every seed. Its estimate is the grand mean v̄ = (1/SP) Σ_{s,p} v[s, p]. Both sources of
variation count, so each bootstrap replicate b resamples both, with replacement and independently:

    seeds   s_1, …, s_S ~ U{0 … S−1}        prompts p_1, …, p_P ~ U{0 … P−1}
    v̄*_b = (1/SP) Σ_{i,j} v[s_i, p_j]

(one prompt draw for all the drawn seeds: the prompts are the same for every seed). The interval at level 1 − α is
the percentile interval [q_{α/2}, q_{1−α/2}] of the replicates v̄*_1 … v̄*_B (numpy's default linear quantile).
Draw order, for reproducibility from `seed`: one `numpy.random.default_rng(seed)`, all seed draws [B, S] first,
then all prompt draws [B, P].

A difference of two reward types measured on the same seeds and prompts (EX − IM) is paired: its interval is
that of the per-(seed, prompt) differences v_EX[s, p] − v_IM[s, p].
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from dynamics.errors import DataError

__all__ = ["Interval", "bootstrap_interval", "paired_difference"]


@dataclasses.dataclass(frozen=True)
class Interval:
    """An estimate with its bootstrap interval.

    Attributes:
      mean: the grand mean over seeds and prompts.
      low, high: the percentile interval's ends.
      level: its confidence level (e.g. 0.95).
      n_seeds, n_prompts: S and P.
      n_boot: the number of replicates B.
    """

    mean: float
    low: float
    high: float
    level: float
    n_seeds: int
    n_prompts: int
    n_boot: int

    def excludes(self, value: float) -> bool:
        """Whether `value` lies outside [low, high]."""
        return value < self.low or value > self.high

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _grid(values: Any) -> np.ndarray:
    v = np.asarray(values, np.float64)
    if v.ndim == 1:
        v = v[None, :]
    if v.ndim != 2 or v.shape[0] < 1 or v.shape[1] < 1:
        raise DataError(f"bootstrap values must be [S seeds, P prompts] (or [P]) with S, P ≥ 1, got {v.shape}")
    if not np.all(np.isfinite(v)):
        raise DataError("bootstrap values must be finite")
    return v


def bootstrap_interval(values: Any, *, n_boot: int = 10_000, level: float = 0.95, seed: int = 0) -> Interval:
    """The grand mean of `values` [S, P] (or [P]) and its percentile bootstrap interval over seeds and prompts
    (module docstring).

    Raises:
      DataError: values not [S, P] with S, P ≥ 1, or not finite.
      ValueError: n_boot < 1 or level outside (0, 1).
    """
    v = _grid(values)
    if n_boot < 1:
        raise ValueError(f"n_boot must be ≥ 1, got {n_boot}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    S, P = v.shape
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, S, size=(n_boot, S))
    prompts = rng.integers(0, P, size=(n_boot, P))
    # mean over the drawn grid = mean over drawn seeds of (mean over drawn prompts of v[s, ·])
    per_seed = np.stack([v[:, prompts[b]].mean(axis=1) for b in range(n_boot)])  # [B, S]
    replicates = np.take_along_axis(per_seed, seeds, axis=1).mean(axis=1)
    alpha = 1.0 - level
    low, high = np.quantile(replicates, [alpha / 2, 1 - alpha / 2])
    return Interval(float(v.mean()), float(low), float(high), level, S, P, n_boot)


def paired_difference(a: Any, b: Any, **options: Any) -> Interval:
    """`bootstrap_interval` of a − b, two [S, P] grids on the same seeds and prompts (paired).

    Raises:
      DataError: grids of different shapes, and `bootstrap_interval`'s errors.
    """
    x, y = _grid(a), _grid(b)
    if x.shape != y.shape:
        raise DataError(f"a paired difference needs grids of one shape, got {x.shape} and {y.shape}")
    return bootstrap_interval(x - y, **options)

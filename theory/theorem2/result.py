"""Theorem 2's simulator options, its recording grid and its result (docs/math.md §5).

**Step sizes.** `schedule="plain"` is GD with a constant step, the theorem's setting; its direction
converges only logarithmically (cos(u, u*) ≈ 0.99 needs ~1e7 steps). `schedule="normalized"` divides the
step by the current loss, η_t = η / L(θ_t), and converges in direction far faster. The schedule applies to
both heads. The IM-RM's margin is β⟨ΔW, φ_i⟩ with φ_i = (e_{y+} − e_{y−}) h_x^T, so its step defaults to
η/β², which makes it GD with step η on βΔW.

**Recording.** Quantities are recorded at t = 0 and on a log-spaced grid of GD steps up to `n_steps`
(`recording_grid`); every series of a `Theorem2Result` is [S, G] (S seeds, G recording points), named in
`SERIES`. Accuracy counts ties as ½ (`TIE_RULE`; docs/math.md §1).

A result is saved as plain JSON by `Theorem2Result.save(path)` (`to_dict()` written atomically).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from dynamics.errors import ConfigError
from dynamics.outputs import jsonable, write_json_atomic

__all__ = [
    "METHODS",
    "SCHEDULES",
    "SERIES",
    "TIE_RULE",
    "Theorem2Config",
    "Theorem2Result",
    "recording_grid",
]

SCHEDULES = ("plain", "normalized")
METHODS = ("dual", "primal")
TIE_RULE = (
    "ties count 1/2; IM-RM reward differences are beta*<dW[y+] - dW[y-], h_x> with dW = W(t) - W(0) "
    "(the log-softmax normaliser cancels for a shared prompt), exactly 0.0 for tokens whose rows never "
    "moved; a tie is r+ == r- exactly, no tolerance"
)


# ----------------------------------------------------------------------------------------------------------
# Configuration and result


@dataclass(frozen=True)
class Theorem2Config:
    """Options of the simulator.

    Attributes:
      n_steps: number of GD steps T (the last recording point).
      lr: EX-RM step size η (plain: constant; normalized: η / L(u_t)).
      im_lr: IM-RM step size; None means lr/β² (GD with step lr on βΔW, see module doc). With the normalized
        schedule and lr = 0.5 this runs at the edge of stability on a few synthetic seeds (the IM-RM loss is
        briefly non-monotone, ~2 in 100); the unseen-token claim does not depend on the step size.
      beta: β of the IM-RM (paper: 0.01).
      schedule: "plain" (GD, the theorem's setting) or "normalized" (η_t = η / L(θ_t)).
      n_grid: number of log-spaced recording points, t = 0 included (fewer if rounding merges some).
      dtype: "float64" (default; plain GD needs it past ~1e6 steps, where float32 updates round away) or
        "float32".
      method: "dual" (default, fast) steps the coefficients c of θ(t) − θ(0) = Σ_i c_i ∇m_i with the Gram
        matrix of the margin gradients, O(n²) per step; "primal" (the reference) steps u and W themselves
        along autodiff gradients, O(n·D + T·D) per step. Both are the same GD; tests cross-check them.
    """

    n_steps: int = 10_000
    lr: float = 0.5
    im_lr: float | None = None
    beta: float = 0.01
    schedule: str = "normalized"
    n_grid: int = 41
    dtype: str = "float64"
    method: str = "dual"

    def __post_init__(self) -> None:
        if int(self.n_steps) != self.n_steps or not 1 <= self.n_steps < 2**31:
            raise ConfigError(f"n_steps must be an integer in [1, 2**31), got {self.n_steps!r}")
        for name in ("lr", "beta"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(f"{name} must be a finite number > 0, got {v!r}")
        if self.im_lr is not None and not (math.isfinite(self.im_lr) and self.im_lr > 0):
            raise ConfigError(f"im_lr must be None or a finite number > 0, got {self.im_lr!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if int(self.n_grid) != self.n_grid or self.n_grid < 2:
            raise ConfigError(f"n_grid must be an integer >= 2, got {self.n_grid!r}")
        if self.dtype not in ("float32", "float64"):
            raise ConfigError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}")

    @property
    def resolved_im_lr(self) -> float:
        """The IM-RM step size actually used."""
        return self.im_lr if self.im_lr is not None else self.lr / self.beta**2


def recording_grid(n_steps: int, n_grid: int) -> np.ndarray:
    """Recording steps: 0, then about n_grid − 1 log-spaced integers from 1 to n_steps (duplicates merged)."""
    if n_steps < 1 or n_grid < 2:
        raise ConfigError(f"need n_steps >= 1 and n_grid >= 2, got {n_steps}, {n_grid}")
    pts = np.unique(np.round(np.logspace(0.0, math.log10(n_steps), n_grid - 1)).astype(np.int64))
    pts = pts[(pts >= 1) & (pts <= n_steps)]
    if pts[-1] != n_steps:
        pts = np.append(pts, n_steps)
    return np.concatenate([[0], pts]).astype(np.int64)


# The [S, G] series of a `Theorem2Result`, in the order the simulator records them (`simulate_theorem2`
# fills them by these names).
SERIES = (
    "cos_u_star",
    "log_loss_ex",
    "log_loss_im",
    "train_acc_ex",
    "train_acc_im",
    "acc_seen_ex",
    "acc_unseen_ex",
    "acc_seen_im",
    "acc_unseen_im",
    "max_unseen_row_change",
    "max_unseen_reward_diff_im",
)


@dataclass(frozen=True)
class Theorem2Result:
    """Everything the simulator recorded (docs/math.md §5). Series are [S, G] numpy arrays over `steps`.

    Attributes:
      steps: [G] GD step t of each recording point (t = 0 is the initialisation).
      cos_u_star: cos(u(t), u*) (0 while u = 0).
      log_loss_ex, log_loss_im: ln of the training BT loss (finite even when the loss underflows).
      train_acc_ex, train_acc_im: training accuracy (ties ½).
      acc_seen_ex, acc_unseen_ex, acc_seen_im, acc_unseen_im: accuracy on evaluation pairs whose tokens are
        both seen / both unseen (ties ½; NaN if a seed has no such pair).
      max_unseen_row_change: max over unseen tokens v of |W_v(t) − W_v(0)| (Theorem 2: exactly 0).
      max_unseen_reward_diff_im: max over unseen evaluation pairs of |r_IM(x,ȳ+) − r_IM(x,ȳ−)| (exactly 0).
      u_star_acc_seen, u_star_acc_unseen: [S] accuracy of u* on the same pairs.
      n_eval_seen, n_eval_unseen: [S] number of seen / unseen evaluation pairs.
      u_star: [S, D_ex] the max-margin directions.
      final_u: [S, D_ex] u(T); final_unembedding: [S, T, D] W(T).
      config: the `Theorem2Config`; source: the problem's source; seed: the base seed, if known.
      tie_rule: how ties are decided (`TIE_RULE`).
    """

    steps: np.ndarray
    cos_u_star: np.ndarray
    log_loss_ex: np.ndarray
    log_loss_im: np.ndarray
    train_acc_ex: np.ndarray
    train_acc_im: np.ndarray
    acc_seen_ex: np.ndarray
    acc_unseen_ex: np.ndarray
    acc_seen_im: np.ndarray
    acc_unseen_im: np.ndarray
    max_unseen_row_change: np.ndarray
    max_unseen_reward_diff_im: np.ndarray
    u_star_acc_seen: np.ndarray
    u_star_acc_unseen: np.ndarray
    n_eval_seen: np.ndarray
    n_eval_unseen: np.ndarray
    u_star: np.ndarray
    final_u: np.ndarray
    final_unembedding: np.ndarray
    config: Theorem2Config
    source: str = "custom"
    seed: int | None = None
    tie_rule: str = TIE_RULE

    @property
    def n_seeds(self) -> int:
        """S."""
        return int(self.cos_u_star.shape[0])

    def summary(self) -> dict[str, float]:
        """Final-step numbers: means over seeds (and min for cos), used by the CLI table."""
        last = {name: getattr(self, name)[:, -1] for name in SERIES}
        return {
            "steps": int(self.steps[-1]),
            "cos_u_star_mean": float(np.mean(last["cos_u_star"])),
            "cos_u_star_min": float(np.min(last["cos_u_star"])),
            "train_acc_ex": float(np.mean(last["train_acc_ex"])),
            "train_acc_im": float(np.mean(last["train_acc_im"])),
            "acc_seen_ex": float(np.nanmean(last["acc_seen_ex"])),
            "acc_seen_im": float(np.nanmean(last["acc_seen_im"])),
            "acc_unseen_ex": float(np.nanmean(last["acc_unseen_ex"])),
            "acc_unseen_im": float(np.nanmean(last["acc_unseen_im"])),
            "u_star_acc_unseen": float(np.nanmean(self.u_star_acc_unseen)),
            "max_unseen_row_change": float(np.max(self.max_unseen_row_change)),
            "max_unseen_reward_diff_im": float(np.max(self.max_unseen_reward_diff_im)),
        }

    def to_dict(self, include_params: bool = False) -> dict[str, Any]:
        """Plain-JSON dictionary: config, steps, every [S, G] series, per-seed u* accuracies and counts.

        Args:
          include_params: also write u_star, final_u and final_unembedding (large for model problems).
        """
        out: dict[str, Any] = {
            "theorem": "2",
            "source": self.source,
            "seed": self.seed,
            "n_seeds": self.n_seeds,
            "config": {f.name: getattr(self.config, f.name) for f in fields(self.config)},
            "im_lr": self.config.resolved_im_lr,
            "tie_rule": self.tie_rule,
            "summary": self.summary(),
            "steps": self.steps,
        }
        for name in (*SERIES, "u_star_acc_seen", "u_star_acc_unseen", "n_eval_seen", "n_eval_unseen"):
            out[name] = getattr(self, name)
        if include_params:
            out.update(u_star=self.u_star, final_u=self.final_u, final_unembedding=self.final_unembedding)
        return jsonable(out)

    def save(self, path: str | os.PathLike[str], include_params: bool = False) -> Path:
        """Writes `to_dict(include_params)` to `path` as JSON, atomically; returns the path."""
        return write_json_atomic(path, self.to_dict(include_params))

"""The DPO family of preference objectives, each as a per-pair loss of the reward margin (docs/math.md §11).

Pure Python until a loss is evaluated (JAX is imported then), so that the CLI checks an objective before JAX loads.

Every objective here is a function of the reward margin m_i = r(x_i, y_i+) − r(x_i, y_i−) alone, ℓ_i = ℓ(m_i),
and the training loss is the batch mean L = (1/B) Σ_i ℓ(m_i). Its gradient is

    ∇L = −(1/B) Σ_i w_i (∇r(x_i, y_i+) − ∇r(x_i, y_i−)),        w_i = −ℓ'(m_i),

so every result of docs/math.md §3 (Δr after one SGD step, Eqs. (4), (5)) and §10 (the contribution matrix) holds
for any of them with the Bradley-Terry weight σ(−m_i) replaced by w_i. In reward units (r_IM = β ln π/π_ref, so
that m = β h with h the log-ratio margin of TRL's `logits`):

    dpo    ℓ = −ln σ(m)                                   w = σ(−m)                    (Bradley-Terry, DPO)
    cdpo   ℓ = −(1 − ε) ln σ(m) − ε ln σ(−m)              w = (1 − ε) σ(−m) − ε σ(m)   (label smoothing ε)
    ipo    ℓ = (m/β − 1/(2β))² = (m − ½)² / β²            w = (1 − 2m) / β²            (IPO, Azar et al. 2024)
    hinge  ℓ = max(0, 1 − m)                              w = 1[m < 1]                 (SLiC hinge)
    simpo  ℓ = −ln σ(m − γ)                               w = σ(γ − m)                 (target margin γ ≥ 0)

SimPO (Meng et al. 2024) also changes the reward: r = (β/|y|) ln π_θ(y|x), reference-free and length-normalised
(`reward_model` makes an IM-RM so). These are the losses TRL's DPOTrainer (`loss_type` sigmoid, ipo, hinge, with
`label_smoothing` for cDPO) and CPOTrainer (`loss_type="simpo"`, `simpo_gamma` = γ) minimise.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dynamics.errors import ConfigError

__all__ = ["OBJECTIVES", "Objective", "make_objective", "objective_weight", "reward_model"]

#: The objective names, in the order the CLI lists them.
OBJECTIVES = ("dpo", "cdpo", "ipo", "hinge", "simpo")


@dataclasses.dataclass(frozen=True)
class Objective:
    """One objective of the DPO family (docs/math.md §11), hashable (a static argument under jit).

    Attributes:
      name: one of `OBJECTIVES`.
      beta: IPO's β (its loss is in units of the log-ratio margin m/β); the IM-RM's β for an IM-RM, 1 for an EX-RM.
        Only IPO reads it.
      gamma: SimPO's target margin γ ≥ 0 in reward units (TRL's `simpo_gamma`).
      smoothing: cDPO's label-smoothing ε ∈ [0, ½).
    """

    name: str = "dpo"
    beta: float = 1.0
    gamma: float = 0.0
    smoothing: float = 0.0

    def __post_init__(self):
        if self.name not in OBJECTIVES:
            raise ConfigError(f"unknown objective {self.name!r}; expected one of {', '.join(OBJECTIVES)}")
        if not self.beta > 0:
            raise ConfigError(f"objective {self.name}: β must be > 0, got {self.beta}")
        if not self.gamma >= 0:
            raise ConfigError(f"objective {self.name}: the target margin γ must be ≥ 0, got {self.gamma}")
        if not 0 <= self.smoothing < 0.5:
            raise ConfigError(f"objective {self.name}: label smoothing ε must be in [0, 0.5), got {self.smoothing}")
        if self.gamma and self.name != "simpo":
            raise ConfigError(f"objective {self.name} has no target margin γ (only simpo does); got γ = {self.gamma}")
        if self.smoothing and self.name != "cdpo":
            raise ConfigError(
                f"objective {self.name} has no label smoothing (only cdpo does); got ε = {self.smoothing}"
            )

    def losses(self, r_chosen: Any, r_rejected: Any) -> Any:
        """ℓ(m_i) per pair [B], m_i = r_i+ − r_i− in reward units (the table of the module docstring)."""
        import jax

        m = r_chosen - r_rejected
        if self.name == "dpo":
            return -jax.nn.log_sigmoid(m)
        if self.name == "cdpo":
            return -(1 - self.smoothing) * jax.nn.log_sigmoid(m) - self.smoothing * jax.nn.log_sigmoid(-m)
        if self.name == "ipo":
            return (m - 0.5) ** 2 / self.beta**2
        if self.name == "hinge":
            return jax.nn.relu(1 - m)
        return -jax.nn.log_sigmoid(m - self.gamma)

    def loss(self, r_chosen: Any, r_rejected: Any) -> Any:
        """L = (1/B) Σ_i ℓ(m_i), the training loss (a scalar)."""
        return self.losses(r_chosen, r_rejected).mean()

    def weight(self, r_chosen: Any, r_rejected: Any) -> Any:
        """w_i = −ℓ'(m_i) [B]: the weight of ∇r_i+ − ∇r_i− in −∇L (docs/math.md §11; σ(−m) for DPO).

        Positive w pushes the chosen reward up; IPO's is negative once m > ½ (it pulls an over-separated pair
        back), cDPO's once σ(m) > 1 − ε, the hinge's is 0 past the margin 1. At the hinge's kink m = 1 it is 0.
        """
        import jax

        return self._weight_of(r_chosen - r_rejected, jax.nn.sigmoid)

    def margin_weight(self, margin: Any) -> Any:
        """`weight` as a function of the margin m alone, in float64 numpy (no JAX; no overflow for any finite m)."""
        import numpy as np

        def sigmoid(x):
            z = np.exp(-np.abs(x))
            return np.where(x >= 0, 1.0 / (1.0 + z), z / (1.0 + z))

        return self._weight_of(np.asarray(margin, np.float64), sigmoid)

    def _weight_of(self, m: Any, sigmoid: Any) -> Any:
        """w(m) of the module docstring's table, with the array library's `sigmoid` (JAX or numpy)."""
        if self.name == "dpo":
            return sigmoid(-m)
        if self.name == "cdpo":
            return (1 - self.smoothing) * sigmoid(-m) - self.smoothing * sigmoid(m)
        if self.name == "ipo":
            return (1 - 2 * m) / self.beta**2
        if self.name == "hinge":
            return (m < 1).astype(m.dtype)
        return sigmoid(self.gamma - m)

    def to_dict(self) -> dict[str, Any]:
        """The objective's settings as plain JSON values."""
        return dataclasses.asdict(self)


def make_objective(name: str, rm: Any = None, *, gamma: float = 0.0, smoothing: float = 0.0) -> Objective:
    """The objective `name` for reward model `rm`: IPO's β is the IM-RM's β (1 for any other reward model).

    Raises:
      ConfigError: an unknown name, γ < 0, ε outside [0, ½), or γ / ε given to an objective without it.
    """
    from dynamics.rewards import ImplicitRM

    beta = float(rm.beta) if isinstance(rm, ImplicitRM) else 1.0
    return Objective(name, beta=beta, gamma=float(gamma), smoothing=float(smoothing))


def objective_weight(objective: Objective | None, r_chosen: Any, r_rejected: Any) -> Any:
    """`objective.weight`, or the Bradley-Terry weight σ(r− − r+) when `objective` is None."""
    return (objective or Objective()).weight(r_chosen, r_rejected)


def reward_model(rm: Any, objective: Objective | None) -> Any:
    """The reward model the objective trains: SimPO's IM-RM is reference-free and length-normalised,
    r = (β/|y|) ln π_θ(y|x); every other (objective, model) pair is returned unchanged."""
    from dynamics.rewards import ImplicitRM

    if objective is not None and objective.name == "simpo" and isinstance(rm, ImplicitRM):
        return dataclasses.replace(rm, reference_free=True, length_normalised=True)
    return rm

"""Theorem 2: the single-token simulator of EX-RM vs IM-RM gradient descent (docs/math.md §5).

Under Assumption 1 (fixed hidden representations; only the last linear layer trains) and Assumption 2
(single-token responses):

- EX-RM: r_EX(x, y) = ⟨u, h_{x,y}⟩, the head u trains. The training differences z_i = h_{x_i,y_i+} −
  h_{x_i,y_i−} define the max-margin direction u* (`theory.maxmargin`); GD drives u(t)/‖u(t)‖ → u*/‖u*‖
  (claim 1).
- IM-RM: r_IM(x, y) = β[ln softmax(W h_x)_y − ln π_ref(y|x)] with π_ref = π_{W(0)}; the unembedding W trains.
  The rows of tokens never seen in training keep their initial value, so every pair of unseen tokens ties at
  every t and the IM-RM's accuracy on unseen pairs is exactly ½ (claim 2).

The package, by idea:

- `problem`: `Theorem2Problem` (the arrays), its validation, seed selection, the synthetic source
  (docs/math.md §5 "Simulation recipe") and u* per seed (`max_margin_directions`);
- `result`: `Theorem2Config` (step sizes and schedules), `recording_grid` and `Theorem2Result`;
- `simulate`: the jitted, vmapped GD of both heads (`simulate_theorem2`).

Every public name is importable from `theory.theorem2` itself.
"""

from theory.theorem2.problem import (
    SYNTHETIC_BAD_TOKENS,
    SYNTHETIC_GOOD_TOKENS,
    SYNTHETIC_SEEN_BAD,
    SYNTHETIC_SEEN_GOOD,
    Theorem2Problem,
    broadcast_problem,
    max_margin_directions,
    select_seeds,
    synthetic_problem,
    synthetic_problems,
    training_differences,
    validate_problem,
)
from theory.theorem2.result import METHODS, SCHEDULES, TIE_RULE, Theorem2Config, Theorem2Result, recording_grid
from theory.theorem2.simulate import simulate_theorem2, simulator_trace_count

__all__ = [
    "METHODS",
    "SCHEDULES",
    "SYNTHETIC_BAD_TOKENS",
    "SYNTHETIC_GOOD_TOKENS",
    "SYNTHETIC_SEEN_BAD",
    "SYNTHETIC_SEEN_GOOD",
    "TIE_RULE",
    "Theorem2Config",
    "Theorem2Problem",
    "Theorem2Result",
    "broadcast_problem",
    "max_margin_directions",
    "recording_grid",
    "select_seeds",
    "simulate_theorem2",
    "simulator_trace_count",
    "synthetic_problem",
    "synthetic_problems",
    "training_differences",
    "validate_problem",
]

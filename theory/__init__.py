"""rmdyn.theory: the paper's closed-form theory (Theorems 1 and 2, the max-margin direction); no LLM needed.

Nothing here imports `dynamics.models`, torch or transformers.
"""

from theory.maxmargin import MaxMarginResult, default_qp_solver, max_margin_direction
from theory.theorem1 import (
    GenerationBound,
    VerifierCheck,
    VerifierConstruction,
    check_verifier,
    construction_from_counts,
    construction_from_masses,
    verifier_construction,
)
from theory.theorem2 import (
    METHODS,
    SCHEDULES,
    TIE_RULE,
    Theorem2Config,
    Theorem2Problem,
    Theorem2Result,
    broadcast_problem,
    max_margin_directions,
    recording_grid,
    select_seeds,
    simulate_theorem2,
    simulator_trace_count,
    synthetic_problem,
    synthetic_problems,
    training_differences,
    validate_problem,
)

__all__ = [
    "METHODS",
    "SCHEDULES",
    "TIE_RULE",
    "GenerationBound",
    "MaxMarginResult",
    "Theorem2Config",
    "Theorem2Problem",
    "Theorem2Result",
    "VerifierCheck",
    "VerifierConstruction",
    "broadcast_problem",
    "check_verifier",
    "construction_from_counts",
    "construction_from_masses",
    "default_qp_solver",
    "max_margin_direction",
    "max_margin_directions",
    "recording_grid",
    "select_seeds",
    "simulate_theorem2",
    "simulator_trace_count",
    "synthetic_problem",
    "synthetic_problems",
    "training_differences",
    "validate_problem",
    "verifier_construction",
]

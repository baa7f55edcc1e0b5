"""Dataset-scale attribution: which training pairs (and tokens) moved which eval rewards (docs/math.md §10).

    from dynamics.attribution import EvalSet, attribute
    result = attribute(rm, params, train, EvalSet(eval_chosen, eval_rejected), params_spec="last:2", lr=1e-3)

Modules (one idea each):

    evalset        eval items: pairs (margins) or single responses; the JSONL reader (pure Python: no JAX)
    gradients      exact per-sequence reward gradients, one backward pass each, in blocks
    projected      k-dimensional random (Kronecker) projections of them, never forming a layer's gradient
    contributions  the contribution matrix C = η w ⊙ ⟨∇q_i, ∇m_j⟩ (§10.1)
    overlap        token overlap, the indicator term and hidden similarity; their rank statistics (§10.5)
    tokens         the IM-RM token-pair view of one C_ij (§10.6)
    analysis       attribute(): all of the above for one reward type
    along_run      attribution along a trained run's checkpoints, TracIn-style, SGD and Adam (§10.3)
    trajectory     the linearised multi-step trajectory from the kernels at θ_0 (§10.4)

Importing this package does not import JAX: every name but those of `evalset` loads on first use (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import Any

from dynamics.attribution.evalset import EvalItems, EvalSet, load_eval_items

# public name → the submodule that defines it (imported on first access)
_LAZY = {
    "Attribution": "analysis",
    "attribute": "analysis",
    "Contributions": "contributions",
    "contribution_matrix": "contributions",
    "eval_values": "contributions",
    "ItemStates": "overlap",
    "item_states": "overlap",
    "OverlapScores": "overlap",
    "overlap_scores": "overlap",
    "overlap_statistics": "overlap",
    "TokenPairView": "tokens",
    "token_pairs": "tokens",
    "projected_features": "projected",
    "projection_plan": "projected",
    "Kernels": "trajectory",
    "Trajectory": "trajectory",
    "linearised_kernels": "trajectory",
    "linearised_trajectory": "trajectory",
    "parting_step": "trajectory",
    "training_batches": "trajectory",
    "RunAttribution": "along_run",
    "attribute_run": "along_run",
    "load_run_model": "along_run",
}

__all__ = [
    "Attribution",
    "Contributions",
    "EvalItems",
    "EvalSet",
    "ItemStates",
    "Kernels",
    "OverlapScores",
    "RunAttribution",
    "TokenPairView",
    "Trajectory",
    "attribute",
    "attribute_run",
    "contribution_matrix",
    "eval_values",
    "item_states",
    "linearised_kernels",
    "linearised_trajectory",
    "load_eval_items",
    "load_run_model",
    "overlap_scores",
    "overlap_statistics",
    "parting_step",
    "projected_features",
    "projection_plan",
    "token_pairs",
    "training_batches",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"dynamics.attribution.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dynamics.attribution' has no attribute {name!r}")

"""Dataset-scale attribution: which training pairs (and tokens) moved which eval rewards (docs/math.md §10).

- `contribution_matrix`: C_ij = η w_j ⟨∇q_i, ∇r(x_j,y_j+) − ∇r(x_j,y_j−)⟩ for M eval items × N training pairs,
  exact or from random projections of the per-sequence gradients.
- `load_eval_items`, `EvalSet`: eval pairs (margins) or single responses (rewards).
"""

from dynamics.attribution.contributions import Contributions, contribution_matrix, eval_values
from dynamics.attribution.evalset import EvalItems, EvalSet, load_eval_items

__all__ = ["Contributions", "EvalItems", "EvalSet", "contribution_matrix", "eval_values", "load_eval_items"]

"""Theorem 1: an IM-RM can verify without generating (docs/math.md §4; arXiv 2507.07981, Theorem 1).

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

The package, by idea:

- `bound`: `GenerationBound` (per-prompt masses, the bound, the odds ratio) and the construction from masses or
  counts alone, for response sets too large to enumerate;
- `verifier`: the construction on an enumerated response set (`verifier_construction`) and the check of any π
  (`check_verifier`).

Every result has `to_dict()` and `save(path)`. Shapes: P prompts, N responses per prompt.
"""

from theory.theorem1.bound import GenerationBound, construction_from_counts, construction_from_masses
from theory.theorem1.verifier import VerifierCheck, VerifierConstruction, check_verifier, verifier_construction

__all__ = [
    "GenerationBound",
    "VerifierCheck",
    "VerifierConstruction",
    "check_verifier",
    "construction_from_counts",
    "construction_from_masses",
    "verifier_construction",
]

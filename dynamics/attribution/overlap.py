"""Token overlap vs hidden-state similarity: what explains the attribution C (docs/math.md §10.5).

The paper's claim (arXiv 2507.07981 Section 4) at dataset scale: the IM-RM's reward moves with the *tokens* a
training response shares with an eval response, the EX-RM's with the *hidden states*. For eval item i and training
pair j, with signs s = +1 for a chosen and −1 for a rejected response (a single eval response has s = +1), three
[M, N] scores of the model at θ, none of which needs a gradient:

    overlap O_ij     = Σ_{a,b} s_a s_b Σ_k Σ_l 1[ȳ^a_k = v^b_l]                    (identical response tokens)
    indicator I_ij   = β² Σ_{a,b} s_a s_b Σ_k Σ_l 1[ȳ^a_k = v^b_l] ⟨h_{ȳ^a<k}, h_{v^b<l}⟩  (Eq. (5)'s indicator term)
    hidden   H_ij    = ⟨h_{ē+_i} − h_{ē−_i}, h_{y+_j} − h_{y−_j}⟩         (Eq. (4)'s kernel, whole sequences)

(a ranges over the eval item's responses, b over y_j+ and y_j−; k, l over response tokens, closing tokens
included). `overlap_statistics` reports the Spearman rank correlation of C with each score, over all (i, j).
η w_j I_ij is the part of the IM-RM's unembedding contribution carried by the indicator term 1[ȳ_k = v_l].
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dynamics.attribution.evalset import EvalSet
from dynamics.batches import PairBatch, PreferenceBatch, last_token_index
from dynamics.chunking import batch_chunks
from dynamics.models import LM

__all__ = [
    "ItemStates",
    "OverlapScores",
    "SequenceStates",
    "item_states",
    "overlap_scores",
    "overlap_statistics",
    "sequence_states",
    "spearman",
]


@dataclasses.dataclass(frozen=True)
class SequenceStates:
    """Per-sequence arrays of n sequences (docs/math.md §1), padded to one length T − 1.

    Attributes:
      contexts: h_{x,y<k}, the state that predicts each token, [n, T−1, D].
      tokens: the predicted tokens, [n, T−1].
      mask: 1 on response tokens, [n, T−1].
      last: h_{x,y}, the whole-sequence state at the last real token, [n, D].
    """

    contexts: np.ndarray
    tokens: np.ndarray
    mask: np.ndarray
    last: np.ndarray


def _states(lm: LM, lm_params, batch: PairBatch):
    hidden = lm.forward(lm_params, jnp.asarray(batch.tokens), jnp.asarray(batch.attention_mask))
    last = jnp.take_along_axis(hidden, last_token_index(batch.attention_mask)[:, None, None], axis=1)[:, 0]
    return hidden[:, :-1], jnp.asarray(batch.tokens)[:, 1:], jnp.asarray(batch.response_mask)[:, 1:], last


_states_jit = jax.jit(_states, static_argnums=0)


def sequence_states(lm: LM, lm_params, batch: PairBatch, chunk: int = 8) -> SequenceStates:
    """The `SequenceStates` of every row of `batch` (one forward pass per chunk of rows)."""
    parts = [[np.asarray(a)[:keep] for a in _states_jit(lm, lm_params, c)] for c, keep in batch_chunks(batch, chunk)]
    return SequenceStates(*(np.concatenate(xs) for xs in zip(*parts, strict=True)))


@jax.jit
def _pair_terms(hu, tu, mu, hv, tv, mv):
    """(Σ_kl 1[=], Σ_kl 1[=] ⟨h, h'⟩) for every (u, v) of two blocks: [U, V] each."""
    same = (tu[:, None, :, None] == tv[None, :, None, :]) & (mu[:, None, :, None] > 0) & (mv[None, :, None, :] > 0)
    dots = jnp.einsum("UKD,VLD->UVKL", hu, hv.astype(hu.dtype))
    same_f = same.astype(dots.dtype)
    return same_f.sum((2, 3)), (same_f * dots).sum((2, 3))


@dataclasses.dataclass(frozen=True)
class OverlapScores:
    """The three [M, N] scores of docs/math.md §10.5: token overlap O, indicator term I (with β²), hidden H."""

    overlap: np.ndarray
    indicator: np.ndarray
    hidden: np.ndarray


def _signed(eval_sides, train_sides, fn) -> np.ndarray:
    """Σ_{a,b} s_a s_b fn(a, b) over the eval item's and the training pair's responses."""
    total = None
    for sa, a in eval_sides:
        for sb, b in train_sides:
            part = sa * sb * fn(a, b)
            total = part if total is None else total + part
    return total


def _blocked_terms(a: SequenceStates, b: SequenceStates, block: int) -> tuple[np.ndarray, np.ndarray]:
    M, N = a.tokens.shape[0], b.tokens.shape[0]
    ov, ind = np.zeros((M, N)), np.zeros((M, N))
    for i in range(0, M, block):
        for j in range(0, N, block):
            o, d = _pair_terms(
                a.contexts[i : i + block], a.tokens[i : i + block], a.mask[i : i + block],
                b.contexts[j : j + block], b.tokens[j : j + block], b.mask[j : j + block],
            )  # fmt: skip
            ov[i : i + block, j : j + block], ind[i : i + block, j : j + block] = np.asarray(o), np.asarray(d)
    return ov, ind


@dataclasses.dataclass(frozen=True)
class ItemStates:
    """The `SequenceStates` of every response of the eval items and the training pairs, each with its name and sign.

    Attributes:
      eval: [("response", +1, states)] for single eval responses, or [("chosen", +1, ·), ("rejected", −1, ·)].
      train: [("chosen", +1, states of y_j+), ("rejected", −1, states of y_j−)].
    """

    eval: list[tuple[str, float, SequenceStates]]
    train: list[tuple[str, float, SequenceStates]]


def item_states(lm: LM, lm_params, train: PreferenceBatch, evalset: EvalSet) -> ItemStates:
    """One forward pass of π_θ over every eval and training response (the inputs of O, I, H and the token view)."""
    if evalset.rejected is None:
        ev = [("response", 1.0, sequence_states(lm, lm_params, evalset.chosen))]
    else:
        ev = [
            ("chosen", 1.0, sequence_states(lm, lm_params, evalset.chosen)),
            ("rejected", -1.0, sequence_states(lm, lm_params, evalset.rejected)),
        ]
    tr = [
        ("chosen", 1.0, sequence_states(lm, lm_params, train.chosen)),
        ("rejected", -1.0, sequence_states(lm, lm_params, train.rejected)),
    ]
    return ItemStates(ev, tr)


def overlap_scores(
    lm: LM,
    lm_params,
    train: PreferenceBatch,
    evalset: EvalSet,
    *,
    beta: float = 1.0,
    block: int = 8,
    states: ItemStates | None = None,
) -> OverlapScores:
    """O, I and H of docs/math.md §10.5 for every eval item (rows) and training pair (columns).

    Args:
      lm, lm_params: the language model at θ (for an IM-RM, π_θ).
      train: the N training pairs.
      evalset: the M eval items.
      beta: β of the IM-RM (I carries β²; use 1 for an EX-RM).
      block: rows per block of the pairwise [block, block, K, L] arrays.
      states: `item_states(lm, lm_params, train, evalset)` when the caller already has it (no forward pass then).
    """
    if states is None:
        states = item_states(lm, lm_params, train, evalset)
    ev = [(sign, st) for _, sign, st in states.eval]
    tr = [(sign, st) for _, sign, st in states.train]
    cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def terms(a, b):
        key = (id(a), id(b))
        if key not in cache:
            cache[key] = _blocked_terms(a, b, block)
        return cache[key]

    overlap = _signed(ev, tr, lambda a, b: terms(a, b)[0])
    indicator = beta**2 * _signed(ev, tr, lambda a, b: terms(a, b)[1])
    hidden = _signed(ev, tr, lambda a, b: a.last.astype(np.float64) @ b.last.astype(np.float64).T)
    return OverlapScores(overlap, indicator, hidden)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two arrays over all entries (average ranks for ties); nan if one is constant."""
    from scipy.stats import rankdata

    ra, rb = rankdata(np.ravel(a)), rankdata(np.ravel(b))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def overlap_statistics(
    contribution: np.ndarray, scores: OverlapScores, weight: np.ndarray, lr: float, *, implicit: bool = True
) -> dict[str, Any]:
    """How much of C follows token overlap vs hidden-state similarity (docs/math.md §10.5).

    Returns:
      spearman_overlap, spearman_hidden: rank correlations of C with O and with H over all (i, j). For an IM-RM
      (`implicit`) also spearman_indicator (C against η w_j I_ij), indicator_share Σ|η w_j I_ij| / Σ|C_ij| (the
      identical-token term of Eq. (5) next to the whole contribution) and sign_agreement_indicator (the fraction
      of entries where C_ij and I_ij have the same sign); None (`implicit=False`) for an EX-RM, whose reward has no
      such term, and for a selection that does not train the unembedding (the term is then no part of C).
    """
    stats: dict[str, Any] = {
        "spearman_overlap": spearman(contribution, scores.overlap),
        "spearman_hidden": spearman(contribution, scores.hidden),
        "spearman_indicator": None,
        "indicator_share": None,
        "sign_agreement_indicator": None,
    }
    if not implicit:
        return stats
    ind = lr * scores.indicator * weight[None, :]
    total = float(np.abs(contribution).sum())
    nonzero = (contribution != 0) & (ind != 0)
    stats["spearman_indicator"] = spearman(contribution, ind)
    stats["indicator_share"] = float(np.abs(ind).sum() / total) if total else float("nan")
    stats["sign_agreement_indicator"] = (
        float(np.mean(np.sign(contribution[nonzero]) == np.sign(ind[nonzero]))) if nonzero.any() else float("nan")
    )
    return stats

"""The token-pair view of an IM-RM contribution C_ij under the unembedding closed form (docs/math.md §10.6).

With only the (untied) unembedding W trained, Eq. (5) (arXiv 2507.07981; docs/math.md §3.2) splits every
contribution into token pairs: for eval response ȳ^a (sign s_a) and training response v^b (sign s_b),

    C^W_ij = η w_j β² Σ_{a,b} s_a s_b Σ_k Σ_l ⟨h_{ȳ^a<k}, h_{v^b<l}⟩ ρ_{k,l}(ȳ^a, v^b),

ρ_{k,l} = 1[ȳ_k = v_l] − q_l(ȳ_k) − p_k(v_l) + ⟨p_k, q_l⟩. `token_pairs` returns, for one (i, j), every term
t_{a,b,k,l} of that sum, the n largest by |t|, and the share carried by the indicator 1[ȳ_k = v_l] (identical
tokens) vs the rest. With `params_spec="unembed"` the sum of all terms is C_ij itself; with a larger selection it
is the part of C_ij that flows through W.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from dynamics.attribution.overlap import SequenceStates
from dynamics.kernels import DEFAULT_VOCAB_CHUNK, rho_terms_jit
from dynamics.models import unembedding

__all__ = ["TokenPair", "TokenPairView", "token_pairs"]


@dataclasses.dataclass(frozen=True)
class TokenPair:
    """One term of the sum: eval response `a` ("chosen", "rejected" or "response") token k against training
    response `b` ("chosen" or "rejected") token l; `value` = η w_j β² s_a s_b ⟨h, h'⟩ ρ_{k,l} (reward units)."""

    a: str
    b: str
    k: int
    l: int
    eval_token: int
    train_token: int
    rho: float
    hidden_dot: float
    value: float

    @property
    def identical(self) -> bool:
        """Whether the two tokens are the same (the indicator term is 1)."""
        return self.eval_token == self.train_token


@dataclasses.dataclass(frozen=True)
class TokenPairView:
    """The token-pair decomposition of one C^W_ij (docs/math.md §10.6).

    Attributes:
      total: C^W_ij, the sum of every term.
      indicator: the sum of the indicator parts η w_j β² s_a s_b ⟨h, h'⟩ 1[ȳ_k = v_l].
      rest: total − indicator (the probability terms of ρ).
      top: the n terms of largest |value|, largest first.
    """

    total: float
    indicator: float
    rest: float
    top: tuple[TokenPair, ...]

    @property
    def indicator_share(self) -> float:
        """indicator / total (nan when total is 0)."""
        return self.indicator / self.total if self.total else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields, the top terms as dicts with their `identical` flag."""
        top = [{**dataclasses.asdict(t), "identical": t.identical} for t in self.top]
        return {
            "total": self.total, "indicator": self.indicator, "rest": self.rest,
            "indicator_share": self.indicator_share, "top": top,
        }  # fmt: skip


def _response(states: SequenceStates, row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(contexts [K, D], tokens [K], positions [K]) of one sequence's response tokens."""
    pos = np.flatnonzero(states.mask[row])
    return states.contexts[row][pos], states.tokens[row][pos], pos


def token_pairs(
    lm,
    lm_params,
    eval_states: list[tuple[str, float, SequenceStates]],
    train_states: list[tuple[str, float, SequenceStates]],
    i: int,
    j: int,
    *,
    scale: float,
    n: int = 10,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
) -> TokenPairView:
    """Every term of C^W_ij (docs/math.md §10.6), the n largest by |value|, and the indicator share.

    Args:
      lm, lm_params: the policy (its unembedding W gives p and q).
      eval_states: (name, sign, states) of the eval responses: [("chosen", 1, ·), ("rejected", −1, ·)] or
        [("response", 1, ·)] (`overlap.sequence_states`).
      train_states: [("chosen", 1, ·), ("rejected", −1, ·)] of the training pairs.
      i, j: the eval item and the training pair.
      scale: η w_j β², the factor in front of the double sum.
      n: how many terms to keep.
      vocab_chunk: the vocabulary chunk of the streaming ρ.
    """
    W = unembedding(lm_params)
    cap = lm.config.final_logit_softcap
    terms: list[TokenPair] = []
    total = indicator = 0.0
    for a_name, sa, a in eval_states:
        h_u, t_u, k_pos = _response(a, i)
        for b_name, sb, b in train_states:
            h_v, t_v, l_pos = _response(b, j)
            r = rho_terms_jit(h_u, t_u, h_v, t_v, W, chunk=vocab_chunk, softcap=cap)
            rho = np.asarray(r.rho, np.float64)
            dots = np.asarray(h_u, np.float64) @ np.asarray(h_v, np.float64).T
            values = scale * sa * sb * dots * rho
            total += float(values.sum())
            indicator += float((scale * sa * sb * dots * np.asarray(r.indicator, np.float64)).sum())
            flat = np.argsort(-np.abs(values), axis=None, kind="stable")[:n]
            for f in flat:
                k, l = np.unravel_index(f, values.shape)
                terms.append(
                    TokenPair(
                        a_name,
                        b_name,
                        int(k_pos[k]),
                        int(l_pos[l]),
                        int(t_u[k]),
                        int(t_v[l]),
                        float(rho[k, l]),
                        float(dots[k, l]),
                        float(values[k, l]),
                    )  # fmt: skip
                )
    terms.sort(key=lambda t: -abs(t.value))
    return TokenPairView(total, indicator, total - indicator, tuple(terms[:n]))

"""Kernel math of the one-step reward change: ρ_{k,l} and the closed-form kernels (docs/math.md §3.1, §3.2).

For an unseen pair (x̄, ȳ) and a training response v ∈ {y+, y−} of prompt x, with p = π(·|x̄, ȳ<k) and
q = π(·|x, v<l) the two next-token distributions (arXiv 2507.07981 Eq. (5); docs/math.md §3.2):

    ρ_{k,l}(v) = ⟨e_{ȳ_k} − p, e_{v_l} − q⟩ = 1[ȳ_k = v_l] − q(ȳ_k) − p(v_l) + ⟨p, q⟩ ∈ [−2, 2].

The middle terms are cross probabilities: the training context's probability of the unseen token, and the unseen
context's probability of the training token. Under Assumption 1 (only the unembedding W trains, untied)

    K_IM(u, v) = ⟨∇_W r_IM(x̄,ȳ), ∇_W r_IM(x,v)⟩ = β² Σ_k Σ_l ⟨h_{x̄,ȳ<k}, h_{x,v<l}⟩ · ρ_{k,l}(v),

and for the EX-RM with only its head trained (Eq. (4); docs/math.md §3.1) K_EX(u, v) = ⟨h_u, h_v⟩, the inner
product of whole-sequence hidden states (`dot_rows`). ρ is computed in vocabulary chunks: the largest
intermediate is O((|ȳ| + |v|) · chunk) (plus the [|ȳ|, |v|] outputs), never |ȳ| × |v| × V.

This module sits below both `dynamics.delta` (Δr) and `dynamics.rho` (the ρ analysis and its result type); it
imports neither.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from dynamics.batches import PairBatch
from dynamics.errors import DataError

__all__ = [
    "DEFAULT_VOCAB_CHUNK",
    "RhoTerms",
    "dot_rows",
    "im_kernel_matrix",
    "im_kernel_pair",
    "im_prediction_arrays",
    "im_prediction_arrays_jit",
    "prediction_positions",
    "rho_from_distributions",
    "rho_terms",
    "rho_terms_jit",
]

#: Default vocabulary chunk of the streaming ρ computation (tokens per chunk).
DEFAULT_VOCAB_CHUNK = 8192


@dataclasses.dataclass(frozen=True)
class RhoTerms:
    """The four terms of ρ_{k,l} as [K, L] arrays (k: unseen positions, l: training positions; docs/math.md §3.2).

    Attributes:
      indicator: 1[ȳ_k = v_l].
      cross_train: q_l(ȳ_k) = π(ȳ_k | x, v<l), the training context's probability of the unseen token.
      cross_unseen: p_k(v_l) = π(v_l | x̄, ȳ<k), the unseen context's probability of the training token.
      inner: ⟨p_k, q_l⟩, the overlap of the two next-token distributions.
    """

    indicator: Array
    cross_train: Array
    cross_unseen: Array
    inner: Array

    @property
    def rho(self) -> Array:
        """ρ = indicator − cross_train − cross_unseen + inner."""
        return self.indicator - self.cross_train - self.cross_unseen + self.inner


jax.tree_util.register_dataclass(
    RhoTerms, data_fields=["indicator", "cross_train", "cross_unseen", "inner"], meta_fields=[]
)


def _softcap(z: Array, cap: float | None) -> Array:
    return z if cap is None else jnp.tanh(z / cap) * cap


def _chunk_logits(h: Array, W: Array, start: Array, chunk: int, cap: float | None) -> Array:
    Wc = jax.lax.dynamic_slice_in_dim(W, start, chunk, axis=0)
    return _softcap(jnp.einsum("KD,CD->KC", h, Wc.astype(h.dtype)), cap)


def _vocab_chunks(V: int, chunk: int) -> tuple[int, int]:
    """(chunk size clamped to V, number of chunks) of a scan over the vocabulary."""
    chunk = min(chunk, V)
    return chunk, -(-V // chunk)


def _chunk_start_and_valid(i: Array, V: int, chunk: int) -> tuple[Array, Bool[Array, " C"]]:
    """The last chunk is shifted back to end at V (no padded copy of W); its overlap with the previous one is
    masked out."""
    start = jnp.minimum(i * chunk, V - chunk)
    valid = start + jnp.arange(chunk) >= i * chunk
    return start, valid


def rho_terms(
    h_unseen: Float[Array, "K D"],
    tokens_unseen: Int[Array, " K"],
    h_train: Float[Array, "L D"],
    tokens_train: Int[Array, " L"],
    W: Float[Array, "V D"],
    *,
    chunk: int = DEFAULT_VOCAB_CHUNK,
    softcap: float | None = None,
) -> RhoTerms:
    """The four terms of ρ_{k,l} for the contexts h (hidden states that predict each token) and the tokens.

    ρ_{k,l} = 1[ȳ_k = v_l] − q_l(ȳ_k) − p_k(v_l) + ⟨p_k, q_l⟩ (arXiv 2507.07981 Eq. (5); docs/math.md §3.2).

    One streaming pass over vocabulary chunks computes both log-partitions and ⟨p_k, q_l⟩ together, with running
    maxima (the online-softmax rescaling): S_{kl} = Σ_v exp(z_{kv} − m_k) exp(z'_{lv} − m'_l) is rescaled whenever
    m or m' grows, and ⟨p_k, q_l⟩ = S_{kl} / (s_k s'_l) at the end. The cross terms are gathers at the tokens.

    Args:
      h_unseen: h_{x̄,ȳ<k}, the hidden state that predicts ȳ_k, for k = 1..K.
      tokens_unseen: ȳ_k.
      h_train: h_{x,v<l} for l = 1..L.
      tokens_train: v_l.
      W: the unembedding [V, D]; p = softmax(W h) (soft-capped logits if `softcap`).
      chunk: vocabulary chunk size.
      softcap: Gemma 2's final logit cap, or None.

    Returns:
      `RhoTerms` of [K, L] arrays, in float32 (float64 if the inputs are).
    """
    acc = jnp.promote_types(h_unseen.dtype, jnp.float32)
    h_u, h_v = h_unseen.astype(acc), h_train.astype(acc)
    K, L = h_u.shape[0], h_v.shape[0]
    V = W.shape[0]
    chunk, n = _vocab_chunks(V, chunk)

    def body(carry, i):
        m_u, s_u, m_v, s_v, S = carry
        start, valid = _chunk_start_and_valid(i, V, chunk)
        z_u = jnp.where(valid[None, :], _chunk_logits(h_u, W, start, chunk, softcap).astype(acc), -jnp.inf)
        z_v = jnp.where(valid[None, :], _chunk_logits(h_v, W, start, chunk, softcap).astype(acc), -jnp.inf)
        mu, mv = jnp.maximum(m_u, z_u.max(-1)), jnp.maximum(m_v, z_v.max(-1))
        cu, cv = jnp.exp(m_u - mu), jnp.exp(m_v - mv)
        e_u, e_v = jnp.exp(z_u - mu[:, None]), jnp.exp(z_v - mv[:, None])
        S = S * cu[:, None] * cv[None, :] + jnp.einsum("KC,LC->KL", e_u, e_v)
        return (mu, s_u * cu + e_u.sum(-1), mv, s_v * cv + e_v.sum(-1), S), None

    init = (
        jnp.full((K,), -jnp.inf, acc),
        jnp.zeros((K,), acc),
        jnp.full((L,), -jnp.inf, acc),
        jnp.zeros((L,), acc),
        jnp.zeros((K, L), acc),
    )
    (m_u, s_u, m_v, s_v, S), _ = jax.lax.scan(body, init, jnp.arange(n))
    lse_u, lse_v = m_u + jnp.log(s_u), m_v + jnp.log(s_v)
    inner = S / (s_u[:, None] * s_v[None, :])
    Wa, Wb = W[tokens_unseen].astype(acc), W[tokens_train].astype(acc)
    # q_l(ȳ_k): training context l, unseen token k  → [K, L]
    cross_train = jnp.exp(_softcap(jnp.einsum("KD,LD->KL", Wa, h_v), softcap) - lse_v[None, :])
    # p_k(v_l): unseen context k, training token l → [K, L]
    cross_unseen = jnp.exp(_softcap(jnp.einsum("KD,LD->KL", h_u, Wb), softcap) - lse_u[:, None])
    indicator = (tokens_unseen[:, None] == tokens_train[None, :]).astype(acc)
    return RhoTerms(indicator, cross_train, cross_unseen, inner)


def im_kernel_pair(
    h_u: Float[Array, "K D"],
    tok_u: Int[Array, " K"],
    m_u: Int[Array, " K"],
    h_v: Float[Array, "L D"],
    tok_v: Int[Array, " L"],
    m_v: Int[Array, " L"],
    W: Float[Array, "V D"],
    softcap: float | None,
    chunk: int,
) -> Float[Array, ""]:
    """Σ_k Σ_l m_k m_l ⟨h_k, h'_l⟩ ρ_{k,l} for one unseen and one training sequence (Eq. (5) sum, without β²).

    Args:
      h_u, tok_u, m_u: the unseen sequence's contexts, predicted tokens and response mask
        (`im_prediction_arrays`).
      h_v, tok_v, m_v: the same for the training sequence.
      W: the unembedding [V, D].
      softcap: Gemma 2's final logit cap, or None.
      chunk: vocabulary chunk of `rho_terms`.

    Returns:
      The masked double sum (docs/math.md §3.2), a scalar; K_IM(u, v) = β² times it.
    """
    terms = rho_terms(h_u, tok_u, h_v, tok_v, W, chunk=chunk, softcap=softcap)
    sim = jnp.einsum("KD,LD->KL", h_u.astype(terms.inner.dtype), h_v.astype(terms.inner.dtype))
    w = m_u[:, None].astype(sim.dtype) * m_v[None, :].astype(sim.dtype)
    return jnp.sum(sim * terms.rho * w)


def im_prediction_arrays(lm, lm_params, batch: PairBatch) -> tuple[Array, Array, Array]:
    """(contexts h[:, :-1], predicted tokens [:, 1:], response mask [:, 1:]) of each sequence of `batch`.

    The token at position t is predicted by the hidden state at t − 1 (docs/math.md §1).
    """
    hidden = lm.forward(lm_params, jnp.asarray(batch.tokens), jnp.asarray(batch.attention_mask))
    return hidden[:, :-1], jnp.asarray(batch.tokens)[:, 1:], jnp.asarray(batch.response_mask)[:, 1:]


#: `im_prediction_arrays` jitted (the LM static).
im_prediction_arrays_jit = jax.jit(im_prediction_arrays, static_argnums=0)

#: `im_kernel_pair` vmapped over unseen sequences (rows) and training sequences (columns), jitted: the [N, M]
#: matrix of Eq. (5) double sums (docs/math.md §3.2); `softcap` and `chunk` static.
im_kernel_matrix = jax.jit(
    jax.vmap(  # over unseen pairs
        jax.vmap(im_kernel_pair, in_axes=(None, None, None, 0, 0, 0, None, None, None)),  # over training seqs
        in_axes=(0, 0, 0, None, None, None, None, None, None),
    ),
    static_argnums=(7, 8),
)


@jax.jit
def dot_rows(a: Float[Array, "N D"], b: Float[Array, "M D"]) -> Float[Array, "N M"]:
    """⟨a_n, b_m⟩ for every pair of rows: the EX-RM head kernel K_EX = ⟨h_u, h_v⟩ (Eq. (4); docs/math.md §3.1)."""
    return jnp.einsum("ND,MD->NM", a, b)


#: `rho_terms` jitted (`chunk` and `softcap` static).
rho_terms_jit = jax.jit(rho_terms, static_argnames=("chunk", "softcap"))


def prediction_positions(tokens: Int[Array, " T"], response_mask: Int[Array, " T"]) -> tuple[Array, Array]:
    """(index of the context that predicts each response token, the token): for token t, context t − 1.

    The hidden state at position t − 1 gives the distribution of the token at t (docs/math.md §1).

    Raises:
      DataError: an empty response mask, or a response that starts at position 0.
    """
    idx = np.flatnonzero(np.asarray(response_mask))
    if idx.size == 0:
        raise DataError("a response has no tokens (empty response mask)")
    if idx[0] == 0:
        raise DataError("a response starts at position 0: there is no context to predict its first token")
    return idx - 1, np.asarray(tokens)[idx]


def rho_from_distributions(
    a: Int[Array, " K"], p: Float[Array, "K V"], b: Int[Array, " L"], q: Float[Array, "L V"]
) -> Float[Array, "K L"]:
    """Reference ρ_{k,l} = ⟨e_{a_k} − p_k, e_{b_l} − q_l⟩ from full vocabulary vectors (for tests, small V).

    The definition of docs/math.md §3.2 (arXiv 2507.07981 Eq. (5)), without streaming: [K, V] and [L, V] inputs.
    """
    V = p.shape[-1]
    eu = jax.nn.one_hot(a, V, dtype=p.dtype) - p
    ev = jax.nn.one_hot(b, V, dtype=q.dtype) - q
    return eu @ ev.T

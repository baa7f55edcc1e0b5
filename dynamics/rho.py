"""The token-level coefficients ρ_{k,l} of the IM-RM's one-step dynamics (docs/math.md §3.2, Eq. (5)).

For an unseen pair (x̄, ȳ) and a training response v ∈ {y+, y−} of prompt x, with p = π(·|x̄, ȳ<k) and
q = π(·|x, v<l) the two next-token distributions:

    ρ_{k,l}(v) = ⟨e_{ȳ_k} − p, e_{v_l} − q⟩ = 1[ȳ_k = v_l] − q(ȳ_k) − p(v_l) + ⟨p, q⟩ ∈ [−2, 2].

The middle terms are cross probabilities: the training context's probability of the unseen token, and the unseen
context's probability of the training token. Under Assumption 1 (only the unembedding W trains, untied)

    ⟨∇_W r_IM(x̄,ȳ), ∇_W r_IM(x,v)⟩ = β² Σ_k Σ_l ⟨h_{x̄,ȳ<k}, h_{x,v<l}⟩ · ρ_{k,l}(v),

the kernel term of Eq. (5). Everything here is computed in vocabulary chunks: the largest intermediate is
O((|ȳ| + |v|) · chunk) (plus the [|ȳ|, |v|] outputs), never |ȳ| × |v| × V.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from dynamics.errors import ConfigError, DataError

DEFAULT_VOCAB_CHUNK = 8192


@dataclasses.dataclass(frozen=True)
class RhoTerms:
    """The four terms of ρ_{k,l} as [K, L] arrays (k: unseen positions, l: training positions).

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


def _chunks(V: int, chunk: int) -> tuple[int, int]:
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
    chunk, n = _chunks(V, chunk)

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


def prediction_positions(tokens: Int[Array, " T"], response_mask: Int[Array, " T"]) -> tuple[Array, Array]:
    """(index of the context that predicts each token, the token): for response token t, context t − 1."""
    idx = np.flatnonzero(np.asarray(response_mask))
    if idx.size == 0:
        raise DataError("a response has no tokens (empty response mask)")
    if idx[0] == 0:
        raise DataError("a response starts at position 0: there is no context to predict its first token")
    return idx - 1, np.asarray(tokens)[idx]


def closing_token_count(tokenizer) -> int:
    """How many tokens the chat template appends after every response's content (e.g. `<|im_end|>` + newline).

    Found as the common suffix of the response tokens of two different one-word answers.
    """
    from dynamics.text import split_prompt_response

    seqs = []
    for content in ("Alpha", "Bravo"):
        _, response_text = split_prompt_response(tokenizer, "Question?", content)
        seqs.append(tokenizer.encode(response_text, add_special_tokens=False))
    n = 0
    while n < min(map(len, seqs)) - 1 and seqs[0][-1 - n] == seqs[1][-1 - n]:
        n += 1
    return n


@dataclasses.dataclass(frozen=True)
class RhoPanel:
    """ρ and its factors for one unseen pair against one training response v.

    Attributes:
      train_tokens: the token strings of v (the l axis).
      terms: the four terms of ρ, [K, L] numpy arrays.
      hidden_similarity: ⟨h_{x̄,ȳ<k}, h_{x,v<l}⟩, [K, L].
      kernel_sum: Σ_k Σ_l ⟨h, h'⟩ ρ_{k,l} over the positions kept (the Eq. (5) double sum, without β²).
    """

    train_tokens: list[str]
    terms: dict[str, np.ndarray]
    hidden_similarity: np.ndarray

    @property
    def rho(self) -> np.ndarray:
        t = self.terms
        return t["indicator"] - t["cross_train"] - t["cross_unseen"] + t["inner"]

    @property
    def product(self) -> np.ndarray:
        return self.hidden_similarity * self.rho

    @property
    def kernel_sum(self) -> float:
        return float(self.product.sum())


@dataclasses.dataclass(frozen=True)
class RhoResult:
    """ρ analysis of one unseen pair against a training triple (docs/math.md §3.2).

    Attributes:
      unseen_tokens: the token strings of ȳ (the k axis).
      chosen: the panel for v = y+.
      rejected: the panel for v = y−.
      beta: β of the IM-RM.
      bt_weight: σ(r(x,y−) − r(x,y+)) of the training triple.
      lr: learning rate η.
      closing_tokens_excluded: whether the chat template's closing tokens were left out of both axes.
      meta: model, prompts, responses and options.
    """

    unseen_tokens: list[str]
    chosen: RhoPanel
    rejected: RhoPanel
    beta: float
    bt_weight: float
    lr: float
    closing_tokens_excluded: bool
    meta: dict[str, Any]

    @property
    def kernel_chosen(self) -> float:
        """K(u, y+) = β² Σ_kl ⟨h, h'⟩ ρ_{k,l}(y+)."""
        return self.beta**2 * self.chosen.kernel_sum

    @property
    def kernel_rejected(self) -> float:
        return self.beta**2 * self.rejected.kernel_sum

    @property
    def delta_reward(self) -> float:
        """Eq. (5): η · β² · σ(r− − r+) · [Σ⟨h,h'⟩ρ(y+) − Σ⟨h,h'⟩ρ(y−)] (first order, Assumption 1)."""
        return self.lr * self.bt_weight * (self.kernel_chosen - self.kernel_rejected)

    def to_dict(self) -> dict[str, Any]:
        def panel(p: RhoPanel) -> dict[str, Any]:
            return {
                "tokens": p.train_tokens,
                "rho": p.rho.tolist(),
                "terms": {k: v.tolist() for k, v in p.terms.items()},
                "hidden_similarity": p.hidden_similarity.tolist(),
                "product": p.product.tolist(),
                "kernel_sum": p.kernel_sum,
            }

        return {
            "unseen_tokens": self.unseen_tokens,
            "chosen": panel(self.chosen),
            "rejected": panel(self.rejected),
            "beta": self.beta,
            "bt_weight": self.bt_weight,
            "lr": self.lr,
            "kernel_chosen": self.kernel_chosen,
            "kernel_rejected": self.kernel_rejected,
            "delta_reward_closed_form": self.delta_reward,
            "closing_tokens_excluded": self.closing_tokens_excluded,
            "meta": self.meta,
        }

    def to_json(self, path: str) -> str:
        """Write `to_dict()` atomically; returns the path."""
        from dynamics.outputs import jsonable, write_json_atomic

        return str(write_json_atomic(path, jsonable(self.to_dict())))


def rho_analysis(
    rm,
    params,
    *,
    prompt: str,
    chosen: str,
    rejected: str,
    unseen_prompt: str,
    unseen_response: str,
    tokenizer,
    lr: float = 1.0,
    exclude_closing: bool = False,
    chunk: int = DEFAULT_VOCAB_CHUNK,
) -> RhoResult:
    """ρ matrices, their four terms and the hidden similarities for one unseen pair and one training triple.

    The IM-RM's unembedding is the one its reward reads (an untied copy of a tied model computes the same
    ρ: only the kernel's validity as a Δr needs the untying, see `dynamics.masks.prepare`).

    Args:
      rm: an `ImplicitRM`.
      params: its parameters ({"lm", "ref"}).
      prompt, chosen, rejected: the training triple (x, y+, y−).
      unseen_prompt, unseen_response: the unseen pair (x̄, ȳ).
      tokenizer: the model's tokenizer.
      lr: η, for the closed-form Δr.
      exclude_closing: leave the chat template's closing tokens (shared by every response, so always
        "matching tokens" with ρ ≥ 0) out of both axes (docs/math.md §9: they dominate the sums).
      chunk: vocabulary chunk size.
    """
    from dynamics.models import unembedding
    from dynamics.rewards import ImplicitRM, bt_weight
    from dynamics.text import encode_pairs

    if not isinstance(rm, ImplicitRM):
        raise ConfigError("ρ is defined for the IM-RM (its reward reads the unembedding)")
    if not lr > 0:
        raise ConfigError(f"learning rate must be > 0, got {lr}")
    max_len = rm.lm.config.max_position
    batch = encode_pairs(
        tokenizer,
        [prompt, prompt, unseen_prompt],
        [chosen, rejected, unseen_response],
        max_length=max_len,
    )
    batch = batch.replace(truncated=(), boundary_mismatch=())
    tokens, mask = jnp.asarray(batch.tokens), jnp.asarray(batch.attention_mask)
    from dynamics.delta import reward_jit

    hidden = np.asarray(_forward_jit(rm.lm, params["lm"], tokens, mask))
    rewards = np.asarray(reward_jit(rm, params, batch))
    g = float(bt_weight(rewards[0], rewards[1]))
    n_close = closing_token_count(tokenizer) if exclude_closing else 0

    def positions(row: int) -> tuple[np.ndarray, np.ndarray]:
        ctx, toks = prediction_positions(np.asarray(batch.tokens)[row], np.asarray(batch.response_mask)[row])
        if n_close:
            if len(ctx) <= n_close:
                raise DataError(f"response {row} has no content tokens besides the template's closing tokens")
            ctx, toks = ctx[:-n_close], toks[:-n_close]
        return ctx, toks

    W = unembedding(params["lm"])
    cap = rm.lm.config.final_logit_softcap
    u_ctx, u_tok = positions(2)
    fn = _rho_terms_jit
    panels = []
    for row in (0, 1):
        v_ctx, v_tok = positions(row)
        h_u, h_v = jnp.asarray(hidden[2, u_ctx]), jnp.asarray(hidden[row, v_ctx])
        terms = fn(h_u, jnp.asarray(u_tok), h_v, jnp.asarray(v_tok), W, chunk=chunk, softcap=cap)
        sim = np.asarray(h_u, np.float64) @ np.asarray(h_v, np.float64).T
        panels.append(
            RhoPanel(
                train_tokens=tokenizer.token_strings([int(t) for t in v_tok]),
                terms={k: np.asarray(getattr(terms, k), np.float64) for k in _TERM_NAMES},
                hidden_similarity=sim,
            )
        )
    meta = {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "unseen_prompt": unseen_prompt,
        "unseen_response": unseen_response,
        "rewards": {"chosen": float(rewards[0]), "rejected": float(rewards[1]), "unseen": float(rewards[2])},
        "closing_token_count": closing_token_count(tokenizer),
        "vocab_chunk": chunk,
    }
    return RhoResult(
        unseen_tokens=tokenizer.token_strings([int(t) for t in u_tok]),
        chosen=panels[0],
        rejected=panels[1],
        beta=float(rm.beta),
        bt_weight=g,
        lr=float(lr),
        closing_tokens_excluded=bool(exclude_closing),
        meta=meta,
    )


_TERM_NAMES = ("indicator", "cross_train", "cross_unseen", "inner")
_rho_terms_jit = jax.jit(rho_terms, static_argnames=("chunk", "softcap"))
_forward_jit = jax.jit(lambda lm, p, t, m: lm.forward(p, t, m), static_argnums=0)


def rho_from_distributions(
    a: Int[Array, " K"], p: Float[Array, "K V"], b: Int[Array, " L"], q: Float[Array, "L V"]
) -> Float[Array, "K L"]:
    """Reference ρ_{k,l} = ⟨e_{a_k} − p_k, e_{b_l} − q_l⟩ from full vocabulary vectors (for tests, small V)."""
    V = p.shape[-1]
    eu = jax.nn.one_hot(a, V, dtype=p.dtype) - p
    ev = jax.nn.one_hot(b, V, dtype=q.dtype) - q
    return eu @ ev.T


def load_rho_json(path: str) -> dict[str, Any]:
    """Read a `RhoResult.to_json` file (for figures)."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)

"""The decoder LM: `forward(params, tokens, attention_mask) -> hidden [B, T, D]` and `unembed(params, hidden)`.

`hidden` is the final hidden state after the last norm: the vector h_{x,y<k} of docs/math.md §1 that the LM head
reads (position t holds the state after reading tokens 0..t). `unembed` gives the logits W h (with Gemma 2's final
soft-cap, or any family's when its config sets one), so softmax(unembed(h_t)) is the next-token distribution for
position t + 1.

Parameters are a plain nested dict (the Flax `params` collection):

    embed/embedding [V, D]
    layers_{i}/attn_norm, attn/{q,k,v,o}, mlp_norm, mlp/{gate,up,down}, (post_attn_norm, post_mlp_norm),
               (attn/q_norm, attn/k_norm)   (no attn_norm, mlp_norm in OLMo 2)
    final_norm
    lm_head/w [V, D]          (absent when the embeddings are tied)

Positions come from the attention mask (position of a token = number of real tokens before it), so a sequence's
hidden states do not depend on how much padding surrounds it, or on which side.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jaxtyping import Array, Bool, Float, Int

from dynamics.errors import ModelError
from dynamics.models.config import DecoderConfig
from dynamics.models.layers import Block, Norm, rope_angles

__all__ = [
    "LM",
    "Decoder",
    "Params",
    "attention_masks",
    "cast_params",
    "positions_from_mask",
    "resize_vocab",
    "unembedding",
    "untie",
]

Params = dict[str, Any]


def positions_from_mask(attention_mask: Int[Array, "B T"]) -> Int[Array, "B T"]:
    """Position ids: number of real tokens before each position (0 for the first real token), clipped at 0."""
    m = attention_mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(m, axis=-1) - 1, 0)


def attention_masks(config: DecoderConfig, attention_mask: Int[Array, "B T"]) -> dict[str, Bool[Array, "B T S"]]:
    """Boolean masks [B, T, S] (query t may read key s) for "full" and, if used, "sliding" layers.

    Causal over array indices, keys restricted to real tokens; sliding layers also need t − s < window (without
    a window they read what full layers read). A padded query may read nothing; its softmax is then uniform and
    its output unused.
    """
    T = attention_mask.shape[-1]
    t = jnp.arange(T)[:, None]
    s = jnp.arange(T)[None, :]
    causal = s <= t
    key_ok = attention_mask.astype(bool)[:, None, :]
    masks = {"full": causal[None] & key_ok}
    if "sliding" in config.layer_types:
        window = config.sliding_window
        masks["sliding"] = masks["full"] if window is None else (causal & (t - s < window))[None] & key_ok
    return masks


class Decoder(nn.Module):
    """Embedding, L blocks, final norm (docs/math.md §1: `hidden_states[-1]`).

    `start` and `stop` run a slice of the stack: blocks start … stop − 1. `residual` (the residual stream after
    block start − 1, or the scaled embeddings for start = 0) replaces embedding the token ids; `final_norm=False`
    returns the residual stream itself. Training uses this to run frozen lower blocks once and cache them.
    """

    config: DecoderConfig
    start: int = 0
    stop: int | None = None
    final_norm: bool = True

    @nn.compact
    def __call__(
        self,
        tokens: Int[Array, "B T"],
        attention_mask: Int[Array, "B T"],
        positions: Int[Array, "B T"] | None = None,
        attn_mask: Bool[Array, "B T S"] | None = None,
        residual: Float[Array, "B T D"] | None = None,
    ) -> Float[Array, "B T D"]:
        c = self.config
        stop = c.n_layers if self.stop is None else self.stop
        if residual is None:
            table = nn.Embed(c.vocab_size, c.d_model, embedding_init=nn.initializers.normal(0.02), name="embed")
            x = table.embedding[tokens]
            if c.embed_scale:
                x = x * jnp.asarray(c.d_model**0.5, dtype=x.dtype)
        else:
            x = residual
        if positions is None:
            positions = positions_from_mask(attention_mask)
        angles = {"full": rope_angles(c, positions, x.dtype)}
        angles["sliding"] = angles["full"]
        if c.rope_local_theta is not None and "sliding" in c.layer_types:  # Gemma 3's local RoPE base
            angles["sliding"] = rope_angles(c, positions, x.dtype, local=True)
        if attn_mask is None:
            masks = attention_masks(c, attention_mask)
        else:  # an explicit mask (e.g. several candidate continuations of one prompt); windows by position
            masks = {"full": attn_mask, "sliding": attn_mask}
            if c.sliding_window is not None:
                near = positions[:, :, None] - positions[:, None, :] < c.sliding_window
                masks["sliding"] = attn_mask & near
        for i in range(self.start, stop):
            kind = c.layer_types[i]
            x = Block(c, sliding=kind == "sliding", name=f"layers_{i}")(x, *angles[kind], masks[kind])
        return Norm(c, name="final_norm")(x) if self.final_norm else x


def unembedding(params: Params) -> Float[Array, "V D"]:
    """The LM head matrix W [V, D] (docs/math.md §1): `lm_head/w`, or the input embedding when tied."""
    if "lm_head" in params:
        return params["lm_head"]["w"]
    return params["embed"]["embedding"]


@dataclasses.dataclass(frozen=True)
class LM:
    """A decoder LM as pure functions of a parameter pytree. Hashable, so it can be a static jit argument."""

    config: DecoderConfig

    @property
    def module(self) -> Decoder:
        return Decoder(self.config)

    def forward(
        self,
        params: Params,
        tokens: Int[Array, "B T"],
        attention_mask: Int[Array, "B T"],
        positions: Int[Array, "B T"] | None = None,
        attn_mask: Bool[Array, "B T S"] | None = None,
    ) -> Float[Array, "B T D"]:
        """Final hidden states h after the last norm, one per position.

        By default positions come from `attention_mask` and attention is causal over real tokens. `positions`
        and `attn_mask` (query t may read key s) override both, e.g. to score several one-token continuations
        of one prompt in a single pass, each at the same position and reading only the prompt and itself.
        """
        return self.module.apply({"params": params}, tokens, attention_mask, positions, attn_mask)

    def lower(
        self,
        params: Params,
        tokens: Int[Array, "B T"],
        attention_mask: Int[Array, "B T"],
        stop: int,
        positions: Int[Array, "B T"] | None = None,
        attn_mask: Bool[Array, "B T S"] | None = None,
    ) -> Float[Array, "B T D"]:
        """The residual stream after the input embedding and blocks 0 … stop − 1 (`positions` and `attn_mask`
        override the defaults as in `forward`)."""
        return Decoder(self.config, stop=stop, final_norm=False).apply(
            {"params": params}, tokens, attention_mask, positions, attn_mask
        )

    def upper(
        self,
        params: Params,
        residual: Float[Array, "B T D"],
        attention_mask: Int[Array, "B T"],
        start: int,
        positions: Int[Array, "B T"] | None = None,
        attn_mask: Bool[Array, "B T S"] | None = None,
    ) -> Float[Array, "B T D"]:
        """Final hidden states from the residual stream after block start − 1: upper(lower(·, k), k) = forward.

        `positions` and `attn_mask` override the defaults as in `forward`.
        """
        return Decoder(self.config, start=start).apply(
            {"params": params}, None, attention_mask, positions, attn_mask, residual=residual
        )

    def unembed(self, params: Params, hidden: Float[Array, "... D"]) -> Float[Array, "... V"]:
        """Logits W h [..., V] (soft-capped when the config sets `final_logit_softcap`, as Gemma 2's does): softmax
        over V is the next-token distribution."""
        W = unembedding(params).astype(hidden.dtype)
        # one 2-D matmul [M, D] @ [D, V]: the backward of a multi-axis einsum would transpose [..., V] (on CPU a
        # copy of the largest array of the step)
        lead = hidden.shape[:-1]
        logits = jnp.reshape(jnp.reshape(hidden, (-1, hidden.shape[-1])) @ W.T, (*lead, W.shape[0]))
        cap = self.config.final_logit_softcap
        if cap is not None:
            logits = jnp.tanh(logits / cap) * cap
        return logits

    def logits(self, params: Params, tokens: Int[Array, "B T"], attention_mask: Int[Array, "B T"]) -> Array:
        """unembed(forward(...)), [B, T, V]."""
        return self.unembed(params, self.forward(params, tokens, attention_mask))

    def init(self, key: Array, dtype=jnp.float32) -> Params:
        """Random parameters (normal(0.02) matrices, unit norms), for tests and tiny models."""
        tokens = jnp.zeros((1, 2), jnp.int32)
        params = self.module.init(key, tokens, jnp.ones((1, 2), jnp.int32))["params"]
        params = jax.tree.map(lambda a: a.astype(dtype), params)
        if not self.config.tie_embeddings:
            k = jax.random.fold_in(key, 7)
            V, D = self.config.vocab_size, self.config.d_model
            params = {**params, "lm_head": {"w": (0.02 * jax.random.normal(k, (V, D))).astype(dtype)}}
        return params


def untie(lm: LM, params: Params) -> tuple[LM, Params]:
    """An untied copy: `lm_head/w` becomes a separate copy of the input embedding.

    With tied weights, training "only the unembedding" also moves the input embeddings and so every hidden state;
    docs/math.md §3.2's closed form (Assumption 1) holds only for an untied head (docs/math.md §9). At the time of
    untying the two models compute the same function.
    """
    if not lm.config.tie_embeddings:
        return lm, params
    new = dict(params)
    new["lm_head"] = {"w": params["embed"]["embedding"]}
    return LM(lm.config.replace(tie_embeddings=False)), new


def resize_vocab(lm: LM, params: Params, new_size: int, key: Array | None = None) -> tuple[LM, Params]:
    """Grow the vocabulary to `new_size` rows (new tokens of a default chat template, docs/math.md §6).

    New rows are the mean of the existing rows (as transformers' `resize_token_embeddings` does by default), plus
    a small normal perturbation if a key is given.
    """
    V = lm.config.vocab_size
    if new_size < V:
        raise ModelError(f"cannot shrink the vocabulary from {V} to {new_size}")
    if new_size == V:
        return lm, params

    def grow(W):
        extra = jnp.broadcast_to(W.mean(0), (new_size - V, W.shape[1]))
        if key is not None:
            extra = extra + 0.02 * jax.random.normal(key, extra.shape, dtype=W.dtype)
        return jnp.concatenate([W, extra.astype(W.dtype)], axis=0)

    new = dict(params)
    new["embed"] = {"embedding": grow(params["embed"]["embedding"])}
    if "lm_head" in params:
        new["lm_head"] = {"w": grow(params["lm_head"]["w"])}
    return LM(lm.config.replace(vocab_size=new_size)), new


def cast_params(params: Params, dtype) -> Params:
    """Every floating leaf cast to `dtype` (float32 default; float64 for exactness tests; bfloat16 for 8B)."""
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, params)

"""Reward models: EX-RM (linear head on a hidden state), IM-RM (β ln π/π_ref, the DPO reward), EX-GRM.

A reward model is a frozen dataclass with `reward(params, batch) -> [B]` (docs/math.md §1). Its parameters are a
pytree with named groups, so that the trainable-parameter masks of `dynamics.masks` can select them:

    EX-RM   {"lm": LM params, "head": {"u": [D]}}
    IM-RM   {"lm": LM params, "ref": LM params of π_ref (frozen; absent for the reference-free variant)}
    EX-GRM  {"lm": LM params}

Conventions follow the official code (docs/math.md §1, §6): the EX-RM reads the last non-pad token (or the mean
over response positions, §6.4); the IM-RM sums log-probabilities over the response tokens, including the chat
template's closing tokens, with no length normalisation, and β = 0.01 by default.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from dynamics.defaults import DEFAULT_BETA, HEAD_INIT_STD
from dynamics.errors import ConfigError
from dynamics.models import LM, Params
from dynamics.reward_types import reward_type
from dynamics.text import ExgrmBatch, PairBatch, last_token_index

__all__ = [
    "ExplicitRM",
    "GenerativeRM",
    "ImplicitRM",
    "RewardModel",
    "answer_logprobs_from_hidden",
    "bt_loss",
    "bt_losses",
    "bt_weight",
    "exgrm_losses",
    "gathered_response_logprob",
    "gathered_token_logprobs",
    "head_reward",
    "last_state",
    "make_reward_model",
    "pooled_features",
    "response_lengths",
    "response_logprob",
    "target_logprobs",
    "token_logprobs",
    "token_logprobs_from_hidden",
]


def _arrays(batch) -> tuple[Array, Array]:
    return jnp.asarray(batch.tokens), jnp.asarray(batch.attention_mask)


# ----------------------------------------------------------------------------------------------------------
# The reward math from hidden states (defined once: the reward-model classes and the training engine call these)
# ----------------------------------------------------------------------------------------------------------


def target_logprobs(lm: LM, lm_params: Params, hidden: Float[Array, "*N D"], targets: Int[Array, "*N"]) -> Array:
    """ln softmax(W h)[target] for each hidden state h and its target token, in float32 or wider (nats, ≤ 0).

    docs/math.md §1: π(y_k | x, y<k) = softmax(W h_{x,y<k})[y_k]. Any leading shape: [B, T−1, D] with [B, T−1]
    (every position) or [N, D] with [N] (gathered positions).
    """
    logits = lm.unembed(lm_params, hidden)
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    target = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return target - jax.nn.logsumexp(logits, axis=-1)


def token_logprobs_from_hidden(
    lm: LM, lm_params: Params, hidden: Float[Array, "B T D"], tokens: Int[Array, "B T"]
) -> Float[Array, "B T"]:
    """ln π(tokens[t] | tokens[<t]) at every position t ≥ 1 from the hidden states (position 0 gets 0).

    Position t's probability comes from the hidden state at t − 1 (docs/math.md §1).
    """
    lp = target_logprobs(lm, lm_params, hidden[:, :-1], tokens[:, 1:])  # h at t − 1 predicts tokens[:, t]
    return jnp.concatenate([jnp.zeros_like(lp[:, :1]), lp], axis=1)


def gathered_response_logprob(
    lm: LM,
    lm_params: Params,
    hidden: Float[Array, "B T D"],
    source: Int[Array, "B R"],
    target: Int[Array, "B R"],
    valid: Float[Array, "B R"],
) -> Float[Array, " B"]:
    """ln π(y|x) = Σ_k ln π(y_k | x, y<k) read only at the positions that predict response tokens (docs/math.md §1).

    Args:
      lm: the language model.
      lm_params: its parameters.
      hidden: final hidden states.
      source: for each response token y_k at position t, the position t − 1 whose hidden state predicts it.
      target: the tokens y_k.
      valid: 1 on real entries, 0 on padding.

    Returns:
      The summed log-probability of each row (nats; the same sum as `response_logprob`, |y| unembeddings per row
      instead of T).
    """
    return jnp.sum(gathered_token_logprobs(lm, lm_params, hidden, source, target, valid), axis=-1)


def gathered_token_logprobs(
    lm: LM,
    lm_params: Params,
    hidden: Float[Array, "B T D"],
    source: Int[Array, "B R"],
    target: Int[Array, "B R"],
    valid: Float[Array, "B R"],
) -> Float[Array, "B R"]:
    """valid · ln π(target | hidden at source) for each entry (nats; 0 on padding): the terms that
    `gathered_response_logprob` sums per row."""
    B, R = source.shape
    h = jnp.take_along_axis(hidden, source[..., None], axis=1)  # [B, R, D]
    flat = target_logprobs(lm, lm_params, jnp.reshape(h, (B * R, h.shape[-1])), jnp.reshape(target, (B * R,)))
    lp = jnp.reshape(flat, (B, R))  # [B·R, V] logits: 2-D throughout
    return lp * valid.astype(lp.dtype)


def last_state(hidden: Float[Array, "B T D"], attention_mask: Int[Array, "B T"]) -> Float[Array, "B D"]:
    """The hidden state at the last real token of each row (`dynamics.text.last_token_index`, either padding)."""
    return jnp.take_along_axis(hidden, last_token_index(attention_mask)[:, None, None], axis=1)[:, 0]


def pooled_features(
    hidden: Float[Array, "B T D"],
    attention_mask: Int[Array, "B T"],
    response_mask: Int[Array, "B T"] | None,
    pooling: str,
) -> Float[Array, "B D"]:
    """What the EX-RM head reads (docs/math.md §1, §6.4): h at the last token ("last"), or the mean of h over
    the response positions ("mean", which needs `response_mask`)."""
    if pooling == "last":
        return last_state(hidden, attention_mask)
    w = jnp.asarray(response_mask).astype(hidden.dtype)
    return jnp.einsum("BTD,BT->BD", hidden, w) / jnp.sum(w, axis=-1, keepdims=True)


def head_reward(features: Float[Array, "B D"], u: Float[Array, " D"]) -> Float[Array, " B"]:
    """r_EX = ⟨u, h⟩ for each row (docs/math.md §1; arbitrary units, only differences matter for BT)."""
    return jnp.einsum("BD,D->B", features, u.astype(features.dtype))


def answer_logprobs_from_hidden(
    lm: LM, lm_params: Params, hidden: Float[Array, "B T D"], attention_mask: Int[Array, "B T"], yes_id: int, no_id: int
) -> Float[Array, "B 2"]:
    """[ln π("Yes"), ln π("No")] at the last real position (docs/math.md §6.5), float32 or wider (nats)."""
    logits = lm.unembed(lm_params, last_state(hidden, attention_mask))
    lp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
    return jnp.stack([lp[:, yes_id], lp[:, no_id]], axis=-1)


def exgrm_losses(lp_chosen: Float[Array, "B 2"], lp_rejected: Float[Array, "B 2"]) -> Float[Array, " B"]:
    """EX-GRM cross-entropy per pair (docs/math.md §6.5): ℓ_i = −½ [ln π(Yes | x_i, y_i+) + ln π(No | x_i, y_i−)].

    The ½ makes the batch mean the official code's mean over the 2B concatenated sequences.

    Args:
      lp_chosen: `answer_logprobs_from_hidden` of the chosen rows.
      lp_rejected: the same for the rejected rows.
    """
    return -0.5 * (lp_chosen[:, 0] + lp_rejected[:, 1])


def bt_losses(r_chosen: Float[Array, " B"], r_rejected: Float[Array, " B"]) -> Float[Array, " B"]:
    """Per-pair Bradley-Terry loss ℓ_i = −ln σ(r_i+ − r_i−) (docs/math.md §1; `bt_loss` is their mean)."""
    return -jax.nn.log_sigmoid(r_chosen - r_rejected)


# ----------------------------------------------------------------------------------------------------------
# Reference computations from token ids
# ----------------------------------------------------------------------------------------------------------


def token_logprobs(
    lm: LM, params: Params, tokens: Int[Array, "B T"], attention_mask: Int[Array, "B T"]
) -> Float[Array, "B T"]:
    """ln π(tokens[t] | tokens[<t]) at every position t ≥ 1 (position 0 gets 0), accumulated in float32+.

    Position t's probability comes from the hidden state at t − 1 (docs/math.md §1: softmax(W h_{x,y<k})).
    """
    return token_logprobs_from_hidden(lm, params, lm.forward(params, tokens, attention_mask), tokens)


def response_logprob(lm: LM, params: Params, batch: PairBatch) -> Float[Array, " B"]:
    """ln π(y | x) = Σ over response tokens of ln π(y_k | x, y_<k) (docs/math.md §1, summed, not normalised)."""
    tokens, mask = _arrays(batch)
    lp = token_logprobs(lm, params, tokens, mask)
    return jnp.sum(lp * jnp.asarray(batch.response_mask).astype(lp.dtype), axis=-1)


def response_lengths(response_mask: Float[Array, "B T"]) -> Float[Array, " B"]:
    """|y| of every row: its number of response tokens (at least 1, so that an empty row divides by 1)."""
    return jnp.maximum(jnp.sum(response_mask.astype(jnp.float32), axis=-1), 1.0)


@dataclasses.dataclass(frozen=True)
class ExplicitRM:
    """EX-RM: r(x, y) = ⟨u, h_{x,y}⟩, a bias-free linear head on the final hidden state (docs/math.md §1).

    Attributes:
      lm: the language model.
      pooling: "last" reads h at the last non-pad token of (x, y) (the template's final token); "mean" averages
        ⟨u, h_{x,y≤k}⟩ over the response positions (docs/math.md §6.4's ablation).
    """

    lm: LM
    pooling: Literal["last", "mean"] = "last"
    kind: str = dataclasses.field(default="ex", init=False)

    def __post_init__(self):
        if self.pooling not in ("last", "mean"):
            raise ConfigError(f"EX-RM pooling must be 'last' or 'mean', got {self.pooling!r}")

    def init(self, lm_params: Params, seed: int = 0, std: float = HEAD_INIT_STD) -> Params:
        """Parameters {"lm", "head"}: the head u ~ N(0, std² I) from `seed` (std = 0 gives u = 0)."""
        D = self.lm.config.d_model
        dtype = lm_params["embed"]["embedding"].dtype
        u = std * jax.random.normal(jax.random.PRNGKey(seed), (D,), dtype=jnp.float32)
        return {"lm": lm_params, "head": {"u": u.astype(dtype)}}

    def features(self, params: Params, batch: PairBatch) -> Float[Array, "B D"]:
        """The vector the head reads: h at the last token, or the mean of h over response positions."""
        tokens, mask = _arrays(batch)
        hidden = self.lm.forward(params["lm"], tokens, mask)
        return pooled_features(hidden, mask, getattr(batch, "response_mask", None), self.pooling)

    def reward(self, params: Params, batch: PairBatch) -> Float[Array, " B"]:
        """r_EX(x, y) for every row (arbitrary units; only differences matter for BT)."""
        return head_reward(self.features(params, batch), params["head"]["u"])


@dataclasses.dataclass(frozen=True)
class ImplicitRM:
    """IM-RM: r(x, y) = β (ln π_θ(y|x) − ln π_ref(y|x)), the DPO reward (docs/math.md §1).

    Attributes:
      lm: the language model (π_θ and π_ref share its architecture).
      beta: β > 0 (the paper's `kl_coeff`, 0.01).
      reference_free: drop π_ref: r = β ln π_θ(y|x) (docs/math.md §6.4's ablation).
      length_normalised: divide by the number of response tokens |y|: r = (β/|y|)(ln π_θ − ln π_ref) (SimPO's
        reward with `reference_free`, docs/math.md §11).
    """

    lm: LM
    beta: float = DEFAULT_BETA
    reference_free: bool = False
    length_normalised: bool = False
    kind: str = dataclasses.field(default="im", init=False)

    def __post_init__(self):
        if not self.beta > 0:
            raise ConfigError(f"IM-RM β must be > 0, got {self.beta}")

    def init(self, lm_params: Params, ref_params: Params | None = None) -> Params:
        """Parameters {"lm", "ref"}: π_ref defaults to the initial model (the same arrays: no copy)."""
        if self.reference_free:
            return {"lm": lm_params}
        return {"lm": lm_params, "ref": lm_params if ref_params is None else ref_params}

    def policy_logprob(self, params: Params, batch: PairBatch) -> Float[Array, " B"]:
        """ln π_θ(y|x)."""
        return response_logprob(self.lm, params["lm"], batch)

    def reference_logprob(self, params: Params, batch: PairBatch) -> Float[Array, " B"]:
        """ln π_ref(y|x), with no gradient (π_ref is frozen); 0 for the reference-free variant."""
        if self.reference_free:
            return jnp.zeros(jnp.asarray(batch.tokens).shape[0])
        return jax.lax.stop_gradient(response_logprob(self.lm, params["ref"], batch))

    def reward(
        self, params: Params, batch: PairBatch, ref_logprob: Float[Array, " B"] | None = None
    ) -> Float[Array, " B"]:
        """r_IM(x, y) for every row. `ref_logprob` may be passed precomputed (it never changes)."""
        ref = self.reference_logprob(params, batch) if ref_logprob is None else ref_logprob
        reward = self.beta * (self.policy_logprob(params, batch) - ref)
        if self.length_normalised:
            reward = reward / response_lengths(jnp.asarray(batch.response_mask))
        return reward


@dataclasses.dataclass(frozen=True)
class GenerativeRM:
    """EX-GRM: r(x, y) = π_θ("Yes" | verification prompt), a probability (docs/math.md §6.5).

    The input is one user turn "Question: …\\nAnswer: …\\nVerification: Is the answer correct (Yes/No)?" with the
    generation prompt (`dynamics.text.encode_exgrm`); the reward is read at the last non-pad position.

    Attributes:
      lm: the language model.
      yes_id: token id of "Yes".
      no_id: token id of "No".
    """

    lm: LM
    yes_id: int
    no_id: int
    kind: str = dataclasses.field(default="exgrm", init=False)

    def init(self, lm_params: Params) -> Params:
        return {"lm": lm_params}

    def answer_logprobs(self, params: Params, batch: ExgrmBatch) -> Float[Array, "B 2"]:
        """[ln π("Yes"), ln π("No")] at the last real position."""
        tokens, mask = _arrays(batch)
        hidden = self.lm.forward(params["lm"], tokens, mask)
        return answer_logprobs_from_hidden(self.lm, params["lm"], hidden, mask, self.yes_id, self.no_id)

    def reward(self, params: Params, batch: ExgrmBatch) -> Float[Array, " B"]:
        """π("Yes" | input) ∈ (0, 1)."""
        return jnp.exp(self.answer_logprobs(params, batch)[:, 0])

    def loss(self, params: Params, chosen: ExgrmBatch, rejected: ExgrmBatch) -> Float[Array, ""]:
        """Cross-entropy −½·mean_i[ln π("Yes" | x_i, y_i+) + ln π("No" | x_i, y_i−)] (docs/math.md §6.5): the mean
        of `exgrm_losses`, i.e. the official code's mean over the 2B sequences (what training minimizes)."""
        return jnp.mean(exgrm_losses(self.answer_logprobs(params, chosen), self.answer_logprobs(params, rejected)))


RewardModel = ExplicitRM | ImplicitRM | GenerativeRM


def bt_loss(r_chosen: Float[Array, " B"], r_rejected: Float[Array, " B"]) -> Float[Array, ""]:
    """Bradley-Terry loss −mean ln σ(r+ − r−) (docs/math.md §1; for the IM-RM exactly the DPO loss)."""
    return -jnp.mean(jax.nn.log_sigmoid(r_chosen - r_rejected))


def bt_weight(r_chosen: Float[Array, " B"], r_rejected: Float[Array, " B"]) -> Float[Array, " B"]:
    """g = σ(r− − r+) ∈ (0, 1): the weight of each triple's gradient in one BT step (docs/math.md §3)."""
    return jax.nn.sigmoid(r_rejected - r_chosen)


def make_reward_model(kind: str, lm: LM, **options: Any) -> RewardModel:
    """The reward model of a registered kind (`dynamics.reward_types`), e.g. "ex", "ex-mean", "im", "im-noref".

    Args:
      kind: the reward type; the options it fixes (ex-mean: pooling="mean"; im-noref: reference_free=True)
        take precedence over `options`.
      lm: the language model.
      **options: constructor options (`beta`, `pooling`, `reference_free`; `yes_id`, `no_id` for "exgrm");
        options the model does not take are ignored, so one call site can pass β to every kind.

    Returns:
      an `ExplicitRM`, `ImplicitRM` or `GenerativeRM`.
    """
    rtype = reward_type(kind)
    cls = _MODEL_CLASSES[rtype.model]
    accepted = {f.name for f in dataclasses.fields(cls) if f.init} - {"lm"}
    merged = {k: v for k, v in {**options, **rtype.options}.items() if k in accepted}
    if cls is GenerativeRM and not {"yes_id", "no_id"} <= merged.keys():
        raise ConfigError(f"reward type {kind!r} needs yes_id and no_id (dynamics.text.exgrm_answer_ids)")
    return cls(lm, **merged)


_MODEL_CLASSES = {"ExplicitRM": ExplicitRM, "ImplicitRM": ImplicitRM, "GenerativeRM": GenerativeRM}

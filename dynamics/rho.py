"""The ρ analysis of one unseen pair against one training triple, and its result type (docs/math.md §3.2).

For an unseen pair (x̄, ȳ) and a training response v ∈ {y+, y−} of prompt x (arXiv 2507.07981 Eq. (5)):

    ρ_{k,l}(v) = ⟨e_{ȳ_k} − p, e_{v_l} − q⟩ = 1[ȳ_k = v_l] − q(ȳ_k) − p(v_l) + ⟨p, q⟩ ∈ [−2, 2],

with p = π(·|x̄, ȳ<k) and q = π(·|x, v<l). Under Assumption 1 (only the unembedding trains, untied) the kernel
term of Eq. (5) is K(u, v) = β² Σ_k Σ_l ⟨h_{x̄,ȳ<k}, h_{x,v<l}⟩ · ρ_{k,l}(v). `rho_analysis` tokenizes one
triple and one unseen pair, runs the model, and returns every ρ matrix, its four terms and the hidden
similarities (`RhoResult`, for the ρ heat-map figure). The streaming ρ computation itself is
`dynamics.kernels.rho_terms`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dynamics.errors import ConfigError, DataError
from dynamics.kernels import DEFAULT_VOCAB_CHUNK, prediction_positions, rho_terms_jit

__all__ = ["RhoPanel", "RhoResult", "closing_token_count", "load_rho_json", "rho_analysis"]


def closing_token_count(tokenizer) -> int:
    """How many tokens the chat template appends after every response's content (e.g. `<|im_end|>` + newline).

    Found as the common suffix of the response tokens of two different one-word answers (the template's closing
    tokens, docs/math.md §1; they dominate the ρ sums, docs/math.md §9).
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
    """ρ and its factors for one unseen pair against one training response v (docs/math.md §3.2, Eq. (5)).

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

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write `to_dict()` as JSON, atomically; returns the path."""
        from dynamics.outputs import write_json_atomic

        return write_json_atomic(path, self.to_dict())


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
    fn = rho_terms_jit
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
_forward_jit = jax.jit(lambda lm, p, t, m: lm.forward(p, t, m), static_argnums=0)


def load_rho_json(path: str) -> dict[str, Any]:
    """Read a file written by `RhoResult.save` (for figures)."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)

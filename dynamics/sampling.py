"""Ancestral sampling from a decoder LM, without a KV cache (docs/math.md §6.1, the generation test).

Each new token recomputes the forward pass over the whole sequence so far. That is quadratic in the length but
needs nothing from the model beyond `LM.forward` / `LM.unembed`, and the paper's use (the Hamiltonian-cycle
generation test: prompts of ~150 tokens, answers of ~20) is short. Two things keep it affordable on a CPU:

- the sequence is cut to its current length, rounded up to a multiple of `bucket` (a few compiled shapes), and
  only the last position of each row is unembedded (B × V logits, never B × T × V);
- a row stops at a stop token (the chat template's end of turn, EOS), or as soon as the caller's `keep_going`
  predicate says its text can no longer become a correct answer (an exact early exit: appending tokens only
  appends text), and sampling ends when every row has stopped.

Rows are right-padded: row b's next token goes to position len_b and is drawn from softmax(W h_{len_b − 1} / τ)
(temperature τ, no top-k, top-p 1: the official code's `GenerationConfig(do_sample=True, temperature=1,
top_k=0, top_p=1)`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dynamics.errors import ConfigError
from dynamics.models import LM, Params

__all__ = ["SampleResult", "TRACES", "next_token", "sample"]

#: Trace counts of the jitted step (one per (model, batch, length bucket)); a guard against silent retracing.
TRACES: dict[str, int] = {"next_token": 0}


@dataclasses.dataclass(frozen=True)
class SampleResult:
    """Sampled continuations, one per prompt.

    Attributes:
      tokens: the new token ids of each row, without the stop token.
      stop_reason: per row, "stop_token" (a stop token ended it), "keep_going" (the caller's predicate ended
        it) or "max_new_tokens" (the length limit).
      steps: forward passes made (the longest row's number of new tokens, over all batches).
      max_new_tokens: the length limit.
      temperature: τ.
      seed: the sampling seed.
    """

    tokens: tuple[tuple[int, ...], ...]
    stop_reason: tuple[str, ...]
    steps: int
    max_new_tokens: int
    temperature: float
    seed: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "tokens": [list(t) for t in self.tokens],
            "stop_reason": list(self.stop_reason),
            "steps": self.steps,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "seed": self.seed,
        }


@functools.partial(jax.jit, static_argnums=(0,))
def next_token(lm: LM, params: Params, tokens: jax.Array, mask: jax.Array, last: jax.Array, key, temperature):
    """One draw per row from softmax(W h_last / τ).

    Args:
      lm: the model (static).
      params: its parameters.
      tokens: int32 [B, T], right-padded.
      mask: int32 [B, T], 1 on real tokens.
      last: int32 [B], the position of each row's last real token.
      key: a PRNG key.
      temperature: τ > 0 (a traced scalar).

    Returns:
      int32 [B], the sampled token ids.
    """
    TRACES["next_token"] += 1
    hidden = lm.forward(params, tokens, mask)  # [B, T, D]
    h = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]  # [B, D]
    logits = lm.unembed(params, h)
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)


def _bucket(n: int, bucket: int, limit: int) -> int:
    return min(-(-n // bucket) * bucket, limit)


def sample(
    lm: LM,
    params: Params,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    pad_id: int,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    bucket: int = 16,
    keep_going: Callable[[list[int]], bool] | None = None,
) -> SampleResult:
    """Samples one continuation per prompt (temperature τ, no top-k/top-p), without a KV cache.

    Args:
      lm: the model.
      params: its parameters.
      prompts: token ids of each prompt (already chat-templated, with the generation prompt).
      max_new_tokens: at most this many new tokens per row (300 in the paper's generation test).
      stop_ids: token ids that end a row (not included in the result).
      pad_id: the id written into padding (masked out).
      temperature: τ > 0.
      seed: the sampling seed; batch k, step t uses fold_in(fold_in(PRNGKey(seed), k), t).
      batch_size: rows per forward pass (the last batch is padded by repeating a row).
      bucket: the sequence is cut to its current length rounded up to a multiple of this.
      keep_going: called with a row's new ids after each token; False ends the row (e.g. its text can no
        longer be a correct answer). None: rows end only at a stop token or the limit.

    Returns:
      A `SampleResult`.

    Raises:
      ConfigError: no prompts, an empty prompt, τ ≤ 0 or a limit < 1, or a prompt + limit past the model's
        context.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("sample needs at least one prompt, and no empty prompt")
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    if max_new_tokens < 1 or batch_size < 1 or bucket < 1:
        raise ConfigError("max_new_tokens, batch_size and bucket must be >= 1")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > lm.config.max_position:
        raise ConfigError(
            f"a prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the model's context "
            f"({lm.config.max_position})"
        )
    stops = {int(s) for s in stop_ids}
    base = jax.random.PRNGKey(seed)
    out_tokens: list[tuple[int, ...]] = []
    reasons: list[str] = []
    total_steps = 0
    for k, start in enumerate(range(0, len(prompts), batch_size)):
        rows = [list(map(int, p)) for p in prompts[start : start + batch_size]]
        n_real = len(rows)
        rows += [rows[-1]] * (batch_size - n_real)
        width = max(len(r) for r in rows) + max_new_tokens
        tokens = np.full((batch_size, width), pad_id, np.int32)
        mask = np.zeros((batch_size, width), np.int32)
        lengths = np.array([len(r) for r in rows], np.int64)
        for b, r in enumerate(rows):
            tokens[b, : len(r)] = r
            mask[b, : len(r)] = 1
        new: list[list[int]] = [[] for _ in range(batch_size)]
        reason = ["max_new_tokens"] * batch_size
        active = np.array([b < n_real for b in range(batch_size)])
        key_k = jax.random.fold_in(base, k)
        for t in range(max_new_tokens):
            if not active.any():
                break
            T = _bucket(int(lengths.max()), bucket, width)
            drawn = next_token(
                lm,
                params,
                jnp.asarray(tokens[:, :T]),
                jnp.asarray(mask[:, :T]),
                jnp.asarray(lengths - 1, dtype=jnp.int32),
                jax.random.fold_in(key_k, t),
                jnp.float32(temperature),
            )
            drawn = np.asarray(drawn)
            total_steps += 1
            for b in np.flatnonzero(active):
                token = int(drawn[b])
                if token in stops:
                    active[b], reason[b] = False, "stop_token"
                    continue
                tokens[b, lengths[b]] = token
                mask[b, lengths[b]] = 1
                lengths[b] += 1
                new[b].append(token)
                if keep_going is not None and not keep_going(new[b]):
                    active[b], reason[b] = False, "keep_going"
        out_tokens += [tuple(new[b]) for b in range(n_real)]
        reasons += reason[:n_real]
    return SampleResult(tuple(out_tokens), tuple(reasons), total_steps, max_new_tokens, float(temperature), seed)

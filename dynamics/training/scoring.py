"""Scoring whole sequence sets in fixed-size chunks: the frozen-block cache, ln π(y|x), and rewards.

Chunks have exactly `eval_chunk(config, devices)` rows (the last one padded by repeating its last row,
`dynamics.chunking.chunks_pad_last`), so one program is compiled per sequence-length bucket.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from dynamics.chunking import chunks_pad_last
from dynamics.models import Params
from dynamics.rewards import ImplicitRM
from dynamics.sharding import data_devices, place_rows
from dynamics.training.batching import eval_chunk
from dynamics.training.config import TrainConfig
from dynamics.training.engine import CompiledStep
from dynamics.training.packed_eval import PackedEval, split_values
from dynamics.training.rows import Rows, padding_side, take_rows

__all__ = ["add_lower_cache", "add_packed_lower_cache", "packed_logprobs", "score_packed", "score_set",
           "sequence_logprobs"]  # fmt: skip


def add_lower_cache(
    step: CompiledStep, lm_params: Params, rows: Rows, chunk: int, bucket: int, mesh: Any = None, bar: Any = None
) -> Rows:
    """`rows` with `x` [n, T, D]: the residual stream after the frozen blocks 0 … start − 1, computed once per row.

    Args:
      step: the compiled functions (`step.start` blocks are frozen).
      lm_params: the frozen language-model parameters.
      rows: the sequences.
      chunk: rows per forward pass.
      bucket: the bucket of sequence lengths.
      mesh: the device mesh, or None.
      bar: a tqdm bar advanced by the rows of each chunk, or None.
    """
    tokens, mask = rows.tokens, rows.attention_mask
    n, full = tokens.shape
    side = padding_side(mask)
    x = None
    for idx, k in chunks_pad_last(n, chunk):
        part = take_rows([Rows(tokens, mask)], idx, bucket)[0]
        out = np.asarray(step.lower(lm_params, *place_rows((part.tokens, part.attention_mask), mesh)))
        idx, out = idx[:k], out[:k]
        if x is None:
            x = np.zeros((n, full, out.shape[-1]), out.dtype)
        T = out.shape[1]
        x[idx, :T] = out if side == "right" else 0
        if side == "left":
            x[idx, full - T :] = out
        if bar is not None:
            bar.update(k)
    return rows.replace(x=x)


def sequence_logprobs(
    step: CompiledStep,
    lm_params: Params | None,
    rows: Rows,
    config: TrainConfig,
    mesh: Any = None,
    bar: Any = None,
) -> np.ndarray:
    """ln π(y|x) of every row under `lm_params`, float64 [n] (nats), in evaluation-sized chunks (0 when None).

    The IM-RM's reference log-probs and its evaluation log-probs go through this same function, chunks and
    shapes (and, on a mesh, placements), so that at initialization r = β (ln π_θ − ln π_ref) is exactly 0 on
    every row.
    """
    n = rows.n_rows
    if lm_params is None:
        if bar is not None:
            bar.update(n)
        return np.zeros(n, np.float64)
    out = []
    for idx, k in chunks_pad_last(n, eval_chunk(config, data_devices(mesh))):
        chunk = place_rows(step.prepare(rows, idx, config.bucket), mesh)
        out.append(np.asarray(step.logprob(lm_params, chunk))[:k])
        if bar is not None:
            bar.update(k)
    return np.concatenate(out).astype(np.float64)


def score_set(
    step: CompiledStep,
    params: Params,
    rows: Rows,
    ref: np.ndarray | None,
    config: TrainConfig,
    mesh: Any = None,
    bar: Any = None,
) -> np.ndarray:
    """The reward of every row of one sequence set, float64 [n] (IM-RM: β (ln π_θ − `ref`); docs/math.md §1).

    `bar`: a tqdm bar advanced per chunk, or None.
    """
    if isinstance(step.rm, ImplicitRM):
        lp = sequence_logprobs(step, params["lm"], rows, config, mesh, bar)
        reward = step.rm.beta * (lp - ref)
        if step.rm.length_normalised:  # SimPO (docs/math.md §11): (β/|y|) ln π_θ(y|x)
            reward = reward / np.maximum(np.asarray(rows.response_mask).sum(axis=1), 1)
        return reward
    out = []
    for idx, k in chunks_pad_last(rows.n_rows, eval_chunk(config, data_devices(mesh))):
        out.append(np.asarray(step.score(params, place_rows(step.prepare(rows, idx, config.bucket), mesh)))[:k])
        if bar is not None:
            bar.update(k)
    return np.concatenate(out).astype(np.float64)


def add_packed_lower_cache(step: CompiledStep, lm_params: Params, packed: PackedEval, bar: Any = None) -> PackedEval:
    """`packed` with each chunk's `x` [1, P, D]: the residual stream of its packed row after the frozen blocks
    0 … start − 1 (`dynamics.training.packed_eval`; `bar` advanced by the sequences of each chunk)."""
    xs = _per_chunk(packed, lambda chunk: step.lower_packed(lm_params, chunk.replace(x=None)), bar)
    return dataclasses.replace(packed, chunks=tuple(c.replace(x=x) for c, x in zip(packed.chunks, xs, strict=True)))


def _per_chunk(packed: PackedEval, fn: Any, bar: Any) -> list[np.ndarray]:
    """fn(chunk) of every chunk as a host array; `bar` advanced by each chunk's sequences."""
    out = []
    for c, chunk in enumerate(packed.chunks):
        out.append(np.asarray(fn(chunk)))
        if bar is not None:
            bar.update(int(np.sum(packed.index[c] >= 0)))
    return out


def packed_logprobs(
    step: CompiledStep, lm_params: Params | None, packed: PackedEval, bar: Any = None
) -> dict[str, np.ndarray]:
    """ln π(y|x) of every sequence of every set, from the packed rows: {set: float64 [n]} (nats; 0 when
    `lm_params` is None). The IM-RM's reference log-probs and its evaluation log-probs both come from here, so
    that r = 0 exactly at initialization."""
    if lm_params is None:
        if bar is not None:
            bar.update(packed.n_rows)
        return split_values(packed, [np.zeros(len(i)) for i in packed.index])
    return split_values(packed, _per_chunk(packed, lambda chunk: step.logprob(lm_params, chunk), bar))


def score_packed(
    step: CompiledStep,
    params: Params,
    packed: PackedEval,
    ref: Mapping[str, np.ndarray | None],
    bar: Any = None,
) -> dict[str, np.ndarray]:
    """The reward of every sequence of every set from the packed rows, {set: float64 [n]}: what `score_set`
    gives set by set (IM-RM: β (ln π_θ − `ref`); docs/math.md §1), up to float rounding."""
    if isinstance(step.rm, ImplicitRM):
        lp = packed_logprobs(step, params["lm"], packed, bar)
        rewards = {name: step.rm.beta * (lp[name] - ref[name]) for name in packed.names}
        if step.rm.length_normalised:  # SimPO (docs/math.md §11): (β/|y|) ln π_θ(y|x)
            lengths = split_values(packed, [np.maximum(c.response_mask.sum(axis=1), 1) for c in packed.chunks])
            rewards = {name: r / lengths[name] for name, r in rewards.items()}
        return rewards
    return split_values(packed, _per_chunk(packed, lambda chunk: step.score(params, chunk), bar))

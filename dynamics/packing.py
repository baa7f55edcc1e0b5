"""Shared-prompt packing: a preference pair's chosen and rejected sequences run as one row, the prompt once.

In a Bradley-Terry pair (x, y+, y−) both sequences start with the same prompt x, and under causal attention the
hidden states of x do not depend on what follows. So one packed row

    [ shared prefix s | rest of (x, y+) | rest of (x, y−) | padding ]
      positions 0…|s|−1  |s|…|x,y+|−1       |s|…|x,y−|−1

with position ids restarting after the chosen tail, and an attention mask under which every token reads the
shared prefix and its own tail (never the other tail), computes exactly the hidden states of the two separate
sequences, with |s| fewer token positions through every block. The shared prefix is the longest common prefix of
the two sequences' real tokens (the prompt, and any common opening of the responses).

`unpack_index` maps each original (row, position) to its place in the packed row, so the hidden states of the
original [2b, T] layout are one gather away and every reward (EX-RM last / mean, IM-RM, EX-GRM) reads them as
before. Training uses packing when the token count falls by at least `MIN_SAVING` (`worth_packing`).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Int

from dynamics.errors import DataError

__all__ = ["MIN_SAVING", "SEGMENT_PAD", "SEGMENT_SHARED", "pack_pairs", "packed_attention_mask", "worth_packing"]

MIN_SAVING = 0.1
#: Segment ids of a packed row: the shared prefix, the tails (1, 2, …; a pair's chosen and rejected tails are 1
#: and 2), and padding (never a tail's id, however many tails a row holds).
SEGMENT_SHARED, SEGMENT_CHOSEN, SEGMENT_REJECTED, SEGMENT_PAD = 0, 1, 2, -1


def _real_tokens(tokens: np.ndarray, mask: np.ndarray, row: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """The real tokens of one row and their positions in the row (one-sided padding: contiguous)."""
    where = np.flatnonzero(mask[row] > 0)
    if len(where) and where[-1] - where[0] + 1 != len(where):
        raise DataError(f"{name} row {row}: the real tokens are not contiguous (padding inside the sequence)")
    return tokens[row, where], where


def pack_pairs(
    chosen: Mapping[str, np.ndarray], rejected: Mapping[str, np.ndarray], bucket: int
) -> dict[str, np.ndarray]:
    """Packs b pairs (row i of `chosen` with row i of `rejected`) into b rows that share each pair's prefix.

    Args:
      chosen: {"tokens", "attention_mask"} int [b, T] (either padding side); other keys are ignored.
      rejected: the same, [b, T'] (T' may differ from T).
      bucket: the packed length P is the longest packed row rounded up to a multiple of this.

    Returns:
      "pack_tokens" int32 [b, P]: shared prefix, chosen tail, rejected tail, zeros.
      "pack_mask" int32 [b, P]: 1 on real tokens.
      "pack_positions" int32 [b, P]: position ids (the rejected tail continues from the prefix, not the chosen).
      "pack_segment" int32 [b, P]: 0 shared prefix, 1 chosen tail, 2 rejected tail, 3 padding.
      "unpack_index" int32 [2b, max(T, T')]: for original row r (chosen rows 0…b−1, then rejected rows) and
        position t, the packed position holding it (padding positions point at 0; they are never read).
      "pack_source" int32 [b, P]: for packed position p, the original row (0…2b−1) times max(T, T') plus the
        position there: where a per-position input of the original layout (a cached residual stream) comes
        from (padding points at its row's position 0).
    """
    tc, mc = np.asarray(chosen["tokens"]), np.asarray(chosen["attention_mask"])
    tr, mr = np.asarray(rejected["tokens"]), np.asarray(rejected["attention_mask"])
    b = tc.shape[0]
    if tr.shape[0] != b:
        raise DataError(f"pack_pairs: {b} chosen rows but {tr.shape[0]} rejected rows")
    T = max(tc.shape[1], tr.shape[1])
    rows = []
    for i in range(b):
        c_ids, c_at = _real_tokens(tc, mc, i, "chosen")
        r_ids, r_at = _real_tokens(tr, mr, i, "rejected")
        n = min(len(c_ids), len(r_ids))
        differ = np.flatnonzero(c_ids[:n] != r_ids[:n])
        s = int(differ[0]) if len(differ) else n
        rows.append((c_ids, c_at, r_ids, r_at, s))
    longest = max((len(c) + len(r) - s for c, _, r, _, s in rows), default=1)
    P = max(-(-max(longest, 1) // bucket) * bucket, 1)
    tokens = np.zeros((b, P), np.int32)
    mask = np.zeros((b, P), np.int32)
    positions = np.zeros((b, P), np.int32)
    segment = np.full((b, P), SEGMENT_PAD, np.int32)
    index = np.zeros((2 * b, T), np.int32)
    source = np.repeat(np.arange(b, dtype=np.int32)[:, None] * T, P, axis=1)
    for i, (c_ids, c_at, r_ids, r_at, s) in enumerate(rows):
        lc, lr = len(c_ids), len(r_ids)
        end = lc + lr - s
        tokens[i, :lc] = c_ids
        tokens[i, lc:end] = r_ids[s:]
        mask[i, :end] = 1
        positions[i, :lc] = np.arange(lc)
        positions[i, lc:end] = np.arange(s, lr)
        segment[i, :s] = SEGMENT_SHARED
        segment[i, s:lc] = SEGMENT_CHOSEN
        segment[i, lc:end] = SEGMENT_REJECTED
        index[i, c_at] = np.arange(lc)
        index[b + i, r_at] = np.where(np.arange(lr) < s, np.arange(lr), np.arange(lr) + lc - s)
        source[i, :lc] = i * T + c_at
        source[i, lc:end] = (b + i) * T + r_at[s:]
    return {
        "pack_tokens": tokens,
        "pack_mask": mask,
        "pack_positions": positions,
        "pack_segment": segment,
        "unpack_index": index,
        "pack_source": source,
    }


def packed_attention_mask(segment: Int[Array, "b P"]) -> Bool[Array, "b P P"]:
    """Query t may read key s: s ≤ t, s is a real token, and s is in the shared prefix or in t's own tail."""
    P = segment.shape[-1]
    causal = jnp.arange(P)[None, :] <= jnp.arange(P)[:, None]
    q, k = segment[:, :, None], segment[:, None, :]
    readable = (k != SEGMENT_PAD) & ((k == SEGMENT_SHARED) | (k == q))
    return causal[None] & readable


def worth_packing(packed_length: int, chosen_length: int, rejected_length: int) -> bool:
    """True when one packed row of `packed_length` positions replaces at least `MIN_SAVING` of the two rows'.

    Lengths are the (bucketed) array lengths of one micro-batch: b packed rows of P positions against b chosen
    rows of T and b rejected rows of T'. Attention grows as P² against T² + T'², so a longer packed row only
    pays when the prefix is a real share of it; a 10 % cut in positions is the rule used.
    """
    return packed_length <= (1.0 - MIN_SAVING) * (chosen_length + rejected_length)

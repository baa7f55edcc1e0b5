"""One typed batch of training / evaluation sequences: `Rows`, a frozen dataclass that is a JAX pytree.

Host-side (numpy) operations build it: the rows of a `PairBatch` / `ExgrmBatch` (`Rows.from_batch`), cut to a
bucketed length (`take_rows`), chosen rows followed by rejected rows (`Rows.concat`), with the IM-RM's response
positions (`response_index`) and the packed pairs of `dynamics.packing` (`with_packing`). The jitted step takes
it as it is (absent parts are None, so each combination of parts is one compiled program per shape).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.struct
import numpy as np

from dynamics.errors import DataError

__all__ = ["Rows", "bucket_length", "padding_side", "response_index", "take_rows", "with_packing"]

_PACK_FIELDS = ("pack_tokens", "pack_mask", "pack_positions", "pack_segment", "unpack_index", "pack_source")


@flax.struct.dataclass
class Rows:
    """B sequences (rows) padded to one length T, with what the fast paths of training read.

    Every field holds arrays with rows first; the optional ones are None when absent.

    Attributes:
      tokens: int [B, T] token ids.
      attention_mask: int [B, T], 1 on real tokens (padding on one side only).
      response_mask: int [B, T], 1 on response tokens (EX-RM, IM-RM); None for EX-GRM inputs.
      x: float [B, T, D], the residual stream after the frozen lower blocks (`dynamics.training.hidden`), or None.
      resp_src: int32 [B, R], for each response token at position t ≥ 1 the position t − 1 that predicts it
        (`response_index`, IM-RM), or None.
      resp_tgt: int32 [B, R], the response tokens, or None.
      resp_valid: float32 [B, R], 1 on real entries, or None.
      pack_tokens: int32 [b, P], the b = B/2 packed pairs of `dynamics.packing.pack_pairs` (chosen rows first in
        the B rows), or None; likewise pack_mask, pack_positions, pack_segment [b, P], unpack_index [B, T] and
        pack_source [b, P].
      pack_row: int32 [B], the packed row that holds each row (`dynamics.training.packed_eval`: many rows share
        one packed row), or None: row i of B = 2b is in packed row i mod b (pairs). With pack_row set and
        pack_source None, `x` is the cached residual stream of the packed rows [b, P, D].
      pack_attn: bool [b, P, P], which packed position each one reads (`packed_eval`'s prefix trees), or None:
        from pack_segment (pairs).
      resp_owner: float32 [B, K], with packed rows: 1 where response entry k (resp_src / resp_tgt / resp_valid
        [b, K], positions of the packed row) belongs to row i's response (`packed_eval`), or None.
    """

    tokens: Any
    attention_mask: Any
    response_mask: Any = None
    x: Any = None
    resp_src: Any = None
    resp_tgt: Any = None
    resp_valid: Any = None
    pack_tokens: Any = None
    pack_mask: Any = None
    pack_positions: Any = None
    pack_segment: Any = None
    unpack_index: Any = None
    pack_source: Any = None
    pack_row: Any = None
    pack_attn: Any = None
    resp_owner: Any = None

    @classmethod
    def from_batch(cls, batch: Any) -> Rows:
        """The arrays of a `PairBatch` / `ExgrmBatch` as host numpy arrays (static bookkeeping fields dropped)."""
        response = getattr(batch, "response_mask", None)
        return cls(
            np.asarray(batch.tokens),
            np.asarray(batch.attention_mask),
            None if response is None else np.asarray(response),
        )

    @property
    def n_rows(self) -> int:
        """B."""
        return int(np.shape(self.tokens)[0])

    @property
    def packed(self) -> bool:
        """Whether the rows carry packed pairs."""
        return self.pack_tokens is not None

    def arrays(self) -> dict[str, Any]:
        """The fields that are present, by name."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__ if getattr(self, name) is not None}

    def positions(self) -> int:
        """Positions one pass over these rows runs: the packed rows, else the B separate rows."""
        return int(np.prod(np.shape(self.pack_tokens if self.packed else self.tokens)))

    @staticmethod
    def concat(a: Rows, b: Rows) -> Rows:
        """The rows of `a` followed by those of `b` (same T; each field present in `a` is concatenated)."""
        return Rows(**{k: np.concatenate([v, getattr(b, k)], axis=0) for k, v in a.arrays().items()})


def bucket_length(longest: int, bucket: int, limit: int) -> int:
    """`longest` rounded up to a multiple of `bucket`, but never past `limit` (the padded array's T)."""
    return min(-(-longest // bucket) * bucket, limit)


def padding_side(mask: np.ndarray) -> str:
    """'right' if every row starts with a real token, 'left' if every row ends with one (mask: [B, T])."""
    if mask.shape[1] == 0 or bool(np.all(mask[:, 0] == 1)):
        return "right"
    if bool(np.all(mask[:, -1] == 1)):
        return "left"
    raise DataError("a batch must be padded on one side only (right or left)")


def take_rows(sets: Sequence[Rows], rows: np.ndarray, bucket: int) -> list[Rows]:
    """Rows `rows` of each set, cut to one common bucketed length T (the padding side is kept).

    Args:
      sets: row sets of the same padded length (e.g. chosen and rejected).
      rows: row indices.
      bucket: T is the longest selected sequence rounded up to a multiple of this.

    Returns:
      The selected rows of each set, all with the same T.
    """
    full = sets[0].tokens.shape[1]
    sides = [padding_side(s.attention_mask) for s in sets]
    longest = max(int(s.attention_mask[rows].sum(axis=1).max()) for s in sets)
    T = bucket_length(longest, bucket, full)
    out = []
    for s, side in zip(sets, sides, strict=True):
        cut = slice(0, T) if side == "right" else slice(full - T, full)
        out.append(Rows(**{k: v[rows][:, cut] for k, v in s.arrays().items()}))
    return out


def response_index(rows: Rows, bucket: int) -> Rows:
    """`rows` with where the IM-RM reads: for each response token y_k at position t ≥ 1, the position t − 1 whose
    hidden state predicts it (docs/math.md §1: softmax(W h_{x,y<k})).

    Only these positions need the unembedding (|y| ≪ T rows of V logits instead of T).

    Returns:
      `rows` with resp_src int32 [B, R] (positions t − 1), resp_tgt int32 [B, R] (tokens y_k) and resp_valid
      float32 [B, R] (1 on real entries); R is the longest response rounded up to a multiple of `bucket`.
    """
    tokens, response_mask = rows.tokens, rows.response_mask
    B, T = tokens.shape
    counts = (response_mask[:, 1:] > 0).sum(axis=1)
    R = bucket_length(max(int(counts.max()), 1), bucket, max(T - 1, 1))
    src = np.zeros((B, R), np.int32)
    tgt = np.zeros((B, R), np.int32)
    valid = np.zeros((B, R), np.float32)
    for b in range(B):
        ts = np.flatnonzero(response_mask[b, 1:] > 0) + 1
        src[b, : len(ts)] = ts - 1
        tgt[b, : len(ts)] = tokens[b, ts]
        valid[b, : len(ts)] = 1.0
    return rows.replace(resp_src=src, resp_tgt=tgt, resp_valid=valid)


def with_packing(rows: Rows, pack: Mapping[str, np.ndarray]) -> Rows:
    """`rows` (chosen rows then rejected rows) with the packed pairs `dynamics.packing.pack_pairs` returned."""
    return rows.replace(**{k: pack[k] for k in _PACK_FIELDS})

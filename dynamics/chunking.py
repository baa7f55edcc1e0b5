"""Fixed-size row chunks: one row count per chunk, so one compiled program per shape (docs/math.md §3).

Δr (arXiv 2507.07981 Eqs. (4), (5); docs/math.md §3), the prediction-vs-real-step check and training all evaluate
many rows in batches of exactly `size` rows: the last chunk is padded to `size` by repeating one of its own rows,
and the real row count is kept so that the padded rows' outputs can be dropped (`out[:keep]`). Padded rows never
change a kept row's value (every computation here is row-wise).

Two paddings exist, each kept exactly as its callers had it:

- `chunks(n, size)`: pad with the chunk's *first* row (Δr, the step check, the benchmarks);
- `chunks_pad_last(n, size)`: pad with the chunk's *last* row (`np.pad(mode="edge")`; training's evaluation
  passes).

`batch_chunks` applies `chunks` to a `PairBatch` (and optionally places each chunk on a device mesh); `strip`
removes a batch's static bookkeeping fields, which would otherwise be part of every jit cache key.
"""

from __future__ import annotations

import numpy as np

from dynamics.batches import PairBatch, PreferenceBatch

__all__ = ["batch_chunks", "chunks", "chunks_pad_last", "strip"]


def chunks(n: int, size: int) -> list[tuple[np.ndarray, int]]:
    """Row indices 0..n−1 in chunks of exactly `size`, the last one padded by repeating its first row.

    Args:
      n: number of rows (≥ 0).
      size: rows per chunk (≥ 1).

    Returns:
      A list of (indices [size] int64, keep): the first `keep` indices are the chunk's real rows.
    """
    out = []
    for start in range(0, n, size):
        idx = np.arange(start, min(start + size, n))
        keep = len(idx)
        idx = np.concatenate([idx, np.full(size - keep, idx[0])]) if keep < size else idx
        out.append((idx, keep))
    return out


def chunks_pad_last(n: int, size: int) -> list[tuple[np.ndarray, int]]:
    """Row indices 0..n−1 in chunks of exactly `size`, the last one padded by repeating its last row.

    Args:
      n: number of rows (≥ 0).
      size: rows per chunk (≥ 1).

    Returns:
      A list of (indices [size] int64, keep): the first `keep` indices are the chunk's real rows.
    """
    out = []
    for start in range(0, n, size):
        idx = np.arange(start, min(start + size, n))
        out.append((np.pad(idx, (0, size - len(idx)), mode="edge"), len(idx)))
    return out


def strip(batch: PairBatch | PreferenceBatch) -> PairBatch | PreferenceBatch:
    """The batch without its static bookkeeping fields (`truncated`, `boundary_mismatch`: part of the jit key)."""
    if isinstance(batch, PreferenceBatch):
        return PreferenceBatch(strip(batch.chosen), strip(batch.rejected))
    return batch.replace(truncated=(), boundary_mismatch=())


def batch_chunks(batch: PairBatch, size: int, mesh=None) -> list[tuple[PairBatch, int]]:
    """`batch`'s rows in stripped chunks of exactly `size` (padded as `chunks`), with each real row count.

    Args:
      batch: the rows to chunk, e.g. the unseen pairs of Δr (docs/math.md §3).
      size: rows per chunk (≥ 1; with a mesh, a multiple of its device count).
      mesh: a `jax.sharding.Mesh`; each chunk is then split over its devices along the batch axis.

    Returns:
      A list of (chunk, keep): the chunk's first `keep` rows are real.
    """
    from dynamics.sharding import shard_batch

    out = []
    for idx, keep in chunks(batch.batch_size, size):
        chunk = strip(batch.select(idx))
        out.append((shard_batch(chunk, mesh) if mesh is not None else chunk, keep))
    return out

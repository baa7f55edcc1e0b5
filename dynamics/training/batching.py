"""Which rows each optimizer step and each forward/backward pass takes: a pure function of (seed, epoch, config).

The data order of epoch e is `epoch_order(seed, e, n)`; a step is `batch_size` consecutive rows of it cut into
micro-batches (`batch_plan`); a micro-batch runs as one pass, or as several of at most `pass_limit(config)`
positions (`split_passes`); `pass_rows` assembles one pass's arrays (docs/math.md §6: effective batch by gradient
accumulation).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from dynamics.packing import pack_pairs, worth_packing
from dynamics.training.config import CPU_PASS_POSITIONS, TrainConfig
from dynamics.training.rows import Rows, response_index, take_rows, with_packing

__all__ = ["PairSet", "batch_plan", "epoch_order", "eval_chunk", "pass_limit", "pass_rows", "split_passes"]


@dataclasses.dataclass(frozen=True)
class PairSet:
    """The n training pairs: row i of `chosen` with row i of `rejected`, and their cached ln π_ref (IM-RM).

    Attributes:
      chosen: the chosen sequences, [n, T] (with the frozen-block cache `x` where used).
      rejected: the rejected sequences, [n, T].
      ref_chosen: ln π_ref(y+|x) of every row, [n] (float32, or float64 in a float64 run), or None.
      ref_rejected: ln π_ref(y−|x), [n], or None.
    """

    chosen: Rows
    rejected: Rows
    ref_chosen: np.ndarray | None = None
    ref_rejected: np.ndarray | None = None

    @property
    def n_rows(self) -> int:
        """n."""
        return self.chosen.n_rows


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of the n training rows in epoch `epoch`: a pure function of (seed, epoch).

    Returns:
      int64 [n], a permutation of range(n) from numpy's PCG64 seeded with SeedSequence([seed, epoch]).
    """
    return np.random.default_rng(np.random.SeedSequence([seed, epoch])).permutation(n)


def batch_plan(order: np.ndarray, batch_size: int, micro_batch_size: int) -> list[list[np.ndarray]]:
    """Steps of micro-batches: consecutive `batch_size` rows of `order`, each cut into micro-batches.

    The last step may be short (the last rows of the epoch), as with a PyTorch DataLoader that keeps its last
    batch; its loss is still the mean over its own rows.

    Returns:
      A list (one per optimizer step) of lists of row-index arrays (one per micro-batch).
    """
    steps = []
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        steps.append([rows[m : m + micro_batch_size] for m in range(0, len(rows), micro_batch_size)])
    return steps


def pass_limit(config: TrainConfig, backend: str | None = None) -> int:
    """The most positions per forward/backward pass (0: no limit): `config.pass_positions`, or when None
    `CPU_PASS_POSITIONS` on a CPU backend and no limit on an accelerator (`backend`: jax.default_backend())."""
    if config.pass_positions is not None:
        return config.pass_positions
    if backend is None:
        import jax

        backend = jax.default_backend()
    return CPU_PASS_POSITIONS if backend == "cpu" else 0


def split_passes(rows: np.ndarray, positions: int, limit: int, unit: int = 1) -> list[np.ndarray]:
    """Cuts one micro-batch's rows (pairs) into the fewest consecutive passes of ≤ `limit` positions.

    Args:
      rows: the micro-batch's pair indices, in order.
      positions: positions the whole micro-batch takes in one pass (rows × bucketed length, packed or not).
      limit: the most positions per pass (0: no limit, one pass).
      unit: every pass holds a multiple of this many pairs (the mesh's device count); the micro-batch's size is
        a multiple of it.

    Returns:
      The passes, in order, covering `rows` exactly once: p = ⌈positions / limit⌉ passes (at most one per
      unit of pairs) of near-equal size, so that a micro-batch compiles at most two pass shapes per bucket.
      Positions are assumed proportional to pairs; a pass may exceed `limit` only when one unit of pairs does.
    """
    n_units = len(rows) // unit
    if limit <= 0 or positions <= limit or n_units <= 1 or len(rows) % unit:  # (a short last micro-batch)
        return [np.asarray(rows)]
    p = min(n_units, -(-positions // limit))
    sizes = [(n_units // p + (i < n_units % p)) * unit for i in range(p)]
    cuts = np.cumsum([0] + sizes)
    return [np.asarray(rows[cuts[i] : cuts[i + 1]]) for i in range(p)]


def eval_chunk(config: TrainConfig, n_devices: int = 1) -> int:
    """Rows per evaluation / precompute chunk: `eval_batch_size`, rounded up to a multiple of the devices."""
    return -(-config.eval_batch_size // n_devices) * n_devices


def pass_rows(
    pairs: PairSet, idx: np.ndarray, bucket: int, *, pack: bool, response_positions: bool
) -> tuple[Rows, Any, bool]:
    """The arrays of one pass over the pairs `idx`.

    Args:
      pairs: the training pairs.
      idx: the pair indices of the pass (b of them).
      bucket: the bucket of sequence lengths.
      pack: pack each pair into one row where that saves at least `dynamics.packing.MIN_SAVING` of the positions.
      response_positions: add the IM-RM's response positions (`response_index`).

    Returns:
      (rows [2b, T]: chosen rows then rejected rows cut to their bucketed length; the cached ln π_ref [2b] or
      None; whether the pass runs packed).
    """
    chosen, rejected = take_rows([pairs.chosen, pairs.rejected], idx, bucket)
    ref = None
    if pairs.ref_chosen is not None:
        ref = np.concatenate([pairs.ref_chosen[idx], pairs.ref_rejected[idx]])
    both = Rows.concat(chosen, rejected)
    if response_positions:
        both = response_index(both, bucket)
    packed = False
    if pack:
        packing = pack_pairs(chosen.arrays(), rejected.arrays(), bucket)
        if worth_packing(packing["pack_tokens"].shape[1], chosen.tokens.shape[1], rejected.tokens.shape[1]):
            both = with_packing(both, packing)
            packed = True
    return both, ref, packed

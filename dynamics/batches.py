"""The batch types every computation takes: `PairBatch` (token ids, attention and response masks of chat-templated
(prompt, response) pairs), `PreferenceBatch` (chosen and rejected of the same prompts) and `ExgrmBatch`; and where
a reward reads a sequence (`last_token_index`). `dynamics.text` builds them from text (docs/math.md §1).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["ExgrmBatch", "PairBatch", "PreferenceBatch", "last_token_index"]


# ----------------------------------------------------------------------------------------------------------
# Batch types
# ----------------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class PairBatch:
    """Chat-templated (prompt, response) sequences, padded to one length T.

    Attributes:
      tokens: int32 [B, T] token ids; padding is `tokenizer.pad_id`.
      attention_mask: int32 [B, T], 1 on real tokens.
      response_mask: int32 [B, T], 1 exactly on the response tokens (content + the template's closing tokens).
      truncated: row indices whose prompt was cut from the left to fit `max_length` (static: not a leaf).
      boundary_mismatch: row indices whose split tokenization (prompt, then response) differs from tokenizing
        the full templated text (static).
    """

    tokens: np.ndarray
    attention_mask: np.ndarray
    response_mask: np.ndarray
    truncated: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())
    boundary_mismatch: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    def select(self, indices: Sequence[int] | np.ndarray) -> PairBatch:
        """The rows `indices` (in that order); `truncated` and `boundary_mismatch` renumbered to match."""
        idx = np.asarray(indices, dtype=np.int64)
        return PairBatch(
            tokens=np.asarray(self.tokens)[idx],
            attention_mask=np.asarray(self.attention_mask)[idx],
            response_mask=np.asarray(self.response_mask)[idx],
            truncated=_renumber(self.truncated, idx),
            boundary_mismatch=_renumber(self.boundary_mismatch, idx),
        )


@flax.struct.dataclass
class PreferenceBatch:
    """Preference triples (x, y+, y-): `chosen` and `rejected` share the prompts, row by row, and T."""

    chosen: PairBatch
    rejected: PairBatch

    @property
    def batch_size(self) -> int:
        return self.chosen.batch_size

    @property
    def truncated(self) -> tuple[int, ...]:
        """Rows whose (shared) prompt was cut to fit `max_length`."""
        return self.chosen.truncated

    def select(self, indices: Sequence[int] | np.ndarray) -> PreferenceBatch:
        """The rows `indices` of both sides."""
        return PreferenceBatch(chosen=self.chosen.select(indices), rejected=self.rejected.select(indices))


@flax.struct.dataclass
class ExgrmBatch:
    """EX-GRM inputs (docs/math.md §6.5): one user turn + generation prompt; read at the last real token.

    Attributes:
      tokens: int32 [B, T].
      attention_mask: int32 [B, T].
      truncated: rows whose question was cut from the left to fit `max_length` (static).
    """

    tokens: np.ndarray
    attention_mask: np.ndarray
    truncated: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]


def _renumber(rows: tuple[int, ...], idx: np.ndarray) -> tuple[int, ...]:
    marked = set(rows)
    return tuple(k for k, i in enumerate(idx.tolist()) if i in marked)


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------


def last_token_index(attention_mask: jax.Array | np.ndarray) -> jax.Array:
    """Position of the last real token of each row: where EX-RM and EX-GRM read (docs/math.md §1, §6.5).

    It is the position of the last 1 of the mask, so it is right for left and for right padding (the official
    code's `attention_mask.sum() - 1` is right only for right padding). A row without any 1 gives T - 1.

    Args:
      attention_mask: [B, T], 1 on real tokens.

    Returns:
      int32 [B].
    """
    mask = jnp.asarray(attention_mask)
    t = mask.shape[-1]
    return (t - 1 - jnp.argmax(jnp.flip(mask, axis=-1) > 0, axis=-1)).astype(jnp.int32)

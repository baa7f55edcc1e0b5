"""Final hidden states of a `Rows` batch: plain, from the cached output of frozen lower blocks, or packed.

Two exact speed-ups of training (checked against `LM.forward` in the tests): when the input embedding and the
blocks below some index are frozen (`last:K`), their output is computed once per sequence and cached
(`lower_hidden` / `upper_hidden`); and each pair's chosen and rejected sequences can run as one packed row that
holds their shared prompt once (`dynamics.packing`).
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp

from dynamics.masks import leaf_paths
from dynamics.models import LM, Params
from dynamics.packing import packed_attention_mask
from dynamics.training.rows import Rows

__all__ = ["frozen_prefix", "hidden_states", "lower_hidden", "packed_hidden", "packed_lower_hidden", "upper_hidden"]


def frozen_prefix(params: Params, mask: Any, n_layers: int) -> int:
    """How many lower blocks are frozen together with the input embedding (their output never changes).

    Returns:
      0 when the input embedding trains (e.g. `all` on a tied model), else the index of the lowest block with
      a trainable parameter (n_layers when no block trains, e.g. `head`).
    """
    start = n_layers
    for path, selected in zip(leaf_paths(params), jax.tree.leaves(mask), strict=True):
        group, _, rest = path.partition("/")
        if not selected or group != "lm":
            continue
        if rest.startswith("embed/"):
            return 0
        match = re.match(r"layers_(\d+)/", rest)
        if match:
            start = min(start, int(match.group(1)))
    return start


def lower_hidden(lm: LM, lm_params: Params, tokens: Any, mask: Any, stop: int) -> Any:
    """The residual stream [B, T, D] after the input embedding and blocks 0 … stop − 1 (`LM.lower`)."""
    return lm.lower(lm_params, tokens, mask, stop)


def packed_lower_hidden(lm: LM, lm_params: Params, rows: Rows, stop: int) -> Any:
    """The residual stream [b, P, D] of the packed rows after the input embedding and blocks 0 … stop − 1."""
    attn = _attention(rows)
    return lm.lower(lm_params, rows.pack_tokens, rows.pack_mask, stop, positions=rows.pack_positions, attn_mask=attn)


def upper_hidden(lm: LM, lm_params: Params, x: Any, mask: Any, start: int) -> Any:
    """The final hidden states h [B, T, D] from the residual stream after block start − 1 (`LM.upper`).

    upper_hidden(lower_hidden(tokens, k), k) equals `lm.forward(tokens)` for every k.
    """
    return lm.upper(lm_params, x, mask, start)


def hidden_states(lm: LM, lm_params: Params, rows: Rows, start: int) -> Any:
    """The final hidden states [B, T, D] of `rows`: from their packed pairs if present, else from the cached
    residual stream `rows.x` (blocks ≥ `start`) if present, else from the tokens."""
    if rows.packed:
        return _packed_hidden(lm, lm_params, rows, start)
    if rows.x is not None:
        return upper_hidden(lm, lm_params, rows.x, rows.attention_mask, start)
    return lm.forward(lm_params, rows.tokens, rows.attention_mask)


def _attention(rows: Rows) -> Any:
    return rows.pack_attn if rows.pack_attn is not None else packed_attention_mask(rows.pack_segment)


def packed_hidden(lm: LM, lm_params: Params, rows: Rows, start: int) -> Any:
    """The final hidden states [b, P, D] of the packed rows themselves (from their cached residual stream `x`,
    blocks ≥ `start`, if present)."""
    attn = _attention(rows)
    positions, mask = rows.pack_positions, rows.pack_mask
    if rows.x is not None:
        x = rows.x
        if rows.pack_source is not None:  # the cached residual stream of the rows, rearranged into the packed rows
            flat = jnp.reshape(x, (x.shape[0] * x.shape[1], x.shape[2]))
            x = flat[rows.pack_source]
        h = lm.upper(lm_params, x, mask, start, positions=positions, attn_mask=attn)
    else:
        h = lm.forward(lm_params, rows.pack_tokens, mask, positions=positions, attn_mask=attn)
    return h


def _packed_hidden(lm: LM, lm_params: Params, rows: Rows, start: int) -> Any:
    """The hidden states [B, T, D] of the rows, computed on their b packed rows: b pairs (B = 2b,
    `dynamics.packing`) or the many rows per packed row of `dynamics.training.packed_eval` (`pack_row`)."""
    h = packed_hidden(lm, lm_params, rows, start)
    b = h.shape[0]
    row = jnp.arange(2 * b) % b if rows.pack_row is None else rows.pack_row
    return h[row[:, None], rows.unpack_index]

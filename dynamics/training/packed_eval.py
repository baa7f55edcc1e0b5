"""Scoring many sequences that share prefixes: the evaluation sets of a run packed into shared-prefix rows.

An evaluation suite often scores many sequences per prompt: a preference set's chosen and rejected responses,
and the controlled Persona design's 7 openings × 16 answer words (docs/math.md §6.2.1), ~110 responses of a few
tokens after a prompt of ~70. Under causal attention a prefix's hidden states do not depend on what follows it,
so one packed row

    [ shared prefix s | tail of sequence 1 | tail of sequence 2 | … | padding ]
      positions 0…|s|−1  |s|…|y_1|−1          |s|…|y_2|−1

in which every token reads the shared prefix and its own tail (never another tail), with position ids that
restart after each tail, computes exactly the hidden states of the separate sequences, and runs the prefix once.
It is the many-tail form of the pair packing of `dynamics.packing` (same segment convention: 0 the shared
prefix, i ≥ 1 tail i, `SEGMENT_PAD` padding), and it is exact: the hidden states of a sequence equal its
unpacked ones up to float rounding (the tests compare them with `LM.forward`).

The sets are merged into one list and sorted by their tokens, so that sequences with a common prefix are
neighbours; `pack_plan` then fills rows greedily, each with at most `max_seqs` sequences and (when it holds more
than one) at most `max_len` positions. Every chunk has the same shapes (one packed row, `max_seqs` sequences of
the merged length T), so one program is compiled for the whole suite.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from dynamics.errors import DataError
from dynamics.packing import SEGMENT_PAD, SEGMENT_SHARED
from dynamics.training.rows import Rows, bucket_length, response_index

__all__ = ["MAX_PACKED_LENGTH", "PackedEval", "build_packed_eval", "pack_plan", "split_values"]

#: The longest packed row `build_packed_eval` fills (a longer single sequence gets a row of its own length):
#: attention grows as the square of a row, so rows of a few hundred positions keep it a small share of the pass.
MAX_PACKED_LENGTH = 512


@dataclasses.dataclass(frozen=True)
class PackedEval:
    """The sequences of several sets, merged, sorted and packed into chunks of one packed row each.

    Attributes:
      chunks: one `Rows` per chunk: tokens / attention_mask / response_mask [n, T] of its n = max_seqs sequences
        (right-padded; unused slots repeat the chunk's first sequence), the IM-RM's response positions when asked,
        pack_tokens / pack_mask / pack_positions / pack_segment [1, P], unpack_index [n, T] and pack_row [n].
      index: int64 [C, n], the merged row of each slot of each chunk (−1 for an unused slot).
      names: the sets, in merged order.
      offsets: int64 [len(names) + 1], set k holds merged rows offsets[k] … offsets[k + 1] − 1.
    """

    chunks: tuple[Rows, ...]
    index: np.ndarray
    names: tuple[str, ...]
    offsets: np.ndarray

    @property
    def n_rows(self) -> int:
        """The sequences of all sets."""
        return int(self.offsets[-1])

    def positions(self) -> int:
        """Positions one pass over every chunk runs (to compare with the sets' own rows × T)."""
        return sum(int(np.prod(c.pack_tokens.shape)) for c in self.chunks)


def _real(rows: Rows, name: str) -> list[np.ndarray]:
    """Each row's real tokens (one-sided padding: a contiguous run)."""
    out = []
    for r in range(rows.n_rows):
        where = np.flatnonzero(rows.attention_mask[r] > 0)
        if len(where) == 0:
            raise DataError(f"evaluation set {name!r} row {r} has no real token")
        if where[-1] - where[0] + 1 != len(where):
            raise DataError(f"evaluation set {name!r} row {r}: the real tokens are not contiguous")
        out.append(where)
    return out


def _lcp(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


def pack_plan(seqs: Sequence[np.ndarray], max_seqs: int, max_len: int) -> list[list[int]]:
    """Greedy rows over sequences in the given order: each row takes the next sequences while it holds at most
    `max_seqs` of them and its packed length (common prefix + every tail) stays ≤ `max_len` (a row of one
    sequence may be longer). Returns the sequence indices of each row, in order."""
    if max_seqs < 1:
        raise DataError(f"pack_plan: max_seqs must be ≥ 1, got {max_seqs}")
    rows: list[list[int]] = []
    members: list[int] = []
    prefix = total = 0
    for i, s in enumerate(seqs):
        if members:
            p = min(prefix, _lcp(seqs[members[-1]], s))
            length = p + (total - len(members) * p) + (len(s) - p)
            if len(members) < max_seqs and length <= max_len:
                members.append(i)
                prefix, total = p, total + len(s)
                continue
            rows.append(members)
        members, prefix, total = [i], len(s), len(s)
    if members:
        rows.append(members)
    return rows


def _prefix(seqs: Sequence[np.ndarray]) -> int:
    """The length of the longest common prefix of the sequences (all of a single one)."""
    s = len(seqs[0])
    for q in seqs[1:]:
        s = min(s, _lcp(seqs[0], q))
    return s


def _packed_length(seqs: Sequence[np.ndarray]) -> int:
    s = _prefix(seqs)
    return s + sum(len(q) - s for q in seqs)


def _pack_row(seqs: Sequence[np.ndarray], P: int, T: int):
    """The packed arrays of one row of sequences (tokens, mask, positions, segment [P]; index [k, T])."""
    s = _prefix(seqs)
    tokens, mask = np.zeros(P, np.int32), np.zeros(P, np.int32)
    positions, segment = np.zeros(P, np.int32), np.full(P, SEGMENT_PAD, np.int32)
    index = np.zeros((len(seqs), T), np.int32)
    tokens[:s], mask[:s], positions[:s], segment[:s] = seqs[0][:s], 1, np.arange(s), SEGMENT_SHARED
    at = s
    for k, q in enumerate(seqs):
        n = len(q) - s
        tokens[at : at + n], mask[at : at + n] = q[s:], 1
        positions[at : at + n], segment[at : at + n] = np.arange(s, len(q)), k + 1
        index[k, : len(q)] = np.where(np.arange(len(q)) < s, np.arange(len(q)), np.arange(len(q)) - s + at)
        at += n
    return tokens, mask, positions, segment, index


def build_packed_eval(
    sets: Mapping[str, Rows],
    max_seqs: int,
    bucket: int,
    *,
    response_positions: bool,
    max_len: int = MAX_PACKED_LENGTH,
) -> PackedEval:
    """The sets merged (right-padded to one length T), sorted by their tokens and packed (module docstring).

    Args:
      sets: the sequence sets; all with or all without a response_mask.
      max_seqs: sequences per packed row (and per chunk): the evaluation chunk of the unpacked path.
      bucket: T, the packed length P and the response positions are rounded up to multiples of this.
      response_positions: add the IM-RM's response positions (`response_index`) to each chunk.
      max_len: the longest packed row to fill (module docstring).

    Raises:
      DataError: no sets, a row without real tokens or with padding inside, or sets that disagree on having a
        response_mask.
    """
    if not sets:
        raise DataError("build_packed_eval: no evaluation sets")
    names = tuple(sets)
    has_response = {sets[n].response_mask is not None for n in names}
    if len(has_response) != 1:
        raise DataError("build_packed_eval: every set must have a response_mask, or none")
    seqs, resp = [], []
    for name in names:
        rows = sets[name]
        for r, where in enumerate(_real(rows, name)):
            seqs.append(np.asarray(rows.tokens[r, where], np.int32))
            resp.append(None if rows.response_mask is None else np.asarray(rows.response_mask[r, where], np.int32))
    offsets = np.cumsum([0] + [sets[n].n_rows for n in names]).astype(np.int64)
    order = sorted(range(len(seqs)), key=lambda i: seqs[i].tolist())
    plan = [[order[k] for k in row] for row in pack_plan([seqs[i] for i in order], max_seqs, max_len)]
    T = bucket_length(max(len(q) for q in seqs), bucket, 1 << 30)
    P = bucket_length(max(_packed_length([seqs[i] for i in row]) for row in plan), bucket, 1 << 30)
    chunks, index = [], np.full((len(plan), max_seqs), -1, np.int64)
    for c, row in enumerate(plan):
        index[c, : len(row)] = row
        slots = row + [row[0]] * (max_seqs - len(row))  # unused slots read the first sequence's positions
        tok, mask, pos, seg, unpack = _pack_row([seqs[i] for i in row], P, T)
        unpack = np.concatenate([unpack, np.repeat(unpack[:1], max_seqs - len(row), axis=0)])
        orig_tokens, orig_mask = np.zeros((max_seqs, T), np.int32), np.zeros((max_seqs, T), np.int32)
        orig_resp = None if resp[0] is None else np.zeros((max_seqs, T), np.int32)
        for k, i in enumerate(slots):
            orig_tokens[k, : len(seqs[i])], orig_mask[k, : len(seqs[i])] = seqs[i], 1
            if orig_resp is not None:
                orig_resp[k, : len(seqs[i])] = resp[i]
        chunk = Rows(orig_tokens, orig_mask, orig_resp, pack_tokens=tok[None], pack_mask=mask[None],
                     pack_positions=pos[None], pack_segment=seg[None], unpack_index=unpack,
                     pack_row=np.zeros(max_seqs, np.int32))  # fmt: skip
        chunks.append(response_index(chunk, bucket) if response_positions else chunk)
    return PackedEval(tuple(_same_response_width(chunks)), index, names, offsets)


def _same_response_width(chunks: list[Rows]) -> list[Rows]:
    """The chunks with their response positions padded to one width R (one compiled program for all)."""
    if chunks[0].resp_src is None:
        return chunks
    R = max(c.resp_src.shape[1] for c in chunks)

    def widen(a):
        return np.pad(a, ((0, 0), (0, R - a.shape[1])))

    return [c.replace(resp_src=widen(c.resp_src), resp_tgt=widen(c.resp_tgt), resp_valid=widen(c.resp_valid))
            for c in chunks]  # fmt: skip


def split_values(packed: PackedEval, per_chunk: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Per-sequence values of every chunk ([n] each, as `chunks` lays them out) back into their sets:
    {set name: float64 [rows]} in each set's own row order."""
    merged = np.zeros(packed.n_rows, np.float64)
    for c, values in enumerate(per_chunk):
        used = packed.index[c] >= 0
        merged[packed.index[c][used]] = np.asarray(values, np.float64)[used]
    o = packed.offsets
    return {name: merged[o[k] : o[k + 1]] for k, name in enumerate(packed.names)}

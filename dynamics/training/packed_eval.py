"""Scoring many sequences that share prefixes: the evaluation sets of a run packed into shared-prefix rows.

An evaluation suite often scores many sequences per prompt: a preference set's chosen and rejected responses,
and the controlled Persona design's 7 openings × 16 answer words (docs/math.md §6.2.1), ~110 responses of a few
tokens after a prompt of ~70. Under causal attention a prefix's hidden states do not depend on what follows it,
so the sequences of one packed row are laid out as their prefix tree (trie): every distinct prefix is one node,
a node's token at the position id of its depth, and a node reads exactly its ancestors and itself. Each
sequence's hidden states are those of the nodes on its path; they equal the hidden states of the sequence run
alone up to float rounding (the tests compare them with `LM.forward`). A prompt shared by many responses runs
once, and so does a response opening shared by several answer words. The pair packing of `dynamics.packing` is
the special case of two sequences.

The IM-RM's ln π(y|x) = Σ_k ln π(y_k | x, y<k) reads one log-softmax per response node (a node on the response of
several sequences is computed once) and sums them per sequence through an owner matrix.

The sets are merged into one list and sorted by their tokens, so that sequences with a common prefix are
neighbours; `pack_plan` then fills rows greedily, each with at most `max_seqs` sequences and (when it holds more
than one) at most `max_len` nodes. Every chunk has the same shapes (one packed row of P nodes, `max_seqs`
sequences of the merged length T, K response nodes), so one program is compiled for the whole suite.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from dynamics.errors import DataError
from dynamics.training.rows import Rows, bucket_length

__all__ = ["MAX_PACKED_LENGTH", "PackedEval", "build_packed_eval", "pack_plan", "split_values"]

#: The most nodes of a packed row `build_packed_eval` fills (a longer single sequence gets a row of its own):
#: attention grows as the square of a row, so rows of a few hundred positions keep it a small share of the pass.
MAX_PACKED_LENGTH = 512


@dataclasses.dataclass(frozen=True)
class PackedEval:
    """The sequences of several sets, merged, sorted and packed into chunks of one packed row each.

    Attributes:
      chunks: one `Rows` per chunk: tokens / attention_mask / response_mask [n, T] of its n = max_seqs sequences
        (right-padded; unused slots repeat the chunk's first sequence), the IM-RM's response positions when asked,
        pack_tokens / pack_mask / pack_positions [1, P], pack_attn [1, P, P], unpack_index [n, T], pack_row [n],
        and for an IM-RM resp_src / resp_tgt / resp_valid [1, K] and resp_owner [n, K].
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


def _new_nodes(earlier: Sequence[np.ndarray], seq: np.ndarray) -> int:
    """The trie nodes `seq` adds to the trie of `earlier`: its tokens after its longest prefix already there."""
    return len(seq) - max((_lcp(p, seq) for p in earlier), default=0)


def pack_plan(seqs: Sequence[np.ndarray], max_seqs: int, max_len: int) -> list[list[int]]:
    """Greedy rows over sequences in the given order: each row takes the next sequences while it holds at most
    `max_seqs` of them and its trie (every distinct prefix once) has at most `max_len` nodes (a row of one
    sequence may be longer). Returns the sequence indices of each row, in order."""
    if max_seqs < 1:
        raise DataError(f"pack_plan: max_seqs must be ≥ 1, got {max_seqs}")
    rows: list[list[int]] = []
    members: list[int] = []
    nodes = 0
    for i, s in enumerate(seqs):
        if members:
            new = _new_nodes([seqs[j] for j in members], s)
            if len(members) < max_seqs and nodes + new <= max_len:
                members.append(i)
                nodes += new
                continue
            rows.append(members)
        members, nodes = [i], len(s)
    if members:
        rows.append(members)
    return rows


@dataclasses.dataclass
class _Trie:
    """The prefix tree of one row's sequences: node v holds token[v] at depth[v] below parent[v] (−1: a root)."""

    token: list[int] = dataclasses.field(default_factory=list)
    parent: list[int] = dataclasses.field(default_factory=list)
    depth: list[int] = dataclasses.field(default_factory=list)
    children: list[dict[int, int]] = dataclasses.field(default_factory=list)
    roots: dict[int, int] = dataclasses.field(default_factory=dict)

    def insert(self, seq: np.ndarray) -> list[int]:
        """The node of each token of `seq` (new nodes where its prefix is new)."""
        path, here = [], self.roots
        for t, tok in enumerate(seq.tolist()):
            if tok not in here:
                here[tok] = len(self.token)
                self.token.append(tok)
                self.parent.append(path[-1] if path else -1)
                self.depth.append(t)
                self.children.append({})
            path.append(here[tok])
            here = self.children[path[-1]]
        return path


def _trie_row(seqs: Sequence[np.ndarray], resp: Sequence[np.ndarray | None], P: int, T: int):
    """The packed arrays of one row: its trie's nodes in creation order (a parent before its children).

    Returns (tokens, mask, positions [P]; attention [P, P], node s readable from node t iff s is t or one of its
    ancestors; index [k, T], each sequence's node per position; and, with response masks, (parents [K], nodes [K],
    owner [k, K]): the nodes at a response position ≥ 1 of some sequence, the parent whose hidden state predicts
    each, and 1 where the node is at a response position of that sequence).
    """
    trie = _Trie()
    paths = [trie.insert(q) for q in seqs]
    n = len(trie.token)
    tokens, mask, positions = np.zeros(P, np.int32), np.zeros(P, np.int32), np.zeros(P, np.int32)
    tokens[:n], mask[:n], positions[:n] = trie.token, 1, trie.depth
    attn = np.zeros((P, P), bool)
    for v in range(n):
        if trie.parent[v] >= 0:
            attn[v] = attn[trie.parent[v]]
        attn[v, v] = True
    index = np.zeros((len(seqs), T), np.int32)
    for k, path in enumerate(paths):
        index[k, : len(path)] = path
    if resp[0] is None:
        return tokens, mask, positions, attn, index, None
    owned = [{path[t] for t in np.flatnonzero(r[1:] > 0) + 1} for path, r in zip(paths, resp, strict=True)]
    nodes = sorted(set().union(*owned))
    owner = np.array([[v in own for v in nodes] for own in owned], np.float32).reshape(len(seqs), len(nodes))
    parents = np.asarray([trie.parent[v] for v in nodes], np.int32)  # ≥ 0: a response node has depth ≥ 1
    return tokens, mask, positions, attn, index, (parents, np.asarray(nodes, np.int32), owner)


def _trie_size(seqs: Sequence[np.ndarray]) -> int:
    return sum(_new_nodes(seqs[:i], q) for i, q in enumerate(seqs))


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
      bucket: T, the packed length P and the number of response nodes K are rounded up to multiples of this.
      response_positions: add the IM-RM's response nodes to each chunk: resp_src / resp_tgt / resp_valid [1, K]
        (the parent node whose hidden state predicts each response node, its token, 1 on real entries) and
        resp_owner [max_seqs, K], so that ln π(y|x) of slot i is Σ_v resp_owner[i, v] ln π(token_v | parent_v).
      max_len: the most trie nodes of a row (module docstring).

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
    P = bucket_length(max(_trie_size([seqs[i] for i in row]) for row in plan), bucket, 1 << 30)
    chunks, index = [], np.full((len(plan), max_seqs), -1, np.int64)
    for c, row in enumerate(plan):
        index[c, : len(row)] = row
        slots = row + [row[0]] * (max_seqs - len(row))  # unused slots read the first sequence's nodes
        chunks.append(_chunk([seqs[i] for i in slots], [resp[i] for i in slots], len(row), P, T,
                             response_positions))  # fmt: skip
    return PackedEval(tuple(_same_response_width(chunks, bucket)), index, names, offsets)


def _chunk(seqs, resp, used: int, P: int, T: int, response_positions: bool) -> Rows:
    """One chunk: the packed row of its `used` sequences, and every slot in the original layout."""
    tok, mask, pos, attn, unpack, response = _trie_row(seqs[:used], resp[:used], P, T)
    n = len(seqs)
    unpack = np.concatenate([unpack, np.repeat(unpack[:1], n - used, axis=0)])
    orig_tokens, orig_mask = np.zeros((n, T), np.int32), np.zeros((n, T), np.int32)
    orig_resp = None if resp[0] is None else np.zeros((n, T), np.int32)
    for k, q in enumerate(seqs):
        orig_tokens[k, : len(q)], orig_mask[k, : len(q)] = q, 1
        if orig_resp is not None:
            orig_resp[k, : len(q)] = resp[k]
    chunk = Rows(orig_tokens, orig_mask, orig_resp, pack_tokens=tok[None], pack_mask=mask[None],
                 pack_positions=pos[None], unpack_index=unpack, pack_row=np.zeros(n, np.int32),
                 pack_attn=attn[None])  # fmt: skip
    if not response_positions:
        return chunk
    if response is None:
        raise DataError("build_packed_eval: response positions need sets with a response_mask")
    parents, nodes, owner = response
    owner = np.concatenate([owner, np.repeat(owner[:1], n - used, axis=0)])
    return chunk.replace(resp_src=parents[None], resp_tgt=tok[nodes][None],
                         resp_valid=np.ones((1, len(nodes)), np.float32), resp_owner=owner)  # fmt: skip


def _same_response_width(chunks: list[Rows], bucket: int) -> list[Rows]:
    """The chunks with their response nodes padded to one width K (one compiled program for all)."""
    if chunks[0].resp_src is None:
        return chunks
    K = bucket_length(max(c.resp_src.shape[1] for c in chunks), bucket, 1 << 30)

    def widen(a):
        return np.pad(a, ((0, 0), (0, K - a.shape[1])))

    return [c.replace(resp_src=widen(c.resp_src), resp_tgt=widen(c.resp_tgt), resp_valid=widen(c.resp_valid),
                      resp_owner=widen(c.resp_owner)) for c in chunks]  # fmt: skip


def split_values(packed: PackedEval, per_chunk: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Per-sequence values of every chunk ([n] each, as `chunks` lays them out) back into their sets:
    {set name: float64 [rows]} in each set's own row order."""
    merged = np.zeros(packed.n_rows, np.float64)
    for c, values in enumerate(per_chunk):
        used = packed.index[c] >= 0
        merged[packed.index[c][used]] = np.asarray(values, np.float64)[used]
    o = packed.offsets
    return {name: merged[o[k] : o[k + 1]] for k, name in enumerate(packed.names)}

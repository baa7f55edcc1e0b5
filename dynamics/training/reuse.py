"""Reusing what runs of one process share: the frozen blocks' output and π_ref's log-probabilities.

`precompute` runs every training and evaluation sequence through the frozen blocks once (docs/math.md §6, the
frozen-block cache) and, for an IM-RM, through π_ref. Both depend only on the frozen parameters, the sequences and
the chunking, not on anything a run trains. A study that trains several runs of one model on one data set
(seeds, reward types: the controlled Persona design scores ~9,000 evaluation sequences per run) would otherwise
compute them again for every run. `reused` keeps the results of this process, keyed by a SHA-256 digest of every
input that enters the computation, and returns the same array when the key comes again. The arrays are read only.

At most `limit_bytes` are kept (the run's `cache_max_gb`); the oldest entries go first.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

__all__ = ["clear", "digest", "reused", "stats"]

_ENTRIES: OrderedDict[tuple, np.ndarray] = OrderedDict()
_STATS = {"hits": 0, "misses": 0}


def digest(*parts: Any) -> str:
    """SHA-256 over the parts: every array leaf of each part (pytrees included) by dtype, shape and bytes, and
    other values by repr. Two parts with equal digests give the same computation."""
    h = hashlib.sha256()
    for part in parts:
        for leaf in jax.tree.leaves(part):
            if hasattr(leaf, "dtype") and hasattr(leaf, "shape"):
                a = np.ascontiguousarray(np.asarray(leaf))
                h.update(f"{a.dtype}{a.shape}".encode())
                h.update(a.view(np.uint8).reshape(-1) if a.size else b"")
            else:
                h.update(repr(leaf).encode())
        h.update(b"|")
    return h.hexdigest()


def reused(key: tuple, compute: Callable[[], np.ndarray], limit_bytes: float, bar: Any = None, n: int = 0):
    """The array for `key`: kept from an earlier call of this process, or `compute()` (then kept while the kept
    arrays stay within `limit_bytes`). On reuse, `bar` (a tqdm bar) is advanced by `n`."""
    if key in _ENTRIES:
        _ENTRIES.move_to_end(key)
        _STATS["hits"] += 1
        if bar is not None:
            bar.update(n)
        return _ENTRIES[key]
    _STATS["misses"] += 1
    value = compute()
    if value.nbytes <= limit_bytes:
        _ENTRIES[key] = value
        while sum(v.nbytes for v in _ENTRIES.values()) > limit_bytes:
            _ENTRIES.popitem(last=False)
    return value


def stats() -> dict[str, int]:
    """Hits and misses of `reused` in this process, and the entries and bytes kept."""
    return {**_STATS, "entries": len(_ENTRIES), "bytes": sum(v.nbytes for v in _ENTRIES.values())}


def clear() -> None:
    """Forgets every kept array (and the counts)."""
    _ENTRIES.clear()
    _STATS.update(hits=0, misses=0)

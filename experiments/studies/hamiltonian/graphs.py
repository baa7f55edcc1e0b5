"""Hamiltonian-cycle graphs and their text (docs/math.md §6.1, the paper's Section 3.2): pure Python and numpy.

Graphs. Each graph has N vertices and a planted Hamiltonian cycle (Sec. IV.B of arXiv 2306.06523, as the
official code does): a random vertex permutation π gives the N cycle edges (π_i, π_{i+1 mod N}); every other
pair i < j is added independently with probability p; the edge list is shuffled. Edges are written (min, max).

Responses. y+ is the planted cycle (the permutation as sampled); y− is a uniformly random permutation that is
*not* a Hamiltonian cycle: permutations are drawn until one has a cyclically consecutive pair that is not an
edge (rejection sampling, so y− is uniform over the non-Hamiltonian permutations). The official code gives up
after 10 draws with an error; so does this one (`max_not_cycle_tries`), and it never returns a Hamiltonian y−.

Text, with two tokens the runs add to the tokenizer as special tokens (`experiments.studies.hamiltonian.data`):

    prompt   = "Vertices: <sep>0<sep>1<sep>…<sep>9\\nEdges: <sep>a<edge_sep>b<sep>c<edge_sep>d…"
    response = "v0<sep>v1<sep>…<sep>v9"

A generated response is correct iff it splits on `<sep>` into N distinct integers whose cyclically consecutive
pairs are all edges (`is_correct_generation`); `could_become_correct` is the exact prefix test for early stopping.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from dynamics.errors import DataError

__all__ = [
    "EDGE_SEP_TOKEN",
    "SEP_TOKEN",
    "HamiltonianGraph",
    "could_become_correct",
    "cycle_response",
    "generate_graphs",
    "graph_prompt",
    "is_correct_generation",
    "is_hamiltonian_cycle",
    "make_graph",
    "non_cycle_permutation",
    "parse_cycle",
    "planted_cycle_graph",
]

SEP_TOKEN = "<sep>"
EDGE_SEP_TOKEN = "<edge_sep>"


# ----------------------------------------------------------------------------------------------------------
# Graphs
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HamiltonianGraph:
    """One graph with a planted Hamiltonian cycle, and its preference pair (docs/math.md §6.1).

    Attributes:
      n_vertices: N; the vertices are 0 … N − 1.
      edges: the edges (min, max), in shuffled order (the prompt lists them in this order).
      cycle: y+, the planted Hamiltonian cycle (a vertex permutation).
      not_cycle: y−, a vertex permutation that is not a Hamiltonian cycle of this graph.
    """

    n_vertices: int
    edges: tuple[tuple[int, int], ...]
    cycle: tuple[int, ...]
    not_cycle: tuple[int, ...]

    @property
    def edge_set(self) -> frozenset[tuple[int, int]]:
        return frozenset(self.edges)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_vertices": self.n_vertices,
            "edges": [list(e) for e in self.edges],
            "cycle": list(self.cycle),
            "not_cycle": list(self.not_cycle),
        }


def _edge(a: int, b: int) -> tuple[int, int]:
    return (min(a, b), max(a, b))


def is_hamiltonian_cycle(order: Sequence[int], edges: Any, n_vertices: int) -> bool:
    """Whether `order` visits each of the N vertices once and every cyclically consecutive pair is an edge.

    Args:
      order: a vertex sequence.
      edges: a collection of (min, max) edges.
      n_vertices: N.

    Returns:
      True iff `order` is a permutation of 0 … N − 1 and (order_i, order_{i+1 mod N}) is an edge for every i.
    """
    edge_set = {_edge(int(a), int(b)) for a, b in edges}
    order = [int(v) for v in order]
    if len(order) != n_vertices or sorted(order) != list(range(n_vertices)):
        return False
    return all(_edge(order[i], order[(i + 1) % n_vertices]) in edge_set for i in range(n_vertices))


def planted_cycle_graph(
    n_vertices: int, edge_p: float, rng: np.random.Generator
) -> tuple[tuple[tuple[int, int], ...], tuple[int, ...]]:
    """A random graph with a planted Hamiltonian cycle (Sec. IV.B of arXiv 2306.06523).

    Args:
      n_vertices: N ≥ 3.
      edge_p: probability of each non-cycle edge.
      rng: the random stream (consumed: the cycle permutation, one uniform per non-cycle pair, the shuffle).

    Returns:
      (edges as (min, max) in shuffled order, the planted cycle).
    """
    cycle = tuple(int(v) for v in rng.permutation(n_vertices))
    edges = [_edge(cycle[i], cycle[(i + 1) % n_vertices]) for i in range(n_vertices)]
    planted = set(edges)
    for i, j in itertools.combinations(range(n_vertices), 2):
        if (i, j) not in planted and rng.random() < edge_p:
            edges.append((i, j))
    order = rng.permutation(len(edges))
    return tuple(edges[int(k)] for k in order), cycle


def non_cycle_permutation(
    n_vertices: int, edges: Any, rng: np.random.Generator, max_tries: int = 10
) -> tuple[int, ...]:
    """A uniformly random vertex permutation that is not a Hamiltonian cycle (rejection sampling).

    Args:
      n_vertices: N.
      edges: the graph's edges.
      rng: the random stream.
      max_tries: permutations to draw before giving up (the official code: 10).

    Returns:
      The permutation; some cyclically consecutive pair of it is not an edge.

    Raises:
      DataError: the graph is complete (every permutation is a Hamiltonian cycle), or `max_tries` draws were
        all Hamiltonian cycles.
    """
    edge_set = {_edge(int(a), int(b)) for a, b in edges}
    if len(edge_set) >= n_vertices * (n_vertices - 1) // 2:
        raise DataError(f"the graph on {n_vertices} vertices is complete: every permutation is a Hamiltonian cycle")
    for _ in range(max_tries):
        perm = tuple(int(v) for v in rng.permutation(n_vertices))
        if not is_hamiltonian_cycle(perm, edge_set, n_vertices):
            return perm
    raise DataError(
        f"{max_tries} random permutations were all Hamiltonian cycles of a graph with {len(edge_set)} edges; "
        "lower edge_p or raise max_not_cycle_tries"
    )


def make_graph(n_vertices: int, edge_p: float, rng: np.random.Generator, max_tries: int = 10) -> HamiltonianGraph:
    """One graph with its planted cycle (y+) and a non-Hamiltonian permutation (y−), from one random stream."""
    edges, cycle = planted_cycle_graph(n_vertices, edge_p, rng)
    return HamiltonianGraph(n_vertices, edges, cycle, non_cycle_permutation(n_vertices, edges, rng, max_tries))


def generate_graphs(
    count: int, n_vertices: int, edge_p: float, rng: np.random.Generator, max_tries: int = 10
) -> tuple[HamiltonianGraph, ...]:
    """`count` graphs drawn one after the other from `rng` (docs/math.md §6.1)."""
    return tuple(make_graph(n_vertices, edge_p, rng, max_tries) for _ in range(count))


# ----------------------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------------------


def graph_prompt(graph: HamiltonianGraph) -> str:
    """'Vertices: <sep>0<sep>1…\\nEdges: <sep>a<edge_sep>b<sep>…' (the official text format)."""
    vertices = f"Vertices: {SEP_TOKEN}" + SEP_TOKEN.join(str(v) for v in range(graph.n_vertices))
    edges = f"Edges: {SEP_TOKEN}" + SEP_TOKEN.join(f"{a}{EDGE_SEP_TOKEN}{b}" for a, b in graph.edges)
    return f"{vertices}\n{edges}"


def cycle_response(order: Sequence[int]) -> str:
    """'v0<sep>v1<sep>…': a vertex sequence as a response."""
    return SEP_TOKEN.join(str(int(v)) for v in order)


_NUMBER = re.compile(r"[0-9]+")


def parse_cycle(text: str, n_vertices: int) -> tuple[int, ...] | None:
    """The vertex sequence of a response, or None unless it is N distinct integers separated by `<sep>`.

    No whitespace is allowed around the numbers (the official checker's `str.isdigit`).
    """
    parts = text.split(SEP_TOKEN)
    if len(parts) != n_vertices or not all(_NUMBER.fullmatch(p) for p in parts):
        return None
    order = tuple(int(p) for p in parts)
    return order if len(set(order)) == n_vertices else None


def is_correct_generation(text: str, graph: HamiltonianGraph) -> bool:
    """Whether a generated response is a Hamiltonian cycle of `graph` (docs/math.md §6.1's generation test)."""
    order = parse_cycle(text, graph.n_vertices)
    return order is not None and is_hamiltonian_cycle(order, graph.edges, graph.n_vertices)


def could_become_correct(text: str, n_vertices: int) -> bool:
    """Whether some continuation of `text` could still be N integers separated by `<sep>`.

    False once the text has a character outside digits and `<sep>`, an empty or repeated number, a number
    ≥ N, or too many numbers. It is a prefix test, so it is exact for early stopping: a continuation only
    appends text, and no continuation of a False text is correct.
    """
    parts = text.split(SEP_TOKEN)
    complete, tail = parts[:-1], parts[-1]
    if len(parts) > n_vertices or not all(_NUMBER.fullmatch(p) for p in complete):
        return False
    numbers = [int(p) for p in complete]
    if len(set(numbers)) != len(numbers) or any(v >= n_vertices for v in numbers):
        return False
    digits = tail[: len(tail) - len(tail.lstrip("0123456789"))]
    rest = tail[len(digits) :]
    if not rest:
        return True
    # "3<se…": the separator is being spelled out; it needs a number before it and room for one more number.
    return SEP_TOKEN.startswith(rest) and digits != "" and len(parts) < n_vertices

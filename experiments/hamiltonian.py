"""Hamiltonian-cycle verification (docs/math.md §6.1, the paper's Section 3.2): verifying is not generating.

Graphs. Each graph has N vertices and a planted Hamiltonian cycle (Sec. IV.B of arXiv 2306.06523, as the
official code does): a random vertex permutation π gives the N cycle edges (π_i, π_{i+1 mod N}); every other
pair i < j is added independently with probability p; the edge list is shuffled. Edges are written (min, max).

Responses. y+ is the planted cycle (the permutation as sampled); y− is a uniformly random permutation that is
*not* a Hamiltonian cycle: permutations are drawn until one has a cyclically consecutive pair that is not an
edge (rejection sampling, so y− is uniform over the non-Hamiltonian permutations). The official code gives up
after 10 draws with an error; so does this one (`max_not_cycle_tries`), and it never returns a Hamiltonian y−.

Randomness. numpy's PCG64 (`default_rng(data_seed)`), not the official torch stream, so the graphs are not the
paper's (docs/math.md §6.1 uses a torch generator seeded 982). Train graphs are drawn first, then test graphs;
the training-set evaluation uses `n_train_eval` training graphs picked with `default_rng(eval_seed)` (the
official code: 200 of the 1,000, seed 517).

Text, with two tokens added to the tokenizer as special tokens (never split) and rows added to the embeddings:

    prompt   = "Vertices: <sep>0<sep>1<sep>…<sep>9\\nEdges: <sep>a<edge_sep>b<sep>c<edge_sep>d…"
    response = "v0<sep>v1<sep>…<sep>v9"

Generation test (IM-RM only; docs/math.md §6.1). One sample per prompt from π_θ (temperature 1, no top-k, top-p 1,
at most 300 new tokens, `dynamics.sampling.sample`), decoded with the tokenizer's special tokens removed except
`<sep>`/`<edge_sep>` (the official code adds those two as ordinary tokens and decodes with
skip_special_tokens=True); correct iff it splits on `<sep>` into N distinct integers whose cyclically consecutive
pairs are all edges. A row stops early once its text can no longer become correct (exact: text only grows).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dynamics.errors import ConfigError, DataError
from dynamics.reward_types import reward_label
from experiments.config import MODEL_KEYS, run_mesh, train_config, validate_training_keys

__all__ = [
    "EDGE_SEP_TOKEN",
    "HAMILTONIAN_KEYS",
    "PAPER_TABLE",
    "SEP_TOKEN",
    "GenerationResult",
    "HamiltonianData",
    "HamiltonianGraph",
    "add_graph_tokens",
    "could_become_correct",
    "cycle_response",
    "format_table",
    "generate_graphs",
    "generation_test",
    "graph_prompt",
    "hamiltonian_data",
    "hamiltonian_table",
    "is_correct_generation",
    "is_hamiltonian_cycle",
    "make_graph",
    "non_cycle_permutation",
    "parse_cycle",
    "planted_cycle_graph",
    "run",
    "table",
    "validate",
]

SEP_TOKEN = "<sep>"
EDGE_SEP_TOKEN = "<edge_sep>"

#: Data and generation options of the plan (experiments/configs/hamiltonian.toml).
HAMILTONIAN_KEYS = (
    "n_vertices",
    "edge_p",
    "n_train",
    "n_test",
    "n_train_eval",
    "data_seed",
    "eval_seed",
    "max_not_cycle_tries",
    "generation",
    "gen_n_train",
    "gen_n_test",
    "gen_max_new_tokens",
    "gen_temperature",
    "gen_batch_size",
    "gen_seed",
)

#: docs/math.md §6.1's table (pythia-1b, 1,000 train / 200 test graphs).
PAPER_TABLE = {
    "train/rewards/accuracies": {"EX-RM": 1.0, "IM-RM": 1.0},
    "test/rewards/accuracies": {"EX-RM": 0.980, "IM-RM": 0.993},
    "generation/train/accuracy": {"EX-RM": None, "IM-RM": 0.0},
    "generation/test/accuracy": {"EX-RM": None, "IM-RM": 0.0},
}
TABLE_ROWS = (
    ("train/rewards/accuracies", "Train accuracy"),
    ("test/rewards/accuracies", "Test accuracy"),
    ("generation/train/accuracy", "Correct generations (train prompts)"),
    ("generation/test/accuracy", "Correct generations (test prompts)"),
)


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


# ----------------------------------------------------------------------------------------------------------
# Data of a run
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HamiltonianData:
    """The graphs of a run.

    Attributes:
      train: training graphs.
      test: test graphs.
      train_eval: indices into `train` of the graphs the training accuracy (and generation test) uses.
      info: how they were made, recorded in config.json.
    """

    train: tuple[HamiltonianGraph, ...]
    test: tuple[HamiltonianGraph, ...]
    train_eval: tuple[int, ...]
    info: Mapping[str, Any]

    @staticmethod
    def rows(graphs: Sequence[HamiltonianGraph]) -> list[dict[str, str]]:
        """Preference rows {"prompt", "chosen", "rejected"} of graphs."""
        return [
            {"prompt": graph_prompt(g), "chosen": cycle_response(g.cycle), "rejected": cycle_response(g.not_cycle)}
            for g in graphs
        ]


def _positive_int(values: Mapping[str, Any], key: str, what: str) -> int:
    value = values[key]
    if value < 1:
        raise DataError(f"{what} has no rows ({key}={value})")
    return value


def hamiltonian_data(values: Mapping[str, Any]) -> HamiltonianData:
    """Draws the graphs of a run (numpy PCG64 seeded `data_seed`: train graphs, then test graphs).

    Raises:
      DataError: an empty training or evaluation set, or a y− that cannot be drawn.
      ConfigError: N < 3, p outside [0, 1], a bad try count.
    """
    n, p = values["n_vertices"], values["edge_p"]
    if n < 3:
        raise ConfigError(f"n_vertices must be >= 3, got {n}")
    if not 0.0 <= p <= 1.0:
        raise ConfigError(f"edge_p must be in [0, 1], got {p}")
    if values["max_not_cycle_tries"] < 1:
        raise ConfigError(f"max_not_cycle_tries must be >= 1, got {values['max_not_cycle_tries']}")
    n_train = _positive_int(values, "n_train", "the training set")
    n_test = _positive_int(values, "n_test", "the evaluation set of test graphs")
    n_eval = _positive_int(values, "n_train_eval", "the evaluation set of training graphs")
    rng = np.random.default_rng(values["data_seed"])
    tries = values["max_not_cycle_tries"]
    train = generate_graphs(n_train, n, p, rng, tries)
    test = generate_graphs(n_test, n, p, rng, tries)
    pick = np.random.default_rng(values["eval_seed"]).permutation(n_train)[: min(n_eval, n_train)]
    info = {
        "experiment": "hamiltonian",
        "rng": "numpy PCG64 default_rng(data_seed): train graphs, then test graphs (not the official torch stream)",
        "mean_edges": float(np.mean([len(g.edges) for g in train + test])),
        **{k: values[k] for k in HAMILTONIAN_KEYS},
    }
    return HamiltonianData(train, test, tuple(int(i) for i in np.sort(pick)), info)


def add_graph_tokens(loaded: Any) -> tuple[Any, Any, Any, tuple[int, int]]:
    """A tokenizer copy with `<sep>` and `<edge_sep>` added as special tokens, and the model with rows for them.

    New rows (and rows the model had as padding beyond the tokenizer, as Pythia does) are set to the mean of
    the rows of the original tokens, as transformers' `resize_token_embeddings` initializes new rows.

    Args:
      loaded: a `dynamics.loading.Loaded` (not changed).

    Returns:
      (tokenizer, lm, params, (sep_id, edge_sep_id)).
    """
    import jax.numpy as jnp

    from dynamics.models import resize_vocab

    tok = loaded.tokenizer.copy()
    old = tok.vocab_size
    ids = tuple(tok.add_special_tokens([SEP_TOKEN, EDGE_SEP_TOKEN]))
    lm, params = resize_vocab(loaded.lm, loaded.params, max(loaded.lm.config.vocab_size, tok.vocab_size))
    new = [i for i in ids if i >= old]
    if new:
        params = dict(params)
        for group, name in (("embed", "embedding"), ("lm_head", "w")):
            if group in params:
                W = params[group][name]
                params[group] = {name: W.at[jnp.asarray(new)].set(W[:old].mean(0))}
    return tok, lm, params, (int(ids[0]), int(ids[1]))


# ----------------------------------------------------------------------------------------------------------
# Generation test
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """The IM-RM generation test on one set of prompts (docs/math.md §6.1).

    Attributes:
      n: prompts.
      correct: prompts whose sample is a Hamiltonian cycle of their graph.
      stop_reasons: how many rows ended at a stop token, by the early exit, or at the length limit.
      examples: the first few samples (text, correct).
      settings: max_new_tokens, temperature, seed.
    """

    n: int
    correct: int
    stop_reasons: Mapping[str, int]
    examples: tuple[Mapping[str, Any], ...]
    settings: Mapping[str, Any]

    @property
    def accuracy(self) -> float:
        """Fraction of prompts with a correct sample."""
        return self.correct / self.n

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "correct": self.correct,
            "accuracy": self.accuracy,
            "stop_reasons": dict(self.stop_reasons),
            "examples": [dict(e) for e in self.examples],
            "settings": dict(self.settings),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


def _stop_ids(tokenizer: Any) -> list[int]:
    """The chat template's end-of-turn token (first closing token after a response) and EOS."""
    from dynamics.rho import closing_token_count
    from dynamics.text import split_prompt_response

    _, response = split_prompt_response(tokenizer, "Question?", "Alpha")
    ids = tokenizer.encode(response, add_special_tokens=False)
    stops = {ids[len(ids) - closing_token_count(tokenizer)]} if closing_token_count(tokenizer) else set()
    if tokenizer.eos_id is not None:
        stops.add(tokenizer.eos_id)
    return sorted(stops)


def _text(tokenizer: Any, ids: Sequence[int], keep: set[int], special: set[int]) -> str:
    return tokenizer.decode([i for i in ids if i in keep or i not in special])


def generation_test(
    lm: Any,
    params: Any,
    tokenizer: Any,
    graphs: Sequence[HamiltonianGraph],
    *,
    max_new_tokens: int = 300,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    n_examples: int = 3,
) -> GenerationResult:
    """Samples one response per graph prompt from π_θ and checks it (docs/math.md §6.1).

    Args:
      lm: the model (π_θ: the IM-RM's language model after training).
      params: its parameters.
      tokenizer: the tokenizer with `<sep>` / `<edge_sep>`.
      graphs: the graphs whose prompts are sampled.
      max_new_tokens: the length limit (300 in the paper).
      temperature: τ (1 in the paper).
      seed: the sampling seed.
      batch_size: prompts per forward pass.
      n_examples: samples kept in the result for inspection.

    Returns:
      A `GenerationResult`.
    """
    from dynamics.sampling import sample
    from dynamics.text import split_prompt_response

    keep = {tokenizer.token_to_id(SEP_TOKEN), tokenizer.token_to_id(EDGE_SEP_TOKEN)}
    special = {tokenizer.token_to_id(t) for t in tokenizer.special_tokens}
    prompts = [
        tokenizer.encode(split_prompt_response(tokenizer, graph_prompt(g), "0")[0], add_special_tokens=False)
        for g in graphs
    ]
    n_vertices = graphs[0].n_vertices
    result = sample(
        lm,
        params,
        prompts,
        max_new_tokens=max_new_tokens,
        stop_ids=_stop_ids(tokenizer),
        pad_id=tokenizer.pad_id,
        temperature=temperature,
        seed=seed,
        batch_size=batch_size,
        keep_going=lambda ids: could_become_correct(_text(tokenizer, ids, keep, special), n_vertices),
    )
    texts = [_text(tokenizer, ids, keep, special) for ids in result.tokens]
    ok = [is_correct_generation(t, g) for t, g in zip(texts, graphs, strict=True)]
    reasons = {r: result.stop_reason.count(r) for r in ("stop_token", "keep_going", "max_new_tokens")}
    examples = tuple({"text": t, "correct": c} for t, c in list(zip(texts, ok, strict=True))[:n_examples])
    settings = {"max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed, "steps": result.steps}
    return GenerationResult(len(graphs), int(sum(ok)), reasons, examples, settings)


# ----------------------------------------------------------------------------------------------------------
# Plan plumbing (the `experiment` command's runner protocol)
# ----------------------------------------------------------------------------------------------------------


def validate(values: Mapping[str, Any]) -> None:
    """Checks the keys, the options, the graphs and that the model exists, before any model loads or trains.

    Raises:
      ConfigError: an unknown or missing key, a bad option.
      DataError: an empty training or evaluation set, a y− that cannot be drawn.
      ModelError: the model path does not exist.
    """
    from dynamics.models import resolve_model_source

    validate_training_keys("hamiltonian", values, HAMILTONIAN_KEYS)
    for key in ("gen_max_new_tokens", "gen_batch_size"):
        if values[key] < 1:
            raise ConfigError(f"{key} must be >= 1, got {values[key]}")
    if values["gen_n_train"] < 0 or values["gen_n_test"] < 0 or not values["gen_temperature"] > 0:
        raise ConfigError("gen_n_train and gen_n_test must be >= 0 and gen_temperature > 0")
    hamiltonian_data(values)
    resolve_model_source(values["model"])


def _write_generation(run_dir: Path, result: Any, generation: Mapping[str, GenerationResult]) -> Any:
    """Adds the generation accuracies to the run's final evaluation (summary.json and the returned result)."""
    from dynamics.outputs import write_json_atomic

    extra = {}
    for split, g in generation.items():
        extra[f"generation/{split}/accuracy"] = g.accuracy
        extra[f"generation/{split}/n"] = float(g.n)
    write_json_atomic(run_dir / "generation.json", {split: g.to_dict() for split, g in generation.items()})
    result = dataclasses.replace(result, final_eval={**result.final_eval, **extra})
    write_json_atomic(run_dir / "summary.json", result.to_dict())
    return result


def run(
    values: Mapping[str, Any],
    run_dir: str | os.PathLike,
    *,
    resume: bool = False,
    progress: bool = True,
    loaded: Any = None,
):
    """Draws the graphs, trains the reward model and, for an IM-RM, runs the generation test (docs/math.md §6.1).

    Args:
      values: the run's resolved plan keys.
      run_dir: the run directory (config.json, metrics.jsonl, summary.json, generation.json, checkpoints/).
      resume: continue from its last checkpoint.
      progress: progress bar.
      loaded: an already loaded model for values["model"] (not changed), else it is loaded.

    Returns:
      The `dynamics.train.TrainResult`; for an IM-RM its final evaluation also holds
      "generation/{train,test}/accuracy".
    """
    from dynamics.loading import load
    from dynamics.text import encode_preferences
    from dynamics.train import EvalSuite, train

    config = train_config(values)
    data = hamiltonian_data(values)
    if loaded is None:
        loaded = load(values["model"], dtype=values["dtype"])
    tok, lm, params, token_ids = add_graph_tokens(loaded)
    enc = {"max_length": values["max_length"], "truncate": values["truncate"], "pad_to": values["bucket_pad"] or None}
    train_rows = HamiltonianData.rows(data.train)
    eval_train = [train_rows[i] for i in data.train_eval]
    batches = {
        "train": encode_preferences(tok, eval_train, **enc),
        "test": encode_preferences(tok, HamiltonianData.rows(data.test), **enc),
    }
    run_path = Path(run_dir)
    run_path.mkdir(parents=True, exist_ok=True)
    model_info = {**loaded.describe(), "dtype": values["dtype"], "model_option": values["model"]}
    model_info.update({"vocab_size": lm.config.vocab_size, "graph_tokens": {SEP_TOKEN: token_ids[0],
                       EDGE_SEP_TOKEN: token_ids[1]}})  # fmt: skip
    result = train(
        config,
        lm,
        params,
        encode_preferences(tok, train_rows, **enc),
        EvalSuite.from_preferences(batches),
        run_dir=run_path,
        resume=resume,
        model_info=model_info,
        data_info={**data.info, "train_eval_rows": list(data.train_eval), **{k: values[k] for k in MODEL_KEYS}},
        progress=progress,
        mesh=run_mesh(values),
    )
    if config.reward in ("im", "im-noref") and values["generation"]:
        # Training prompts: the evaluation subset first, then the other training graphs (the official code
        # samples for all training prompts: gen_n_train = n_train).
        order = list(data.train_eval) + [i for i in range(len(data.train)) if i not in set(data.train_eval)]
        graphs = {
            "train": [data.train[i] for i in order[: values["gen_n_train"]]],
            "test": list(data.test[: values["gen_n_test"]]),
        }
        generation = {}
        for split, chosen in graphs.items():
            if not chosen:
                continue
            generation[split] = generation_test(
                lm,
                result.params["lm"],
                tok,
                chosen,
                max_new_tokens=values["gen_max_new_tokens"],
                temperature=values["gen_temperature"],
                seed=values["gen_seed"],
                batch_size=values["gen_batch_size"],
            )
            g = generation[split]
            print(f"   generation ({split} prompts): {g.correct}/{g.n} correct, stops {dict(g.stop_reasons)}")
        result = _write_generation(run_path, result, generation)
    return result


def hamiltonian_table(final_evals: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """The paper's Hamiltonian table (docs/math.md §6.1): one column per run, and the paper's numbers beside.

    Args:
      final_evals: column label (e.g. "EX-RM", "IM-RM") → final evaluation metrics of that run.

    Returns:
      {"columns": [labels..., "paper EX-RM", "paper IM-RM"], "rows": [{"metric", <column>: value or None}]}.
    """
    columns = list(final_evals) + ["paper EX-RM", "paper IM-RM"]
    rows = []
    for key, label in TABLE_ROWS:
        row: dict[str, Any] = {"metric": label}
        for name, metrics in final_evals.items():
            row[name] = metrics.get(key)
        row["paper EX-RM"] = PAPER_TABLE[key]["EX-RM"]
        row["paper IM-RM"] = PAPER_TABLE[key]["IM-RM"]
        rows.append(row)
    return {"columns": columns, "rows": rows}


def table(plan: Any, finals: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """The Hamiltonian table of a plan's runs, a column per run (labelled by reward when only it varies)."""
    only_reward = [a for a, v in plan.grid.items() if len(v) > 1] in (["reward"], [])  # [] : a collapsed grid
    columns = {}
    for spec in plan.runs():
        if spec.name in finals:
            label = reward_label(spec.values["reward"]) if only_reward else spec.name
            columns[label] = finals[spec.name]
    return hamiltonian_table(columns)


def format_table(table: Mapping[str, Any]) -> str:
    """The table as aligned text ("-" where a value does not apply)."""
    cols = table["columns"]
    lines = [f"{'':<38}" + " ".join(f"{c:>14}" for c in cols)]
    for row in table["rows"]:
        cells = " ".join(f"{row[c]:>14.3f}" if row.get(c) is not None else f"{'-':>14}" for c in cols)
        lines.append(f"{row['metric']:<38}{cells}")
    return "\n".join(lines)

"""The data of a Hamiltonian run (docs/math.md §6.1): its graphs, and the tokenizer and model with the graph tokens.

Randomness. numpy's PCG64 (`default_rng(data_seed)`), not the official torch stream, so the graphs are not the
paper's (docs/math.md §6.1 uses a torch generator seeded 982). Train graphs are drawn first, then test graphs;
the training-set evaluation uses `n_train_eval` training graphs picked with `default_rng(eval_seed)` (the
official code: 200 of the 1,000, seed 517).

`<sep>` and `<edge_sep>` are added to a copy of the tokenizer as special tokens (never split), with rows added to
the embeddings (`add_graph_tokens`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dynamics.errors import ConfigError, DataError
from experiments.studies.hamiltonian.graphs import (
    EDGE_SEP_TOKEN,
    SEP_TOKEN,
    HamiltonianGraph,
    cycle_response,
    generate_graphs,
    graph_prompt,
)

__all__ = ["HAMILTONIAN_KEYS", "HamiltonianData", "add_graph_tokens", "hamiltonian_data"]

#: Data and generation options of the plan (experiments/plans/hamiltonian.toml).
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

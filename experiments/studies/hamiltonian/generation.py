"""The IM-RM generation test of the Hamiltonian experiment (docs/math.md §6.1): verifying is not generating.

One sample per prompt from π_θ (temperature 1, no top-k, top-p 1, at most 300 new tokens,
`dynamics.sampling.sample`), decoded with the tokenizer's special tokens removed except `<sep>`/`<edge_sep>` (the
official code adds those two as ordinary tokens and decodes with skip_special_tokens=True); correct iff it is a
Hamiltonian cycle of its graph (`experiments.studies.hamiltonian.graphs.is_correct_generation`). A row stops
early once its text can no longer become correct (exact: text only grows).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from experiments.studies.hamiltonian.graphs import (
    EDGE_SEP_TOKEN,
    SEP_TOKEN,
    HamiltonianGraph,
    could_become_correct,
    graph_prompt,
    is_correct_generation,
)

__all__ = ["GenerationResult", "generation_test"]


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

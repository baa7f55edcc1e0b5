"""Inputs of the one-step studies (docs/math.md §1, §3): reward models of a loaded LM, encoded triples and pairs.

Shared by the one-step commands (`rmdyn delta`, `rho`, `check-step`), the demo (`experiments.studies.demo`) and
the `bench delta` benchmark. A sequence over the model's context is a DataError that names the triple or pair as
the user gave it ("--pair #2", "--train FILE line 7", "the Persona demo triple"), since these computations do not
truncate.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

__all__ = [
    "DEFAULT_BETA",
    "describe_pairs",
    "describe_rows",
    "encode",
    "encode_triples",
    "encode_unseen",
    "pair_label",
    "pair_name",
    "reward_model",
    "row_name",
    "tiny_loaded",
]

DEFAULT_BETA = 0.01  # the IM-RM's β of the one-step commands (docs/math.md §1)


def pair_label(pair: Any, width: int = 0) -> str:
    """The pair's label, or its response."""
    text = pair.label if getattr(pair, "label", None) else pair.response
    return text if not width or len(text) <= width else text[: width - 1] + "…"


@functools.lru_cache(maxsize=1)
def tiny_loaded() -> Any:
    """A tiny random Llama-family LM with the default model's tokenizer (hidden --tiny; for tests and smoke runs)."""
    import jax

    from dynamics.loading import Loaded
    from dynamics.models import LM, DecoderConfig, default_model_path
    from dynamics.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(default_model_path())
    config = DecoderConfig(
        family="llama", vocab_size=tokenizer.vocab_size, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2,
        head_dim=4, d_ff=24, tie_embeddings=True, max_position=512,
    )  # fmt: skip
    lm = LM(config)
    params = jax.tree.map(lambda x: x * 20 if x.ndim == 2 else x, lm.init(jax.random.PRNGKey(0)))
    return Loaded(lm, params, tokenizer, "tiny", "tiny random LM (d=16, 2 blocks) + default tokenizer")


def reward_model(kind: str, loaded: Any, *, beta: float = DEFAULT_BETA, seed: int = 0) -> tuple[Any, Any]:
    """(reward model, params) of kind "ex" (head u ~ N(0, 0.02²) from `seed`, or the checkpoint's own score head)
    or "im" (π_ref = the model, or the reference checkpoint of `loaded.with_reference`)."""
    import jax.numpy as jnp

    from dynamics.rewards import ExplicitRM, make_reward_model

    rm = make_reward_model(kind, loaded.lm, beta=beta)
    if isinstance(rm, ExplicitRM):
        params = rm.init(loaded.params, seed)
        score = getattr(loaded, "score_head", None)
        if score is not None:  # a trained reward model (sequence-classification checkpoint): its own head
            params["head"]["u"] = jnp.asarray(score, params["head"]["u"].dtype)
        return rm, params
    return rm, rm.init(loaded.params, getattr(loaded, "ref_params", None))


def row_name(row: Any) -> str:
    """How the CLI names a training triple: by its flags, its --train file and line, or as the demo's."""
    source, line = getattr(row, "source", None), getattr(row, "line", None)
    if source == "flags":
        return "the training triple (--prompt/--chosen/--rejected)"
    if source == "demo":
        return "the Persona demo triple"
    return f"--train {source} line {line}"


def pair_name(pair: Any) -> str:
    """How the CLI names an unseen pair: "--pair #1" (numbered from 1 as given), its --unseen file and line."""
    source, line = getattr(pair, "source", None), getattr(pair, "line", None)
    if source == "--pair":
        return f"--pair #{line}"
    if source in (None, "demo"):
        return f"the demo pair {pair_label(pair)!r}"
    return f"--unseen {source} line {line}"


def _too_long(name: str, err: Any) -> Any:
    """A DataError for a sequence over the context, in CLI terms: these commands have no truncation option."""
    from dynamics.errors import DataError

    return DataError(
        f"{name} is too long for the model's context: {err.lengths} = {err.total} tokens > {err.max_length} "
        "(the model's max_position); shorten the prompt or the response (these commands do not truncate)"
    )


def encode(loaded: Any, rows: Sequence[Any], pairs: Sequence[Any]) -> tuple[Any, Any]:
    """(PreferenceBatch of the training rows, PairBatch of the unseen pairs) with the model's chat template.

    Raises:
      DataError: a triple or a pair longer than the model's context, named as the user gave it ("--pair #2",
        "--train FILE line 7", ...), with its lengths.
    """
    return encode_triples(loaded, rows), encode_unseen(loaded, pairs)


def encode_triples(loaded: Any, rows: Sequence[Any]) -> Any:
    """The PreferenceBatch of preference rows (`encode`'s first half; a DataError names a row over the context)."""
    from dynamics.errors import SequenceTooLongError
    from dynamics.text import encode_preferences

    try:
        return encode_preferences(loaded.tokenizer, rows, max_length=loaded.lm.config.max_position)
    except SequenceTooLongError as err:
        raise _too_long(row_name(rows[err.index]), err) from None


def encode_unseen(loaded: Any, pairs: Sequence[Any]) -> Any:
    """The PairBatch of unseen pairs (`encode`'s second half; a DataError names a pair over the context)."""
    from dynamics.errors import SequenceTooLongError
    from dynamics.text import encode_pairs

    try:
        return encode_pairs(
            loaded.tokenizer, [p.prompt for p in pairs], [p.response for p in pairs],
            max_length=loaded.lm.config.max_position,
        )  # fmt: skip
    except SequenceTooLongError as err:
        raise _too_long(pair_name(pairs[err.index]), err) from None


def describe_rows(rows: Sequence[Any]) -> list[dict[str, Any]]:
    """The training triples as JSON-ready dicts {prompt, chosen, rejected}."""
    return [{"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected} for r in rows]


def describe_pairs(pairs: Sequence[Any]) -> list[dict[str, Any]]:
    """The unseen pairs as JSON-ready dicts {prompt, response, label}."""
    return [{"prompt": p.prompt, "response": p.response, "label": p.label} for p in pairs]

"""Shared plumbing of the one-step-dynamics commands (`rmdyn delta`, `rho`, `check-step`, `demo`).

Arguments, their validation before any model is loaded (a bad option fails in milliseconds with exit status 2),
training triples and unseen pairs from flags or JSONL files, and the reward models. No JAX import at module level:
the CLI imports this module when it registers the commands.
"""

from __future__ import annotations

import argparse
import functools
import math
from collections.abc import Sequence
from typing import Any

# dynamics.mask_spec.SPEC_HELP, spelled out so that building the parser imports nothing from dynamics (a test
# checks that the two agree)
PARAMS_HELP = "head | unembed | output | last:K | all | re:PATTERN"

DEFAULT_LR = 1e-3  # all-parameter SGD on SmolLM2-135M: |Δr_EX| ≈ 0.01–0.2, |Δr_IM| ≈ 1e-4–3e-3 (β·nats): first order
DEFAULT_BETA = 0.01
REWARD_CHOICES = ("ex", "im", "both")


# ----------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------


def add_model_arguments(parser: argparse.ArgumentParser, *, head_seed: bool = True) -> None:
    """--model, --beta, --seed and the hidden --tiny (a tiny random LM with the default tokenizer, for tests)."""
    parser.add_argument("--model", default=None, metavar="PATH",
                        help="HF directory or .gguf file (default: SmolLM2-135M-Instruct)")  # fmt: skip
    parser.add_argument("--beta", type=float, default=DEFAULT_BETA, help=f"IM-RM β (default {DEFAULT_BETA})")
    if head_seed:
        parser.add_argument("--seed", type=int, default=0, help="seed of the EX-RM head's random init (default 0)")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)


def add_train_arguments(parser: argparse.ArgumentParser, *, several: bool = True) -> None:
    """The training triple: --prompt/--chosen/--rejected, or --train FILE [--row N]."""
    group = parser.add_argument_group("training triple (default: the Persona demo triple)")
    group.add_argument("--prompt", help="training prompt x")
    group.add_argument("--chosen", help="training response y+")
    group.add_argument("--rejected", help="training response y−")
    group.add_argument("--train", metavar="FILE", help="JSONL of preference rows {prompt, chosen, rejected}")
    group.add_argument(
        "--row",
        type=int,
        action="append" if several else "store",
        metavar="N",
        help="0-based row of --train (default 0)" + ("; repeat for a batch (batch-mean loss)" if several else ""),
    )


def add_unseen_arguments(parser: argparse.ArgumentParser, *, several: bool = True) -> None:
    """The unseen pairs: --unseen FILE and/or --pair PROMPT RESPONSE."""
    group = parser.add_argument_group("unseen pairs (default: the Persona demo set)")
    group.add_argument(
        "--unseen",
        metavar="FILE",
        help="JSONL of pairs {prompt, response[, label]} or preference rows (two pairs each)",
    )
    if several:
        group.add_argument("--pair", nargs=2, action="append", metavar=("PROMPT", "RESPONSE"),
                           help="an unseen pair; repeatable")  # fmt: skip
    else:
        group.add_argument("--pair", nargs=2, metavar=("PROMPT", "RESPONSE"), help="the unseen pair")
        group.add_argument("--unseen-row", type=int, default=0, metavar="N",
                           help="0-based pair of --unseen (default 0; a preference row gives two pairs)")  # fmt: skip


def add_reward_arguments(parser: argparse.ArgumentParser, *, method: bool = True) -> None:
    """--reward, --params, --optimizer, --method, --chunk-size."""
    parser.add_argument("--reward", choices=REWARD_CHOICES, default="both", help="reward type(s) (default both)")
    parser.add_argument(
        "--params",
        default=None,
        metavar="SPEC",
        help=f"trainable parameters: {PARAMS_HELP} (default all; output with --method closed_form)",
    )
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd", help="the step (default sgd)")
    if method:
        parser.add_argument(
            "--method",
            choices=("ntk", "closed_form"),
            default="ntk",
            help="ntk (any --params) or closed_form (Assumption 1: --params output, sgd) (default ntk)",
        )
    parser.add_argument("--chunk-size", type=int, default=8, help="unseen pairs per JVP batch (default 8)")


# ----------------------------------------------------------------------------------------------------------
# Validation (before the model loads)
# ----------------------------------------------------------------------------------------------------------


def check_positive(value: float, flag: str) -> float:
    """`value` if it is a finite number > 0, else ConfigError naming `flag`."""
    from dynamics.errors import ConfigError

    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ConfigError(f"{flag} must be a finite number > 0, got {value!r}")
    return float(value)


def parse_lrs(text: str) -> list[float]:
    """A comma list of learning rates ("1e-5,1e-4,1e-3"), each > 0."""
    from dynamics.errors import ConfigError

    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--lrs must be a comma-separated list of numbers, got {text!r}") from None
    if not values:
        raise ConfigError("--lrs is empty")
    return [check_positive(v, "every value of --lrs") for v in values]


def reward_kinds(reward: str) -> list[str]:
    """["ex"], ["im"] or ["ex", "im"]."""
    return ["ex", "im"] if reward == "both" else [reward]


def resolve_params(spec: str | None, kinds: Sequence[str], method: str = "ntk") -> str:
    """The --params spec (default all, or output for closed_form), checked against the reward types.

    The same checks as `dynamics.masks.check_spec` (whose messages describe the value: "parameter selection
    'last:x': ..."), done here without importing JAX so that a bad value fails at once; every message starts with
    "--params: ". What needs the model (K ≤ the number of blocks, a pattern that selects nothing) is checked by
    `check_params_on_model` once it is loaded.

    Raises:
      ConfigError: an unknown spec, a K that is not a positive integer, a PATTERN that is not a regular
        expression, head for an IM-RM, unembed for an EX-RM, or closed_form with a spec other than output.
    """
    from dynamics.errors import ConfigError
    from dynamics.mask_spec import check_spec

    try:
        spec = check_spec(spec or ("output" if method == "closed_form" else "all"))
    except ConfigError as err:
        raise ConfigError(f"--params: {err}") from None
    what = f"parameter selection {spec!r}"
    if spec == "head" and "im" in kinds:
        raise ConfigError(f"--params: {what}: the IM-RM has no head (use output: head for EX-RM, unembed for IM-RM)")
    if spec == "unembed" and "ex" in kinds:
        raise ConfigError(f"--params: {what}: the EX-RM does not read the unembedding (use output, last:K or all)")
    if method == "closed_form" and spec not in ("output", "head", "unembed"):
        raise ConfigError(f"--method closed_form covers Assumption 1 only (--params output); got --params {spec}")
    return spec


def check_params_on_model(rm: Any, params: Any, spec: str) -> None:
    """The --params spec against the loaded reward model (K ≤ its blocks, a pattern that selects something).

    Runs `dynamics.masks.trainable_mask` (cheap: a tree of bools) and re-raises its error with the flag's name.

    Raises:
      ConfigError: "--params: " and the library's message.
    """
    from dynamics.errors import ConfigError, RmdynError
    from dynamics.masks import normalize_spec, trainable_mask

    try:
        if normalize_spec(rm, spec) != "unembed":  # unembed needs the untying of `prepare`, and always selects W
            trainable_mask(rm, params, spec)
    except RmdynError as err:
        raise ConfigError(f"--params: {err}") from None


def check_chunk_size(value: int) -> int:
    from dynamics.errors import ConfigError

    if value < 1:
        raise ConfigError(f"--chunk-size must be ≥ 1, got {value}")
    return value


def check_inputs(args: argparse.Namespace, *out_files: str) -> None:
    """--model, --train and --unseen exist, and --out can take `out_files` (pure Python: before JAX is imported).

    Raises:
      ConfigError: a missing --train / --unseen file, or an --out that is a file or cannot be written.
      ModelError: a --model path that does not exist.
    """
    from experiments.commands._checks import check_input_file, check_model_source, check_output_dir

    if not getattr(args, "tiny", False):
        check_model_source(getattr(args, "model", None))
    check_input_file(getattr(args, "train", None), "--train")
    check_input_file(getattr(args, "unseen", None), "--unseen")
    check_output_dir(args.out, "--out", files=out_files)


# ----------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------


def training_rows(args: argparse.Namespace) -> tuple[list[Any], str]:
    """(preference rows, where they came from) from --prompt/--chosen/--rejected, --train/--row, or the demo.

    Raises:
      ConfigError: flags given partly, or together with --train; --row without --train or out of range.
      DataError: a malformed --train file (file and line).
    """
    from dynamics.datasets import PreferenceRow, load_preferences
    from dynamics.errors import ConfigError

    flags = {k: getattr(args, k) for k in ("prompt", "chosen", "rejected")}
    given = [k for k, v in flags.items() if v is not None]
    rows_arg = args.row
    rows_idx = [] if rows_arg is None else ([rows_arg] if isinstance(rows_arg, int) else list(rows_arg))
    if args.train is not None:
        if given:
            raise ConfigError(f"--train and --{given[0]} both given: take the triple from one of them")
        rows = load_preferences(args.train)
        picks = rows_idx or [0]
        for i in picks:
            if not 0 <= i < len(rows):
                raise ConfigError(f"--row {i}: {args.train} has rows 0..{len(rows) - 1}")
        return [rows[i] for i in picks], f"{args.train} rows {picks}"
    if rows_idx:
        raise ConfigError("--row needs --train FILE")
    if given:
        missing = [k for k in flags if flags[k] is None]
        if missing:
            raise ConfigError(f"a training triple needs --prompt, --chosen and --rejected; missing --{missing[0]}")
        for k, v in flags.items():
            if not v.strip():
                raise ConfigError(f"--{k} is empty")
        return [PreferenceRow(flags["prompt"], flags["chosen"], flags["rejected"], 0, "flags", 0)], "flags"
    from experiments.dynamics_demo import demo_triple

    return [demo_triple()], "the Persona demo triple"


def unseen_pairs(args: argparse.Namespace, *, single: bool = False) -> tuple[list[Any], str]:
    """(unseen pairs, where they came from) from --unseen and --pair, or the Persona demo set.

    Raises:
      ConfigError: an empty --pair field; with `single`, both sources or --unseen-row out of range.
      DataError: a malformed --unseen file (file and line).
    """
    from dynamics.datasets import UnseenPair, load_unseen_pairs
    from dynamics.errors import ConfigError

    pairs_arg = args.pair
    flag_pairs = [] if pairs_arg is None else ([pairs_arg] if single else list(pairs_arg))
    for prompt, response in flag_pairs:
        if not prompt.strip() or not response.strip():
            raise ConfigError(f"--pair {prompt!r} {response!r}: prompt and response must be non-empty")
    pairs = [UnseenPair(p, r, None, "--pair", i + 1) for i, (p, r) in enumerate(flag_pairs)]
    where = ["--pair"] if pairs else []
    if args.unseen is not None:
        loaded = load_unseen_pairs(args.unseen)
        if single:
            if pairs:
                raise ConfigError("--unseen and --pair both given: rho takes one unseen pair")
            i = args.unseen_row
            if not 0 <= i < len(loaded):
                raise ConfigError(f"--unseen-row {i}: {args.unseen} has pairs 0..{len(loaded) - 1}")
            return [loaded[i]], f"{args.unseen} pair {i}"
        pairs = loaded + pairs
        where.insert(0, str(args.unseen))
    if pairs:
        return pairs, " + ".join(where)
    from experiments.dynamics_demo import demo_pairs

    demo = demo_pairs()
    if single:
        return [demo[0]], "the Persona demo set"
    return demo, "the Persona demo set"


def pair_label(pair: Any, width: int = 0) -> str:
    """The pair's label, or its response."""
    text = pair.label if getattr(pair, "label", None) else pair.response
    return text if not width or len(text) <= width else text[: width - 1] + "…"


# ----------------------------------------------------------------------------------------------------------
# Model and reward models
# ----------------------------------------------------------------------------------------------------------


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


def load_model(args: argparse.Namespace) -> Any:
    """The `Loaded` model of --model (or the tiny test model with --tiny)."""
    if getattr(args, "tiny", False):
        return tiny_loaded()
    from dynamics.loading import load

    return load(args.model)


def reward_model(kind: str, loaded: Any, *, beta: float = DEFAULT_BETA, seed: int = 0) -> tuple[Any, Any]:
    """(reward model, params) of kind "ex" (head u ~ N(0, 0.02²) from `seed`) or "im" (π_ref = the model)."""
    from dynamics.rewards import ExplicitRM, make_reward_model

    rm = make_reward_model(kind, loaded.lm, beta=beta)
    if isinstance(rm, ExplicitRM):
        return rm, rm.init(loaded.params, seed)
    return rm, rm.init(loaded.params)


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
    from dynamics.errors import SequenceTooLongError
    from dynamics.text import encode_pairs, encode_preferences

    max_len = loaded.lm.config.max_position
    try:
        train = encode_preferences(loaded.tokenizer, rows, max_length=max_len)
    except SequenceTooLongError as err:
        raise _too_long(row_name(rows[err.index]), err) from None
    try:
        unseen = encode_pairs(
            loaded.tokenizer, [p.prompt for p in pairs], [p.response for p in pairs], max_length=max_len
        )
    except SequenceTooLongError as err:
        raise _too_long(pair_name(pairs[err.index]), err) from None
    return train, unseen


def describe_rows(rows: Sequence[Any]) -> list[dict[str, Any]]:
    return [{"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected} for r in rows]


def describe_pairs(pairs: Sequence[Any]) -> list[dict[str, Any]]:
    return [{"prompt": p.prompt, "response": p.response, "label": p.label} for p in pairs]


def fmt(value: float, width: int = 10) -> str:
    """A number in a table cell: %.4g, right-aligned."""
    return f"{value:>{width}.4g}"

"""What the one-step-dynamics flags select: training triples, unseen pairs and the model.

`training_rows` and `unseen_pairs` read --prompt/--chosen/--rejected, --train/--row, --unseen and --pair (the
Persona demo's triple and pairs when none is given, `experiments.studies.demo`); `load_model` loads --model (or
the tiny test model of the hidden --tiny). Encoding them and building the reward models is
`experiments.studies.one_step`, shared with the demo and the benchmarks.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["load_model", "training_rows", "unseen_pairs"]


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
    from experiments.studies.demo import demo_triple

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
    from experiments.studies.demo import demo_pairs

    demo = demo_pairs()
    if single:
        return [demo[0]], "the Persona demo set"
    return demo, "the Persona demo set"


def load_model(args: argparse.Namespace) -> Any:
    """The `Loaded` model of --model (or the tiny test model with --tiny)."""
    if getattr(args, "tiny", False):
        from experiments.studies.one_step import tiny_loaded

        return tiny_loaded()
    from dynamics.errors import ModelError
    from dynamics.loading import load

    loaded = load(args.model)
    for flag, method in (("adapter", "with_adapter"), ("ref", "with_reference")):
        value = getattr(args, flag, None)
        if value:
            try:
                loaded = getattr(loaded, method)(value)
            except ModelError as err:
                raise ModelError(f"--{flag} {value}: {err}") from None
    return loaded

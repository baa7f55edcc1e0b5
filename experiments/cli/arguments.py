"""Arguments of the one-step-dynamics commands (`rmdyn delta`, `rho`, `check-step`, `demo`) and their checks.

The flags (model, training triple, unseen pairs, reward and parameter selection) and their validation before any
model is loaded: a bad option fails in milliseconds with exit status 2. Pure Python: the CLI imports this module
when it registers the commands, so it imports nothing from `dynamics` at module level (building the parser and
`rmdyn --version` must not import JAX). What the flags select is read by `experiments.cli.inputs`.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from experiments.studies.one_step import DEFAULT_BETA

__all__ = [
    "DEFAULT_LR",
    "OBJECTIVE_NAMES",
    "PARAMS_HELP",
    "REWARD_CHOICES",
    "add_model_arguments",
    "add_objective_arguments",
    "add_reward_arguments",
    "add_train_arguments",
    "add_unseen_arguments",
    "check_chunk_size",
    "check_run_record",
    "check_inputs",
    "check_params_on_model",
    "check_objective",
    "check_positive",
    "fmt",
    "objective_for",
    "parse_lrs",
    "reward_kinds",
    "resolve_params",
]

# dynamics.mask_spec.SPEC_HELP, spelled out so that building the parser imports nothing from dynamics (a test
# checks that the two agree)
PARAMS_HELP = "head | unembed | output | last:K | lora | all | re:PATTERN"

# dynamics.objectives.OBJECTIVES, spelled out for the same reason (a test checks that the two agree)
OBJECTIVE_NAMES = ("dpo", "cdpo", "ipo", "hinge", "simpo")

DEFAULT_LR = 1e-3  # all-parameter SGD on SmolLM2-135M: |Δr_EX| ≈ 0.01–0.2, |Δr_IM| ≈ 1e-4–3e-3 (β·nats): first order
REWARD_CHOICES = ("ex", "im", "both")


# ----------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------


def add_model_arguments(parser: argparse.ArgumentParser, *, head_seed: bool = True, ref: bool = True) -> None:
    """--model, --ref, --beta, --seed and the hidden --tiny (a tiny random LM with the default tokenizer, for tests)."""
    parser.add_argument("--model", default=None, metavar="PATH",
                        help="HF directory or .gguf file (default: SmolLM2-135M-Instruct); with --ref, the policy "
                             "π_θ of a DPO run")  # fmt: skip
    if ref:
        parser.add_argument("--ref", default=None, metavar="PATH",
                            help="the IM-RM's reference π_ref (HF directory or .gguf) when it is not --model "
                                 "itself, e.g. the SFT model a DPO policy started from; same architecture and "
                                 "tokenizer")  # fmt: skip
    if ref:
        parser.add_argument("--adapter", default=None, metavar="DIR",
                            help="a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) applied to "
                                 "--model; the IM-RM's reference is then the base model unless --ref says "
                                 "otherwise; --params lora trains its factors")  # fmt: skip
    parser.add_argument("--beta", type=float, default=None,
                        help=f"IM-RM β (default: the run's, from training_args.bin beside --adapter or --model when "
                             f"TRL saved one, else {DEFAULT_BETA})")  # fmt: skip
    parser.set_defaults(run_settings=True)
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


def add_objective_arguments(parser: argparse.ArgumentParser) -> None:
    """--objective, --gamma, --label-smoothing (the DPO family, `dynamics.objectives`)."""
    parser.add_argument("--objective", default=None, metavar="|".join(OBJECTIVE_NAMES),
                        help="the training objective: dpo (Bradley-Terry), cdpo, ipo, hinge or simpo (reference-free, "
                             "length-normalised IM-RM) (default: the run's loss type from a TRL training_args.bin "
                             "beside --adapter or --model, else dpo)")  # fmt: skip
    parser.add_argument("--gamma", type=float, default=None, help="SimPO's target margin γ ≥ 0 (default 0)")
    parser.add_argument("--label-smoothing", type=float, default=None, help="cDPO's ε in [0, 0.5) (default 0)")


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


def check_objective(args: argparse.Namespace) -> None:
    """--objective with --gamma / --label-smoothing, checked before the model loads (ConfigError naming the flags)."""
    from dynamics.errors import ConfigError
    from dynamics.objectives import Objective

    try:
        Objective(args.objective, gamma=args.gamma, smoothing=args.label_smoothing)
    except ConfigError as err:
        raise ConfigError(f"--objective / --gamma / --label-smoothing: {err}") from None


def objective_for(args: argparse.Namespace, rm: Any) -> Any:
    """The objective of the flags for reward model `rm` (`dynamics.objectives.make_objective`)."""
    from dynamics.objectives import make_objective

    return make_objective(args.objective, rm, gamma=args.gamma, smoothing=args.label_smoothing)


def check_run_record(run: str, reward: str, objective: str) -> None:
    """--run names a trainer's run directory whose reward type ("both": EX or IM) and objective are the ones asked
    for (pure Python, before JAX); ConfigError naming the directory and its config.json otherwise."""
    import json

    from dynamics.errors import ConfigError

    record = Path(run) / "config.json"
    if not record.is_file():
        raise ConfigError(f"--run {run}: not a run directory of rmdyn's trainer (no config.json)")
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
        kind = (data.get("reward_model") or {}).get("kind")
        trained = (data.get("train") or {}).get("objective", "dpo")
    except (OSError, ValueError, AttributeError) as err:
        raise ConfigError(f"--run {run}: unreadable {record} ({err})") from None
    if kind not in ("ex", "im"):
        raise ConfigError(f"--run {run}: a run of reward {kind!r} ({record}); this needs an EX-RM or IM-RM run")
    if reward != "both" and kind != reward:
        raise ConfigError(f"--run {run} was trained with reward {kind}, not {reward} ({record})")
    if trained != objective:
        raise ConfigError(f"--run {run} was trained with objective {trained}, not {objective} ({record}): pass "
                          f"--objective {trained}")  # fmt: skip


def check_chunk_size(value: int) -> int:
    """`value` if it is ≥ 1, else ConfigError naming --chunk-size."""
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
    from experiments.cli.preflight import check_input_file, check_model_source, check_output_dir

    if not getattr(args, "tiny", False):
        check_model_source(getattr(args, "model", None))
    check_input_file(getattr(args, "train", None), "--train")
    check_input_file(getattr(args, "unseen", None), "--unseen")
    check_output_dir(args.out, "--out", files=out_files)


def fmt(value: float, width: int = 10) -> str:
    """A number in a table cell: %.4g, right-aligned."""
    return f"{value:>{width}.4g}"

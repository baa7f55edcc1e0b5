"""β and the objective for commands that take a model: the flags, else the run's training_args.bin, else defaults.

A DPO policy (or adapter) saved by TRL carries its run's β and loss type in training_args.bin
(`dynamics.run_settings`). When --beta, --objective or --label-smoothing / --gamma are not given, the command takes
them from there (the adapter's directory first, then the model's) and says so; a flag given on the command line
always wins, and a flag that differs from the run's is reported. Pure Python: no JAX, torch or TRL import.
"""

from __future__ import annotations

import argparse

from experiments.studies.one_step import DEFAULT_BETA

__all__ = ["apply_run_settings"]


def _report(args: argparse.Namespace, settings) -> list[str]:
    """The lines that say what was taken from the run and which flags override it."""
    lines, taken = [], []
    if settings.beta is not None:
        if args.beta is None:
            args.beta = settings.beta
            taken.append(f"β = {settings.beta:g}")
        elif args.beta != settings.beta:
            lines.append(f"note: --beta {args.beta:g} overrides the run's β = {settings.beta:g} ({settings.path})")
    if not hasattr(args, "objective"):
        return lines + ([f"from {settings.path}: {', '.join(taken)}"] if taken else [])
    if args.objective is None and settings.objective is not None:
        args.objective = settings.objective
        taken.append(f"objective {settings.objective}")
        if args.label_smoothing is None and settings.label_smoothing:
            args.label_smoothing = settings.label_smoothing
            taken.append(f"label smoothing ε = {settings.label_smoothing:g}")
        if args.gamma is None and settings.gamma:
            args.gamma = settings.gamma
            taken.append(f"γ = {settings.gamma:g}")
    elif args.objective is None:
        lines.append(f"note: the run's loss ({settings.note}) has no rmdyn objective; using dpo ({settings.path})")
    elif settings.objective is not None and args.objective != settings.objective:
        lines.append(f"note: --objective {args.objective} overrides the run's {settings.objective} ({settings.path})")
    if taken:
        lines.insert(0, f"from {settings.path} ({settings.config_class}): {', '.join(taken)}")
    return lines


def apply_run_settings(args: argparse.Namespace) -> None:
    """Fills args.beta (and args.objective, args.label_smoothing, args.gamma where the command has them) that the
    command line left unset (None): from the run's training_args.bin beside --adapter or --model, else rmdyn's
    defaults (β = DEFAULT_BETA, dpo, ε = 0, γ = 0). Prints one line per value taken or overridden.

    Raises:
      ModelError: a training_args.bin that cannot be read (the file and why).
    """
    from dynamics.run_settings import find_run_settings

    settings = find_run_settings(getattr(args, "adapter", None), getattr(args, "model", None))
    if settings is not None:
        for line in _report(args, settings):
            print(line)
    if args.beta is None:
        args.beta = DEFAULT_BETA
    if hasattr(args, "objective"):
        args.objective = args.objective or "dpo"
        args.label_smoothing = 0.0 if args.label_smoothing is None else args.label_smoothing
        args.gamma = 0.0 if args.gamma is None else args.gamma

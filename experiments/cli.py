"""The `rmdyn` command line.

Each sub-command lives in its own module under `experiments.commands` and exposes `register(subparsers)`.
Registration must stay cheap (no JAX import), so that `rmdyn --help` answers at once; the heavy imports happen
inside each command's `run`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules under experiments.commands, in the order their commands appear in `rmdyn --help`.
COMMAND_MODULES = (
    "models",
    "theorem1",
    "theorem2",
    "bench",
    "experiment",
    "delta",
    "rho",
    "check_step",
    "demo",
    "footnote3",
    "figures",
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered sub-command."""
    parser = argparse.ArgumentParser(
        prog="rmdyn",
        description=(
            "Learning dynamics of explicit (EX-RM) vs implicit (IM-RM, DPO) reward models: "
            "Δr after one step, ρ_{k,l}, one-step checks, Theorems 1 and 2, the paper's experiments."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"experiments.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `rmdyn` console script. Returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from dynamics.errors import RmdynError

    try:
        return int(args.func(args) or 0)
    except RmdynError as err:
        print(f"rmdyn {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rmdyn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

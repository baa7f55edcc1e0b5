"""The `rmdyn` command line.

Each sub-command lives in its own module under `experiments.cli.commands` and exposes `register(subparsers)`.
Registration must stay cheap (no JAX import), so that `rmdyn --help` answers at once; the heavy imports happen
inside each command's `run`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["COMMAND_MODULES", "build_parser", "entry", "main", "version"]

# Modules under experiments.cli.commands, in the order their commands appear in `rmdyn --help`.
COMMAND_MODULES = (
    "models",
    "theorem1",
    "theorem2",
    "bench",
    "experiment",
    "delta",
    "rho",
    "attribute",
    "displacement",
    "evaluate",
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
    parser.add_argument("--version", action="store_true", help="print rmdyn's version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"experiments.cli.commands.{name}").register(sub)
    return parser


def version() -> str:
    """The installed distribution's version (importlib.metadata; no JAX import)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("rmdyn")
    except PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


def main(argv: list[str] | None = None) -> int:
    """Runs one `rmdyn` command in this process and returns its exit status (0 ok, 2 bad input, 130 interrupted).

    For library and test use; the console script is `entry`, which also owns the process's Ctrl-C handling.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        print(f"rmdyn {version()}")
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from dynamics.errors import RmdynError

    try:
        if getattr(args, "run_settings", False):
            from experiments.cli.run_settings import apply_run_settings

            apply_run_settings(args)
        return int(args.func(args) or 0)
    except RmdynError as err:
        print(f"rmdyn {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rmdyn {args.command}: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """The `rmdyn` console script: `main` with Ctrl-C ending the process with status 130 (experiments.cli.interrupt)."""
    from experiments.cli import interrupt

    interrupt.install()
    try:
        status = main()
    except KeyboardInterrupt:  # before a command started (argument parsing, registration)
        print("rmdyn: interrupted", file=sys.stderr)
        status = interrupt.INTERRUPTED_STATUS
    if status == interrupt.INTERRUPTED_STATUS:
        interrupt.exit_interrupted()
    sys.exit(status)


if __name__ == "__main__":
    entry()

"""`rmdyn bench TARGET`: micro-benchmarks that print times and ratios (never assertions).

Targets are registered in `BENCH_TARGETS`: a name mapped to the module that implements it. A target module
exposes `DESCRIPTION` (one line), `add_arguments(parser)` and `run(args) -> int`, and must not import JAX at
module level (registration has to stay cheap).

    rmdyn bench theorem2    # 100 seeds: vmapped simulator vs a loop over seeds
    rmdyn bench delta       # 64 pairs: eNTK Δr vs one forward pass vs per-example gradients
    rmdyn bench delta --memory 8,16,32,64,128,256     # compiled peak memory, eNTK vs per-example gradients
    rmdyn bench rho         # |ȳ| = |v| = 512: vocabulary-chunked ρ vs the full-vocabulary computation
    rmdyn bench train       # IM-RM training step: rmdyn (JAX) vs transformers + torch.optim.Adam
    rmdyn bench eval        # the controlled Persona sets: evaluation on prefix trees vs set by set
    rmdyn bench attribute   # contribution matrix: total time vs (2N + 2M) single gradients; --memory N,N: peak vs N
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

__all__ = ["BENCH_TARGETS", "register"]

BENCH_TARGETS: dict[str, str] = {
    "theorem2": "experiments.benchmarks.theorem2",
    "delta": "experiments.benchmarks.delta",
    "rho": "experiments.benchmarks.rho",
    "train": "experiments.benchmarks.train",
    "attribute": "experiments.benchmarks.attribute",
    "eval": "experiments.benchmarks.eval",
}


def register(subparsers: Any) -> None:
    """Adds `bench` with one sub-command per entry of BENCH_TARGETS."""
    parser = subparsers.add_parser(
        "bench",
        help="benchmarks (timings and speed-up ratios): " + ", ".join(BENCH_TARGETS),
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    targets = parser.add_subparsers(dest="bench_target", metavar="TARGET")
    for name, module_name in BENCH_TARGETS.items():
        module = importlib.import_module(module_name)
        target = targets.add_parser(name, help=module.DESCRIPTION, description=module.DESCRIPTION)
        module.add_arguments(target)
        target.set_defaults(func=module.run)
    parser.set_defaults(func=_missing_target)


def _missing_target(args: argparse.Namespace) -> int:
    from dynamics.errors import ConfigError

    raise ConfigError(f"rmdyn bench needs a TARGET, one of: {', '.join(BENCH_TARGETS)}")

"""`rmdyn theorem2`: the single-token simulation of Theorem 2 (docs/math.md §5).

Trains an EX-RM head u and an IM-RM unembedding W by full-batch gradient descent on fixed representations and
records cos(u(t), u*) and the accuracies on pairs of unseen tokens, for many seeds at once (jit + vmap).
Writes theorem2.png and theorem2.json (every recorded number) under --out.

Sources: `synthetic` (docs/math.md §5 "Simulation recipe") or `model` (SmolLM2's hidden states and unembedding on
Persona prompts with one-token answers: experiments.studies.theorem2_model).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

__all__ = ["DEFAULTS", "check_args", "load_problem", "register", "run"]

DEFAULTS = {"seeds": 50, "steps": 10_000, "lr": 0.5, "schedule": "normalized", "grid": 41}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default in its help."""


def register(subparsers: Any) -> None:
    """Adds the `theorem2` sub-command (no heavy imports here)."""
    parser = subparsers.add_parser(
        "theorem2",
        help="Theorem 2 simulation: EX-RM converges to u*, IM-RM ties on unseen tokens (writes PNG + JSON)",
        description=__doc__,
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--source", choices=("synthetic", "model"), default="synthetic", help="representations")
    parser.add_argument(
        "--model", default=None, metavar="PATH", help="--source model: a .gguf file or HF directory (default SmolLM2)"
    )
    parser.add_argument("--seeds", type=int, default=DEFAULTS["seeds"], help="number of seeds (vmapped)")
    parser.add_argument("--seed", type=int, default=0, help="base seed")
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="GD steps")
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="EX-RM step size η")
    parser.add_argument("--im-lr", type=float, default=None, help="IM-RM step size (None: --lr / --beta²)")
    parser.add_argument("--beta", type=float, default=0.01, help="β of the IM-RM")
    parser.add_argument(
        "--schedule",
        choices=("plain", "normalized"),
        default=DEFAULTS["schedule"],
        help="plain GD (the theorem's setting; ~1e7 steps to cos 0.99) or η/L(θ_t)",
    )
    parser.add_argument(
        "--method", choices=("dual", "primal"), default="dual", help="dual (fast) or primal (reference)"
    )
    parser.add_argument("--grid", type=int, default=DEFAULTS["grid"], help="log-spaced recording points")
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64", help="precision")
    parser.add_argument("--out", default="runs/theorem2", help="output directory")
    parser.set_defaults(func=run)


def check_args(args: argparse.Namespace) -> None:
    """Every option that can be checked without JAX, naming the flag (the simulator's own checks use its field
    names: n_steps, n_grid, im_lr).

    Raises:
      ConfigError: a value out of range, or an --out that is a file or cannot be written.
    """
    import math

    from dynamics.errors import ConfigError
    from experiments.cli.preflight import check_model_source, check_output_dir

    if getattr(args, "model", None) is not None:
        check_model_source(args.model)
    if args.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {args.seeds}")
    if not 1 <= args.steps < 2**31:
        raise ConfigError(f"--steps must be an integer in [1, 2**31), got {args.steps}")
    for flag, value in (("--lr", args.lr), ("--beta", args.beta), ("--im-lr", args.im_lr)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{flag} must be a finite number > 0, got {value!r}")
    if args.grid < 2:
        raise ConfigError(f"--grid must be an integer >= 2, got {args.grid}")
    if args.model is not None and args.source != "model":
        raise ConfigError(f"--model is for --source model (the synthetic source has no model), got {args.model}")
    check_output_dir(args.out, "--out", files=["theorem2.png", "theorem2.json"])


def load_problem(source: str, n_seeds: int, seed: int, model: str | None = None) -> Any:
    """The batched `Theorem2Problem` of a source.

    Raises:
      ConfigError: an unknown source or a seed count below 1.
    """
    from dynamics.errors import ConfigError

    if n_seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {n_seeds}")
    if source == "synthetic":
        from theory.theorem2 import synthetic_problems

        return synthetic_problems(seed, n_seeds)
    if source != "model":
        raise ConfigError(f"--source must be 'synthetic' or 'model', got {source!r}")
    from experiments.studies.theorem2_model import model_problem
    from theory.theorem2 import broadcast_problem

    return broadcast_problem(model_problem(n_seeds=n_seeds, seed=seed, model=model), n_seeds)


def _table(result: Any) -> list[str]:
    import numpy as np

    rows = [
        f"{'t':>9} {'cos(u,u*) mean':>14} {'min':>7} {'EX unseen':>9} {'IM unseen':>9} "
        f"{'EX train':>8} {'IM train':>8} {'log10 L_EX':>10} {'log10 L_IM':>10}"
    ]
    ln10 = np.log(10.0)
    grid = result.steps
    picks = sorted({0, *np.searchsorted(grid, [1, 10, 100, 1_000, 10_000, 100_000, 1_000_000]), len(grid) - 1})
    for k in picks:
        if k >= len(grid):
            continue
        rows.append(
            f"{int(grid[k]):>9} {result.cos_u_star[:, k].mean():>14.5f} "
            f"{result.cos_u_star[:, k].min():>7.4f} "
            f"{np.nanmean(result.acc_unseen_ex[:, k]):>9.4f} {np.nanmean(result.acc_unseen_im[:, k]):>9.4f} "
            f"{result.train_acc_ex[:, k].mean():>8.4f} {result.train_acc_im[:, k].mean():>8.4f} "
            f"{result.log_loss_ex[:, k].mean() / ln10:>10.3g} {result.log_loss_im[:, k].mean() / ln10:>10.3g}"
        )
    return rows


def run(args: argparse.Namespace) -> int:
    """Runs the simulation, prints a table and the Theorem-2 checks, writes the figure and the JSON."""
    import sys

    check_args(args)

    def say(line: str) -> None:  # progress on stderr; stdout keeps the table and the results
        print(f"theorem2: {line}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    say(f"source {args.source}, {args.seeds} seeds: importing JAX and building the problem …")
    import numpy as np

    from figures.theorem2 import theorem2_figure
    from theory.theorem2 import Theorem2Config, max_margin_directions, simulate_theorem2

    config = Theorem2Config(
        n_steps=args.steps,
        lr=args.lr,
        im_lr=args.im_lr,
        beta=args.beta,
        schedule=args.schedule,
        n_grid=args.grid,
        dtype=args.dtype,
        method=args.method,
    )
    problem = load_problem(args.source, args.seeds, args.seed, args.model)
    t1 = time.perf_counter()
    say(f"problem ready in {t1 - t0:.1f} s; max-margin directions u* (a QP per seed) …")
    u_star = np.stack([r.direction for r in max_margin_directions(problem)])
    t2 = time.perf_counter()
    say(f"u* in {t2 - t1:.1f} s")
    result = simulate_theorem2(problem, config, u_star=u_star, seed=args.seed, progress=say)
    t3 = time.perf_counter()

    print(
        f"Theorem 2 simulation (docs/math.md §5): source {args.source}, {problem.n_seeds} seeds, "
        f"{config.n_steps} {config.schedule} GD steps, η = {config.lr}, IM-RM η = {config.resolved_im_lr:g}, "
        f"β = {config.beta}, {config.method} method, {config.dtype}"
    )
    print(f"time: problem {t1 - t0:.1f} s, u* (QP per seed) {t2 - t1:.1f} s, simulate incl. JIT {t3 - t2:.1f} s")
    print("\n".join(_table(result)))
    s = result.summary()
    ex_eq = int(np.sum(result.acc_unseen_ex[:, -1] == result.u_star_acc_unseen))
    print(
        f"\nfinal: cos(u, u*) mean {s['cos_u_star_mean']:.6f}, min {s['cos_u_star_min']:.6f}"
        f"\n  IM-RM: train acc {s['train_acc_im']:.4f}, unseen acc {s['acc_unseen_im']:.4f} "
        f"(exactly 0.5 on every seed: {bool(np.all(result.acc_unseen_im == 0.5))}), "
        f"max |W_v(t) − W_v(0)| over unseen v = {s['max_unseen_row_change']:g}, "
        f"max |Δr| on unseen pairs = {s['max_unseen_reward_diff_im']:g}"
        f"\n  EX-RM: unseen acc {s['acc_unseen_ex']:.4f}, u* unseen acc {s['u_star_acc_unseen']:.4f}, "
        f"equal on {ex_eq}/{result.n_seeds} seeds"
    )
    data = result.to_dict()
    data["timing_s"] = {"problem": t1 - t0, "u_star": t2 - t1, "simulate_incl_jit": t3 - t2}
    png, js = theorem2_figure(data, f"{args.out}/theorem2.png")
    print(f"wrote {png} and {js}")
    return 0

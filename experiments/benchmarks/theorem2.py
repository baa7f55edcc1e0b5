"""Benchmark of the Theorem-2 simulator: one vmapped run over all seeds vs a Python loop over seeds.

Both sides call the same jitted single-seed body (`theory.theorem2.simulate`: `_run_seeds` is its vmap, `_run_seed`
the plain jit) on the same problem and the same u*. Compilation is excluded from the comparison: each side is
warmed up first and its first-call time is reported separately. Prints times and the ratio; asserts nothing.
No JAX import at module level (the CLI registers this module cheaply).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

__all__ = ["DESCRIPTION", "add_arguments", "bench_theorem2", "run"]

DESCRIPTION = "Theorem-2 simulator: vmap over seeds vs a Python loop of the same jitted single-seed run"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `rmdyn bench theorem2`."""
    parser.add_argument("--seeds", type=int, default=100, help="number of seeds (default 100)")
    parser.add_argument("--steps", type=int, default=10_000, help="GD steps per run (default 10000)")
    parser.add_argument("--schedule", choices=("plain", "normalized"), default="normalized")
    parser.add_argument("--method", choices=("dual", "primal"), default="dual")
    parser.add_argument("--grid", type=int, default=41, help="recording points (default 41)")
    parser.add_argument("--repeats", type=int, default=2, help="timed repetitions, the minimum is kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write bench_theorem2.json here")


def bench_theorem2(
    n_seeds: int = 100,
    n_steps: int = 10_000,
    schedule: str = "normalized",
    method: str = "dual",
    n_grid: int = 41,
    repeats: int = 2,
    seed: int = 0,
) -> dict[str, Any]:
    """Times `simulate_theorem2` vectorized (vmap) and as a loop over seeds, on the synthetic source.

    Returns:
      A dict of seconds: `vmap_first` and `loop_first` (compile + one run; the loop warms up on one seed),
      `vmap` and `loop` (best of `repeats`, compile excluded), `ratio` = loop / vmap, `max_abs_diff` of cos
      and accuracies and `max_rel_diff_log_loss` between the two results, and the settings.
    """
    from dynamics.errors import ConfigError

    if n_seeds < 1 or repeats < 1:
        raise ConfigError(f"need --seeds >= 1 and --repeats >= 1, got {n_seeds}, {repeats}")
    if not 1 <= n_steps < 2**31:
        raise ConfigError(f"--steps must be an integer in [1, 2**31), got {n_steps}")
    if n_grid < 2:
        raise ConfigError(f"--grid must be an integer >= 2, got {n_grid}")
    import numpy as np  # theory.theorem2 imports JAX: after the checks

    from theory.theorem2 import (
        Theorem2Config,
        max_margin_directions,
        select_seeds,
        simulate_theorem2,
        synthetic_problems,
    )

    config = Theorem2Config(n_steps=n_steps, schedule=schedule, method=method, n_grid=n_grid)
    problem = synthetic_problems(seed, n_seeds)
    u_star = np.stack([r.direction for r in max_margin_directions(problem)])

    def timed(fn: Any) -> tuple[float, Any]:
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out

    vmap_first, _ = timed(lambda: simulate_theorem2(problem, config, u_star=u_star))
    one = select_seeds(problem, slice(0, 1))
    loop_first, _ = timed(lambda: simulate_theorem2(one, config, u_star=u_star[:1], vectorize=False))
    vmap_times, loop_times = [], []
    for _ in range(repeats):
        t, res_vmap = timed(lambda: simulate_theorem2(problem, config, u_star=u_star))
        vmap_times.append(t)
        t, res_loop = timed(lambda: simulate_theorem2(problem, config, u_star=u_star, vectorize=False))
        loop_times.append(t)
    diff = max(
        float(np.nanmax(np.abs(getattr(res_vmap, k) - getattr(res_loop, k))))
        for k in ("cos_u_star", "acc_unseen_ex", "acc_unseen_im", "train_acc_ex", "train_acc_im")
    )
    loss_rel = max(
        float(np.max(np.abs(a - b) / np.maximum(1.0, np.abs(a))))
        for a, b in (
            (res_vmap.log_loss_ex, res_loop.log_loss_ex),
            (res_vmap.log_loss_im, res_loop.log_loss_im),
        )
    )
    vmap_t, loop_t = min(vmap_times), min(loop_times)
    return {
        "n_seeds": n_seeds,
        "n_steps": n_steps,
        "schedule": schedule,
        "method": method,
        "vmap_first": vmap_first,
        "loop_first": loop_first,
        "vmap": vmap_t,
        "loop": loop_t,
        "ratio": loop_t / vmap_t,
        "max_abs_diff": diff,
        "max_rel_diff_log_loss": loss_rel,
    }


def run(args: argparse.Namespace) -> int:
    """Prints the benchmark."""
    if getattr(args, "out", None):  # a bad --out fails before the benchmark runs
        from experiments.cli.preflight import check_output_dir

        check_output_dir(args.out, "--out", files=["bench_theorem2.json"])
    r = bench_theorem2(args.seeds, args.steps, args.schedule, args.method, args.grid, args.repeats, args.seed)
    print(
        f"bench theorem2: {r['n_seeds']} seeds × {r['n_steps']} {r['schedule']} GD steps "
        f"({r['method']} method, synthetic source), best of {args.repeats}"
    )
    print(f"  warm-up (compile + run): vmap {r['vmap_first']:.2f} s, single-seed jit on 1 seed {r['loop_first']:.2f} s")
    print(f"  vmap over seeds:          {r['vmap']:.3f} s")
    print(f"  Python loop over seeds:   {r['loop']:.3f} s")
    print(f"  ratio loop / vmap:        {r['ratio']:.2f}x")
    print(
        f"  vmap vs loop results: max |Δ| of cos and accuracies {r['max_abs_diff']:.1e}, "
        f"max relative |Δ| of log losses {r['max_rel_diff_log_loss']:.1e}"
    )
    if r["max_rel_diff_log_loss"] > 1e-6:
        print(
            "  (batched and unbatched kernels round differently; where normalized GD runs at the edge of\n"
            "   stability on a seed, those differences grow in the loss, not in the direction or accuracies)"
        )
    if getattr(args, "out", None):
        import os

        from dynamics.outputs import write_json_atomic

        print(f"wrote {write_json_atomic(os.path.join(args.out, 'bench_theorem2.json'), r)}")
    return 0

"""Projected against exact attribution on a real model (docs/math.md §10.1, §10.2): rank agreement and time.

On N training pairs and M eval pairs (the Persona rows of `experiments.benchmarks.attribute.bench_rows`), the
contribution matrix C [M, N] is computed exactly and projected at each k of `ks` (one seed each) with
`contribution_matrix(mode="projected")`, i.e. the default TensorSketch of `dynamics.attribution.projected`.
Reported per k: the Spearman and Pearson correlations over all M·N entries (i, j) of projected against exact C,
the feature width k_total actually used (k for the sketch), and the warm wall time of each `contribution_matrix`
call (its block programs compiled first on one block of each set; the warm-up time is reported apart).

    python -m experiments.benchmarks.attribution_projection --reward im --params last:2

No JAX import at module level.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["compare_projection", "main"]


def _timed(fn, *args, **kwargs) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def compare_projection(
    loaded: Any,
    *,
    reward: str = "im",
    params_spec: str = "last:2",
    n_train: int = 32,
    n_eval: int = 16,
    ks: Sequence[int] = (512, 2048, 8192),
    seed: int = 0,
    block: int = 8,
    lr: float = 1e-3,
) -> dict[str, Any]:
    """Exact vs projected C on `loaded` (a `dynamics.loading.Loaded`).

    Args:
      loaded: the model and tokenizer.
      reward: "ex" (head u ~ N(0, 0.02²)) or "im" (β = 0.01, π_ref = the model itself).
      params_spec: the trainable parameters (`dynamics.masks`).
      n_train, n_eval: N training pairs and M eval pairs.
      ks: the projection sizes k to compare.
      seed: the projection seed (the same for every k).
      block: rows per backward-pass block.
      lr: η (C scales with it; correlations do not).

    Returns:
      A JSON-ready dict: the setting, the exact run's times (seconds, warm and warm-up) and per k: k_total,
      spearman, pearson, time_s, warm_up_s, speedup (exact time / projected time).
    """
    import numpy as np
    from scipy.stats import pearsonr, spearmanr

    from dynamics.attribution import EvalSet, contribution_matrix
    from dynamics.attribution.projected import sketch_plan
    from dynamics.masks import partition, prepare, trainable_mask
    from experiments.benchmarks.attribute import bench_rows
    from experiments.studies import one_step

    train_rows, eval_rows = bench_rows(n_train, n_eval)
    train = one_step.encode_triples(loaded, train_rows)
    ev = one_step.encode_triples(loaded, eval_rows)
    evalset = EvalSet(ev.chosen, ev.rejected)
    rm, params = one_step.reward_model(reward, loaded)
    small_train, small_eval = train.select(range(min(block, n_train))), evalset.select(range(min(block, n_eval)))

    def run(**opts):
        _, warm = _timed(contribution_matrix, rm, params, small_train, small_eval, **opts)
        c, total = _timed(contribution_matrix, rm, params, train, evalset, **opts)
        return c, warm, total

    base = dict(params_spec=params_spec, lr=lr, block=block, memory_budget_gb=16.0)
    exact, exact_warm, exact_s = run(mode="exact", **base)
    prm, pparams, spec = prepare(rm, params, params_spec)
    tree, frozen = partition(pparams, trainable_mask(prm, pparams, spec))
    rows = []
    for k in ks:
        proj, warm, total = run(mode="projected", project=int(k), seed=seed, **base)
        a, b = proj.contribution.ravel(), exact.contribution.ravel()
        rows.append({
            "k": int(k), "k_total": sketch_plan(prm, tree, frozen, int(k)).k_total, "method": "sketch",
            "spearman": float(spearmanr(a, b).statistic), "pearson": float(pearsonr(a, b).statistic),
            "time_s": total, "warm_up_s": warm, "speedup": exact_s / total,
        })  # fmt: skip
    return {
        "model": loaded.name, "reward": reward, "params": spec, "n_trained": exact.meta["n_trained"],
        "n_train": n_train, "n_eval": n_eval, "seq_len": [train.chosen.seq_len, ev.chosen.seq_len], "block": block,
        "seed": seed, "exact_time_s": exact_s, "exact_warm_up_s": exact_warm,
        "exact_abs_mean": float(np.abs(exact.contribution).mean()), "projected": rows,
    }  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: print `compare_projection`'s result as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reward", choices=("ex", "im"), default="im")
    parser.add_argument("--params", default="last:2")
    parser.add_argument("--pairs", type=int, default=32, help="training pairs N")
    parser.add_argument("--eval", type=int, default=16, help="eval pairs M")
    parser.add_argument("--ks", default="512,2048,8192", help="projection sizes, comma-separated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--block", type=int, default=8)
    parser.add_argument("--model", default=None, metavar="PATH", help="model (default SmolLM2-135M-Instruct)")
    args = parser.parse_args(argv)
    from dynamics.loading import load

    result = compare_projection(
        load(args.model), reward=args.reward, params_spec=args.params, n_train=args.pairs, n_eval=args.eval,
        ks=[int(k) for k in args.ks.split(",")], seed=args.seed, block=args.block,
    )  # fmt: skip
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`rmdyn check-step`: the first-order Δr against real optimizer steps, over a sweep of learning rates.

For each η, one real SGD (or Adam) step on the training triple(s) is taken with the trainable parameters of
--params, the unseen rewards are re-evaluated, and the actual change is compared with the prediction of
`rmdyn delta` (docs/math.md §3: the residual is O(η²), so its log-log slope in η is 2 until float32 rounding of
r' − r takes over at small η). Prints per-η Pearson and Spearman correlations, sign agreement and the largest
residual, and the residual's slope; writes check_step.json and check_step.png under --out.

Examples:
  rmdyn check-step                                  # Persona demo triple and pairs, all parameters, SGD
  rmdyn check-step --params output --lrs 1e-3,1e-2,1e-1,1 --reward im
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from experiments.cli import arguments, inputs
from experiments.studies import one_step

__all__ = ["DEFAULT_LRS", "register", "run", "stats_lines"]

DEFAULT_LRS = "1e-5,1e-4,1e-3,1e-2"


def register(subparsers: Any) -> None:
    """Adds the `check-step` sub-command (no heavy imports here)."""
    parser = subparsers.add_parser(
        "check-step",
        help="first-order Δr vs real one-step updates over a sweep of η (correlations, residual slope)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    arguments.add_train_arguments(parser, several=True)
    arguments.add_unseen_arguments(parser, several=True)
    arguments.add_reward_arguments(parser, method=False)
    arguments.add_objective_arguments(parser)
    parser.add_argument("--lrs", default=DEFAULT_LRS, help=f"comma list of η (default {DEFAULT_LRS})")
    arguments.add_model_arguments(parser)
    parser.add_argument("--out", default="runs/check_step", help="output directory (default runs/check_step)")
    parser.set_defaults(func=run)


def stats_lines(name: str, result: Any) -> list[str]:
    """Per-η statistics and the residual slope of one `StepCheckResult`."""
    lines = [
        f"{name} ({result.meta.get('params')}, {result.meta.get('optimizer')}, {result.meta.get('dtype')}):",
        f"  {'η':>8} {'Pearson':>9} {'Spearman':>9} {'sign agr.':>9} {'max |res|':>10} {'max |Δr|':>10}"
        f" {'rel. err':>9}",
    ]
    for s in result.stats():
        lines.append(
            f"  {s['lr']:>8.2g} {s['pearson']:>9.5f} {s['spearman']:>9.4f} {s['sign_agreement']:>9.3f} "
            f"{s['max_abs_residual']:>10.3g} {s['max_abs_actual']:>10.3g} {s['relative_error']:>9.3g}"
        )
    slope = result.residual_slope()
    lines.append(
        f"  residual slope (log max|res| vs log η): {slope['slope_of_max']:.2f}; per pair median "
        f"{slope['median_pair_slope']:.2f} [{slope['min_pair_slope']:.2f}, {slope['max_pair_slope']:.2f}] "
        f"over {slope['decades']:.1f} decades (2 = first order exact up to O(η²))"
    )
    return lines


def run(args: argparse.Namespace) -> int:
    """Validates the options, runs `check_step` per reward type, prints the statistics, writes JSON + figure."""
    from dynamics.reward_types import reward_label

    kinds = arguments.reward_kinds(args.reward)
    spec = arguments.resolve_params(args.params, kinds)
    lrs = arguments.parse_lrs(args.lrs)
    arguments.check_positive(args.beta, "--beta")
    chunk = arguments.check_chunk_size(args.chunk_size)
    arguments.check_objective(args)
    arguments.check_inputs(args, "check_step.json", "check_step.png")
    rows, rows_from = inputs.training_rows(args)
    pairs, pairs_from = inputs.unseen_pairs(args)

    from dynamics.outputs import write_json_atomic  # JAX: only once every option is known to be good
    from dynamics.step_check import check_step
    from figures.step_scatter import step_scatter_figure

    t0 = time.perf_counter()
    loaded = inputs.load_model(args)
    train, unseen = one_step.encode(loaded, rows, pairs)
    print(
        f"one-step check: {args.optimizer} on the {args.objective} loss, params {spec}, η ∈ {lrs}; "
        f"{len(rows)} triple(s) from {rows_from}, "
        f"{len(pairs)} unseen pairs from {pairs_from}; model {loaded.name} ({time.perf_counter() - t0:.1f} s)"
    )
    results = {}
    for kind in kinds:  # --params against the loaded model, for every reward type before any computing
        arguments.check_params_on_model(*one_step.reward_model(kind, loaded, beta=args.beta, seed=args.seed), spec)
    for kind in kinds:
        name = reward_label(kind)
        rm, params = one_step.reward_model(kind, loaded, beta=args.beta, seed=args.seed)
        t1 = time.perf_counter()
        results[name] = check_step(
            rm, params, train, unseen, lrs=lrs, params_spec=spec, optimizer=args.optimizer, chunk_size=chunk,
            progress=True, objective=arguments.objective_for(args, rm),
        )  # fmt: skip
        print("\n".join(stats_lines(name, results[name])) + f"\n  ({time.perf_counter() - t1:.1f} s)")
    data = {
        "model": loaded.describe(),
        "train": one_step.describe_rows(rows),
        "unseen": one_step.describe_pairs(pairs),
        "options": {
            "lrs": lrs,
            "params": spec,
            "optimizer": args.optimizer,
            "objective": args.objective,
            "gamma": args.gamma,
            "label_smoothing": args.label_smoothing,
            "beta": args.beta,
            "seed": args.seed,
            "chunk_size": chunk,
        },
        "results": {k: r.to_dict() for k, r in results.items()},
    }
    js = write_json_atomic(f"{args.out}/check_step.json", data)
    png, _ = step_scatter_figure(results, f"{args.out}/check_step.png")
    print(f"wrote {js} and {png}")
    return 0

"""`rmdyn delta`: predicted one-step reward change Δr of unseen pairs, EX-RM beside IM-RM (docs/math.md §3).

One step of SGD (or Adam's first step) on the Bradley-Terry loss of the training triple(s) moves the reward of
an unseen pair u by Δr(u) = η · g · ⟨∇r(u), ∇r(x,y+) − ∇r(x,y−)⟩ + O(η²). `--method ntk` computes it for any
set of trainable parameters with one VJP and chunked JVPs; `--method closed_form` uses Eqs. (4) and (5)
(Assumption 1: only the EX-RM head / the untied IM-RM unembedding trains).

Prints one line per unseen pair (Δr, the reward before and, for one triple, the kernel terms K(u,y±)) and writes
delta.json and delta_bars.png under --out.

Examples:
  rmdyn delta                                          # the Persona demo triple and pairs, all parameters
  rmdyn delta --prompt "Is 2+2=4?" --chosen "Yes." --rejected "No." --pair "Is 3+3=6?" "Yes, it is."
  rmdyn delta --train prefs.jsonl --row 0 --row 3 --unseen pairs.jsonl --params last:4 --reward im
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from experiments.cli import arguments, inputs
from experiments.studies import one_step

__all__ = ["register", "run", "table"]


def register(subparsers: Any) -> None:
    """Adds the `delta` sub-command (no heavy imports here)."""
    parser = subparsers.add_parser(
        "delta",
        help="predicted Δr of unseen pairs after one step on a training triple, EX-RM vs IM-RM",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    arguments.add_train_arguments(parser, several=True)
    arguments.add_unseen_arguments(parser, several=True)
    arguments.add_reward_arguments(parser)
    arguments.add_objective_arguments(parser)
    parser.add_argument("--lr", type=float, default=arguments.DEFAULT_LR,
                        help=f"learning rate η (default {arguments.DEFAULT_LR:g})")  # fmt: skip
    arguments.add_model_arguments(parser)
    parser.add_argument("--out", default="runs/delta", help="output directory (default runs/delta)")
    parser.set_defaults(func=run)


def table(results: dict[str, Any], pairs: list[Any]) -> list[str]:
    """One line per unseen pair: Δr and r before per reward type, and K(u,y+), K(u,y−) for a single triple."""
    names = list(results)
    head = f"{'#':>3}  {'unseen pair':<44}"
    for name in names:
        r = results[name]
        head += f" {name + ' Δr':>14} {'r before':>10}"
        if r.kernel_chosen is not None and r.kernel_chosen.shape[1] == 1:
            head += f" {'K(u,y+)':>10} {'K(u,y−)':>10}"
    lines = [head]
    for i, pair in enumerate(pairs):
        line = f"{i:>3}  {one_step.pair_label(pair, 44):<44}"
        for name in names:
            r = results[name]
            line += f" {r.delta[i]:>14.4g} {r.reward_before[i]:>10.4g}"
            if r.kernel_chosen is not None and r.kernel_chosen.shape[1] == 1:
                line += f" {r.kernel_chosen[i, 0]:>10.4g} {r.kernel_rejected[i, 0]:>10.4g}"
        lines.append(line)
    return lines


def run(args: argparse.Namespace) -> int:
    """Validates the options, computes Δr per reward type, prints the table, writes JSON + figure."""
    from dynamics.reward_types import reward_label

    kinds = arguments.reward_kinds(args.reward)
    spec = arguments.resolve_params(args.params, kinds, args.method)
    lr = arguments.check_positive(args.lr, "--lr")
    arguments.check_positive(args.beta, "--beta")
    chunk = arguments.check_chunk_size(args.chunk_size)
    arguments.check_objective(args)
    if args.method == "closed_form" and args.optimizer != "sgd":
        from dynamics.errors import ConfigError

        raise ConfigError("--method closed_form is the SGD step (docs/math.md §3); Adam's first step needs ntk")
    arguments.check_inputs(args, "delta.json", "delta_bars.png", "delta_bars.json")
    rows, rows_from = inputs.training_rows(args)
    pairs, pairs_from = inputs.unseen_pairs(args)

    from dynamics.delta import delta_reward  # JAX: only once every option is known to be good
    from dynamics.outputs import write_json_atomic
    from figures.delta_bars import delta_bars_figure

    t0 = time.perf_counter()
    loaded = inputs.load_model(args)
    train, unseen = one_step.encode(loaded, rows, pairs)
    print(
        f"Δr after one {args.optimizer} step on the {args.objective} loss (η = {lr:g}, params {spec}, "
        f"{args.method}) on {len(rows)} triple(s) "
        f"from {rows_from}; {len(pairs)} unseen pairs from {pairs_from}; model {loaded.name} "
        f"(loaded in {time.perf_counter() - t0:.1f} s)"
    )
    results = {}
    for kind in kinds:  # --params against the loaded model, for every reward type before any computing
        arguments.check_params_on_model(*one_step.reward_model(kind, loaded, beta=args.beta, seed=args.seed), spec)
    for kind in kinds:
        rm, params = one_step.reward_model(kind, loaded, beta=args.beta, seed=args.seed)
        t1 = time.perf_counter()
        results[reward_label(kind)] = delta_reward(
            rm, params, train, unseen, params_spec=spec, lr=lr, optimizer=args.optimizer, method=args.method,
            chunk_size=chunk, progress=True, objective=arguments.objective_for(args, rm),
        )  # fmt: skip
        r = results[reward_label(kind)]
        print(
            f"  {reward_label(kind)}: {time.perf_counter() - t1:.1f} s, {r.meta['n_trained']:,} trained "
            f"parameters, training rewards r+ {r.train_chosen_reward.round(4).tolist()}, "
            f"r− {r.train_rejected_reward.round(4).tolist()}, w {r.bt_weight.round(4).tolist()}"
        )
    print("\n".join(table(results, pairs)))
    data = {
        "model": loaded.describe(),
        "train": one_step.describe_rows(rows),
        "unseen": one_step.describe_pairs(pairs),
        "options": {
            "lr": lr,
            "params": spec,
            "method": args.method,
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
    js = write_json_atomic(f"{args.out}/delta.json", data)
    png, _ = delta_bars_figure(
        results,
        [one_step.pair_label(p, 48) for p in pairs],
        f"{args.out}/delta_bars.png",
        expected=[getattr(p, "expected", 0) for p in pairs],
        title=f"Predicted Δr after one {args.optimizer} step (η = {lr:g}, params {spec}, {args.method})",
    )
    print(f"wrote {js} and {png}")
    return 0

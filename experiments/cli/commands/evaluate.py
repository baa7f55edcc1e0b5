"""`rmdyn evaluate`: the rewards of a preference file under a model, with the metrics TRL logs.

For every pair {prompt, chosen, rejected} of --data: r(x, y+) and r(x, y−), and over the file rewards/chosen,
rewards/rejected, rewards/margins, rewards/accuracies (strict, as TRL), the accuracy with ties ½, the objective's
loss and, for the IM-RM, logps/chosen and logps/rejected (docs/math.md §1, §11). The IM-RM is r = β ln(π_θ/π_ref)
of --model (the policy) and --ref (or the base model under --adapter; else the model itself, which makes every
reward 0); β and the objective come from the run's training_args.bin when TRL saved one. The EX-RM needs a reward
model checkpoint with its score head (a sequence-classification model, as TRL's RewardTrainer saves it).

Prints the metrics, writes evaluation.json (every pair's rewards) under --out.

Examples:
  rmdyn evaluate --data prefs.jsonl --model runs/dpo/policy --ref runs/dpo/ref
  rmdyn evaluate --data prefs.jsonl --model base --adapter runs/dpo/adapter
  rmdyn evaluate --data prefs.jsonl --model runs/reward_model --reward ex
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from experiments.cli import arguments, inputs

__all__ = ["register", "run", "table"]


def register(subparsers: Any) -> None:
    """Adds the `evaluate` sub-command (no heavy imports here)."""
    parser = subparsers.add_parser(
        "evaluate",
        help="rewards of a preference file under a model (policy + reference, adapter, reward model): TRL's metrics",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", metavar="FILE", required=True, help="JSONL of pairs {prompt, chosen, rejected}")
    parser.add_argument("--reward", choices=arguments.REWARD_CHOICES, default="im",
                        help="reward type(s): im (the DPO policy's implicit reward, default), ex (a reward model "
                             "checkpoint's score head) or both")  # fmt: skip
    arguments.add_objective_arguments(parser)
    parser.add_argument("--chunk-size", type=int, default=16, help="sequences per forward pass (default 16)")
    arguments.add_model_arguments(parser, head_seed=False)
    parser.add_argument("--out", default="runs/evaluate", help="output directory (default runs/evaluate)")
    parser.set_defaults(func=run)


def table(results: dict[str, Any]) -> list[str]:
    """One line per metric, one column per reward type."""
    names = list(results)
    keys = list(dict.fromkeys(k for r in results.values() for k in r.metrics))
    lines = [f"{'metric':<22}" + "".join(f" {n:>12}" for n in names)]
    for k in keys:
        cells = "".join(f" {results[n].metrics[k]:>12.6g}" if k in results[n].metrics else f" {'':>12}" for n in names)
        lines.append(f"{k:<22}{cells}")
    return lines


def run(args: argparse.Namespace) -> int:
    """Checks the options and the file, loads the model, computes the rewards, prints and writes JSON."""
    from dynamics.errors import ConfigError
    from experiments.cli.preflight import check_input_file

    kinds = arguments.reward_kinds(args.reward)
    arguments.check_positive(args.beta, "--beta")
    chunk = arguments.check_chunk_size(args.chunk_size)
    arguments.check_objective(args)
    check_input_file(args.data, "--data")
    arguments.check_inputs(args, "evaluation.json")
    from dynamics.datasets import load_preferences

    rows = load_preferences(args.data)

    from dynamics.outputs import write_json_atomic  # JAX from here on
    from dynamics.pair_rewards import evaluate_pairs
    from dynamics.reward_types import reward_label
    from experiments.studies import one_step

    t0 = time.perf_counter()
    loaded = inputs.load_model(args)
    if "ex" in kinds and loaded.score_head is None:
        raise ConfigError(
            f"--reward ex: {loaded.source} has no score head (not a sequence-classification checkpoint), so its "
            "EX-RM head would be random; pass a reward model saved by transformers or TRL's RewardTrainer"
        )
    pairs = one_step.encode_triples(loaded, rows)
    print(f"{len(rows)} pairs from {args.data}; model {loaded.name}"
          + ("" if loaded.ref_source is None else f", reference {loaded.ref_source}")
          + ("" if loaded.adapter_source is None else f", adapter {loaded.adapter_source}")
          + f"; β = {args.beta:g}, objective {args.objective} ({time.perf_counter() - t0:.1f} s)")  # fmt: skip
    if "im" in kinds and loaded.ref_source is None and loaded.adapter_source is None:
        print("note: no --ref and no --adapter: π_ref is the model itself, so every IM-RM reward is 0")
    results = {}
    for kind in kinds:
        rm, params = one_step.reward_model(kind, loaded, beta=args.beta)
        results[reward_label(kind)] = evaluate_pairs(
            rm, params, pairs, objective=arguments.objective_for(args, rm), chunk=chunk
        )
    print("\n".join(table(results)))
    data = {
        "model": loaded.describe(start=args.out),
        "data": {"source": args.data, "rows": one_step.describe_rows(rows)},
        "options": {
            "reward": args.reward,
            "beta": args.beta,
            "objective": args.objective,
            "gamma": args.gamma,
            "label_smoothing": args.label_smoothing,
        },  # fmt: skip
        "results": {k: r.to_dict() for k, r in results.items()},
    }
    print(f"wrote {write_json_atomic(f'{args.out}/evaluation.json', data)}")
    return 0

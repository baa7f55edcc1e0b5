"""`rmdyn attribute`: which training pairs moved which eval rewards, EX-RM beside IM-RM (docs/math.md §10).

For N training pairs (--train) and M eval items (--eval: pairs {prompt, chosen, rejected}, whose margin is
attributed, or single responses {prompt, response}), computes the contribution matrix
C_ij = η w_j ⟨∇q_i, ∇r(x_j,y_j+) − ∇r(x_j,y_j−)⟩ of one SGD step (exact per-sequence gradients, or k-dimensional
random projections with --project K), ranks the training pairs that push each item up and down, tests whether C
follows token overlap or hidden-state similarity, and, for the IM-RM, splits the largest entries into token pairs.

Writes under --out: attribution.json (C, the rankings, the statistics, the texts), the figures (PNG + JSON) and
report.html (one self-contained page to open in a browser).

Examples:
  rmdyn attribute --train prefs.jsonl --eval eval_pairs.jsonl --params last:2 --out runs/attr
  rmdyn attribute --train prefs.jsonl --eval eval_pairs.jsonl --params all --project 2048 --reward im
  rmdyn attribute --train prefs.jsonl --eval eval_pairs.jsonl --run runs/my_run    # along a trained run
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from experiments.cli import arguments, inputs

__all__ = ["register", "run"]

OUT_FILES = (
    "attribution.json", "report.html", "attribution_heatmap.png", "attribution_overlap.png", "attribution_tokens.png",
    "attribution_run.png", "attribution_trajectory.png",
)  # fmt: skip


def register(subparsers: Any) -> None:
    """Adds the `attribute` sub-command (no heavy imports here)."""
    parser = subparsers.add_parser(
        "attribute",
        help="which training pairs (and tokens) moved which eval rewards, EX-RM vs IM-RM",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--train", metavar="FILE", help="JSONL of training pairs {prompt, chosen, rejected}")
    parser.add_argument("--eval", metavar="FILE",
                        help="JSONL of eval pairs {prompt, chosen, rejected} or responses {prompt, response}; "
                             "an optional integer field train_row names the training pair it derives from")  # fmt: skip
    parser.add_argument("--bundled", choices=("persona", "ultrafeedback"), default=None,
                        help="instead of --train/--eval: a bundled input set, written to --out as train.jsonl and "
                             "eval.jsonl (persona: 80 agreeableness triples vs the 40 test paraphrase pairs; "
                             "ultrafeedback: 64 pairs vs their paraphrases)")  # fmt: skip
    parser.add_argument(
        "--reward", choices=arguments.REWARD_CHOICES, default="both", help="reward type(s) (default both)"
    )
    parser.add_argument("--params", default="all", metavar="SPEC",
                        help=f"trainable parameters: {arguments.PARAMS_HELP} (default all)")  # fmt: skip
    parser.add_argument("--run", metavar="DIR", default=None,
                        help="a run directory of rmdyn's trainer (checkpoints kept) on the --train pairs: the "
                             "predicted total change beside the actual one, and the linearised trajectory")  # fmt: skip
    parser.add_argument("--tolerance", type=float, default=0.1,
                        help="--run: the linearised trajectory parts from the run where its error exceeds this "
                             "fraction of the largest actual change (default 0.1)")  # fmt: skip
    parser.add_argument("--project", type=int, default=None, metavar="K",
                        help="random projections of the gradients to K dimensions (default: exact)")  # fmt: skip
    parser.add_argument("--projection-seed", type=int, default=0, help="seed of the projection (default 0)")
    parser.add_argument("--top", type=int, default=5, help="training pairs per eval item and direction (default 5)")
    parser.add_argument("--token-entries", type=int, default=4,
                        help="largest IM-RM entries split into token pairs (default 4)")  # fmt: skip
    parser.add_argument("--lr", type=float, default=arguments.DEFAULT_LR,
                        help=f"learning rate η of the step (default {arguments.DEFAULT_LR:g})")  # fmt: skip
    arguments.add_objective_arguments(parser)
    parser.add_argument("--block", type=int, default=4, help="sequences per backward-pass block (default 4)")
    parser.add_argument("--memory-budget", type=float, default=8.0, metavar="GIB",
                        help="exact mode holds at most this many GiB of gradients (default 8)")  # fmt: skip
    arguments.add_model_arguments(parser)
    parser.add_argument("--out", default="runs/attribute", help="output directory (default runs/attribute)")
    parser.set_defaults(func=run)


def _check_options(args: argparse.Namespace) -> tuple[list[str], str]:
    """(reward kinds, --params spec), every option checked before JAX loads."""
    from dynamics.errors import ConfigError

    kinds = arguments.reward_kinds(args.reward)
    spec = arguments.resolve_params(args.params, kinds)
    arguments.check_positive(args.lr, "--lr")
    arguments.check_positive(args.beta, "--beta")
    arguments.check_positive(args.memory_budget, "--memory-budget")
    arguments.check_objective(args)
    if args.project is not None and args.project < 1:
        raise ConfigError(f"--project must be ≥ 1 (the projection size k), got {args.project}")
    for flag, value in (("--top", args.top), ("--block", args.block)):
        if value < 1:
            raise ConfigError(f"{flag} must be ≥ 1, got {value}")
    if args.token_entries < 0:
        raise ConfigError(f"--token-entries must be ≥ 0, got {args.token_entries}")
    if args.bundled is not None and (args.train or args.eval):
        raise ConfigError("--bundled replaces --train and --eval: give one or the other")
    if args.bundled is None and not (args.train and args.eval):
        raise ConfigError("give --train FILE and --eval FILE (or --bundled persona|ultrafeedback)")
    from experiments.cli.preflight import check_input_file

    check_input_file(args.eval, "--eval")
    if args.run is not None:
        arguments.check_positive(args.tolerance, "--tolerance")
        arguments.check_run_record(args.run, args.reward, args.objective)
    arguments.check_inputs(args, *OUT_FILES)
    return kinds, spec


def _read_inputs(args: argparse.Namespace) -> tuple[list[Any], Any]:
    """(training rows, eval items), each file checked row by row (file and line in every error)."""
    from dynamics.attribution import load_eval_items
    from dynamics.datasets import load_preferences
    from dynamics.errors import DataError

    if args.bundled is not None:
        from experiments.studies.attribution_inputs import write_inputs

        args.train, args.eval = (str(p) for p in write_inputs(args.bundled, args.out))
    rows, items = load_preferences(args.train), load_eval_items(args.eval)
    for n, source in enumerate(items.train_rows):
        if source is not None and source >= len(rows):
            raise DataError(
                f"{args.eval}: item {n} (line {items.rows[n].line}) has train_row {source}, but {args.train} has "
                f"{len(rows)} training pairs"
            )
    return rows, items


def _encode(loaded: Any, rows: list[Any], items: Any) -> tuple[Any, Any]:
    """(PreferenceBatch of the training pairs, EvalSet of the eval items)."""
    from dynamics.attribution import EvalSet
    from experiments.studies import one_step

    train = one_step.encode_triples(loaded, rows)
    if items.kind == "pairs":
        ev = one_step.encode_triples(loaded, list(items.rows))
        return train, EvalSet(ev.chosen, ev.rejected)
    return train, EvalSet(one_step.encode_unseen(loaded, list(items.rows)))


def _figures(out: Path, results: dict[str, Any], loaded: Any) -> list[tuple[Path, str]]:
    from figures.attribution import contribution_heatmaps, overlap_scatter, token_pair_bars

    images = [
        (contribution_heatmaps(results, out / "attribution_heatmap.png")[0], "C over its largest rows and columns"),
        (overlap_scatter(results, out / "attribution_overlap.png")[0],
         "rank of C against token overlap and hidden similarity"),
    ]  # fmt: skip
    views, entries = {}, {}
    for res in results.values():
        C = res["contributions"]["contribution"]
        for key, view in res.get("token_views", {}).items():
            i, j = map(int, key.split(","))
            views[key], entries[key] = view, C[i][j]
    if views:
        png, _ = token_pair_bars(views, _token_text(loaded), out / "attribution_tokens.png", entries=entries)
        images.append((png, "IM-RM: the largest token-pair terms of the largest entries (hatched: identical tokens)"))
    return images


def _run(args: argparse.Namespace, loaded: Any, train: Any, evalset: Any) -> dict[str, Any]:
    """The --run analysis (experiments.studies.attribution_run), printed in one line."""
    from dynamics.outputs import jsonable, portable_path
    from experiments.studies.attribution_run import run_analysis

    reward = None if args.reward == "both" else args.reward
    res = run_analysis(args.run, loaded, train, evalset, reward=reward, block=args.block,
                       memory_budget_gb=args.memory_budget, tolerance=args.tolerance)  # fmt: skip
    res["run"]["meta"] = {**res["run"]["meta"], "run_dir": portable_path(args.run, args.out)}
    traj = res["trajectory"]
    parted = traj.get("skipped") or f"linearised trajectory parts at step {traj['parting_step']}"
    print(f"  along the run ({res['reward']}): Pearson(predicted, actual) = {res['run']['pearson']}; {parted}")
    return jsonable(res)


def _run_figures(out: Path, run: dict[str, Any] | None) -> list[tuple[Path, str]]:
    if run is None:
        return []
    from figures.attribution import predicted_vs_actual, trajectory_curves

    label = run["reward"]
    images = [(predicted_vs_actual({label: (run["run"]["predicted_change"], run["run"]["actual_change"])},
                                   out / "attribution_run.png")[0],
               "along the run: predicted total change (sum over checkpoints) against the actual change")]  # fmt: skip
    if "skipped" not in run["trajectory"]:
        png, _ = trajectory_curves({label: run["trajectory"]}, out / "attribution_trajectory.png")
        images.append((png, "the linearised trajectory from the kernels at θ_0 (dashed) against the run (solid)"))
    return images


def _attribute_or_explain(*args: Any, **kwargs: Any) -> Any:
    """`attribute`, with the memory-budget refusal told in the flags' terms."""
    from dynamics.attribution.analysis import attribute
    from dynamics.errors import ConfigError

    try:
        return attribute(*args, **kwargs)
    except ConfigError as err:
        if "GiB budget" not in str(err):
            raise
        raise ConfigError(f"{err} (flags: --project K, --params, --memory-budget GIB)") from None


def _token_text(loaded: Any):
    def text(token_id: int) -> str:
        return loaded.tokenizer.decode([int(token_id)])

    return text


def run(args: argparse.Namespace) -> int:
    """Checks the options and the files, computes C per reward type, writes JSON, figures and report.html."""
    kinds, spec = _check_options(args)
    rows, items = _read_inputs(args)
    from dynamics.outputs import portable_path, write_json_atomic
    from dynamics.reward_types import reward_label
    from experiments.studies import one_step
    from figures.attribution_report import write_report

    t0 = time.perf_counter()
    loaded = inputs.load_model(args)
    train, evalset = _encode(loaded, rows, items)
    mode = "exact" if args.project is None else f"projected (k = {args.project})"
    print(
        f"attribution of {len(items)} eval {items.kind} to {len(rows)} training pairs; params {spec}, {mode}, "
        f"η = {args.lr:g}; model {loaded.name} (loaded in {time.perf_counter() - t0:.1f} s)"
    )
    if args.run is not None:  # another model, other training pairs or other initial weights: refused now
        from dynamics.attribution.along_run import load_run_model

        load_run_model(args.run, loaded.lm, loaded.params, train, reward=None if args.reward == "both" else args.reward)
    models = {kind: one_step.reward_model(kind, loaded, beta=args.beta, seed=args.seed) for kind in kinds}
    for rm, params in models.values():  # --params against the loaded model before any computing
        arguments.check_params_on_model(rm, params, spec)
    results = {}
    for kind, (rm, params) in models.items():
        t1 = time.perf_counter()
        res = _attribute_or_explain(
            rm, params, train, evalset, params_spec=spec, lr=args.lr,
            mode="exact" if args.project is None else "projected",
            project=args.project, seed=args.projection_seed, top=args.top, token_entries=args.token_entries,
            block=args.block, memory_budget_gb=args.memory_budget, progress=True,
            train_rows=items.train_rows if any(r is not None for r in items.train_rows) else None,
            objective=arguments.objective_for(args, rm),
        )  # fmt: skip
        s = res.statistics
        print(
            f"  {reward_label(kind)}: {time.perf_counter() - t1:.1f} s, {res.contributions.meta['n_trained']:,} "
            f"trained parameters; Spearman(C, overlap) {s['spearman_overlap']:.3f}, (C, hidden) "
            f"{s['spearman_hidden']:.3f}"
            + ("" if s["indicator_share"] is None else f", identical-token share {s['indicator_share']:.3f}")
            + ("" if s["source"] is None else f"; own source pair: mean rank {s['source']['mean_rank']:.1f} of "
               f"{len(rows)}, top-1 {s['source']['top1']:.2f}")
        )  # fmt: skip
        results[reward_label(kind)] = res.to_dict()
    out = Path(args.out)
    data = {
        "model": loaded.describe(start=out),
        "train": {"file": portable_path(args.train, out), "rows": one_step.describe_rows(rows)},
        "eval": {"file": portable_path(args.eval, out), "kind": items.kind, "rows": items.describe()},
        "options": {
            "params": spec, "lr": args.lr, "project": args.project, "projection_seed": args.projection_seed,
            "beta": args.beta, "seed": args.seed, "top": args.top, "block": args.block, "bundled": args.bundled,
            "objective": args.objective, "gamma": args.gamma, "label_smoothing": args.label_smoothing,
        },
        "results": results,
    }  # fmt: skip
    if args.run is not None:
        data["run"] = _run(args, loaded, train, evalset)
    js = write_json_atomic(out / "attribution.json", data)
    images = _figures(out, results, loaded) + _run_figures(out, data.get("run"))
    html = write_report(out / "report.html", data, images, _token_text(loaded))
    print(f"wrote {js}, {html} and {len(images)} figures")
    return 0

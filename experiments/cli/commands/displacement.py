"""`rmdyn displacement`: does one DPO step lower the log-likelihood of the responses it prefers? (docs/math.md §12)

For every training pair, the predicted first-order change of ln π_θ(y+|x) and ln π_θ(y−|x) after one step on all
of them (Δ ln π = Δr_IM / β), beside the change after one real optimizer step (skip it with --no-check). Also:
the pairs whose chosen log-likelihood is predicted to fall, and each pair's length-normalised CHES similarity. With
--model POLICY --ref REF the step starts from your own DPO policy, with its reference. With --run DIR (an IM-RM run
of rmdyn's trainer on the --train pairs, checkpoints kept), the changes over the whole run instead: predicted by
linearising each step at its checkpoint, beside the actual change read from the checkpoints (docs/math.md §12.1).

Prints a table, writes displacement.json and displacement_scatter.png (+ .json) under --out.

Examples:
  rmdyn displacement                                   # the 80 Persona training triples, SmolLM2, all parameters
  rmdyn displacement --train prefs.jsonl --model runs/dpo/policy --ref runs/dpo/ref --lr 1e-5
  rmdyn displacement --train prefs.jsonl --eval responses.jsonl --objective ipo
  rmdyn displacement --train prefs.jsonl --run runs/my_im_run                # along a trained run
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from experiments.cli import arguments, inputs

__all__ = ["register", "run", "table"]

OUT_FILES = ("displacement.json", "displacement_scatter.png", "displacement_scatter.json")
RUN_SETTINGS = ("--lr", "--optimizer", "--params", "--no-check")


def register(subparsers: Any) -> None:
    """Adds the `displacement` sub-command (no heavy imports here)."""
    parser = subparsers.add_parser(
        "displacement",
        help="predicted (and actual) one-step change of ln π(y+) and ln π(y−): likelihood displacement, CHES",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--train", metavar="FILE", default=None,
                        help="JSONL of training pairs {prompt, chosen, rejected} (default: the 80 Persona "
                             "agreeableness training triples)")  # fmt: skip
    parser.add_argument("--eval", metavar="FILE", default=None,
                        help="JSONL of more responses {prompt, response} or pairs whose Δ ln π to predict")  # fmt: skip
    parser.add_argument("--params", default=None, metavar="SPEC",
                        help=f"trainable parameters: {arguments.PARAMS_HELP} (default all)")  # fmt: skip
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default=None, help="the step (default sgd)")
    parser.add_argument("--lr", type=float, default=None,
                        help=f"learning rate η (default {arguments.DEFAULT_LR:g})")  # fmt: skip
    parser.add_argument("--run", metavar="DIR", default=None,
                        help="an IM-RM run directory of rmdyn's trainer on the --train pairs (checkpoints kept): the "
                             "predicted and actual changes over the whole run; η, optimizer, parameters, β and "
                             "objective are the run's")  # fmt: skip
    arguments.add_objective_arguments(parser)
    parser.add_argument("--no-check", action="store_true", help="predict only: no real optimizer step")
    parser.add_argument("--chunk-size", type=int, default=8, help="sequences per JVP batch (default 8)")
    arguments.add_model_arguments(parser, head_seed=False)
    parser.add_argument("--out", default="runs/displacement", help="output directory (default runs/displacement)")
    parser.set_defaults(func=run)


def _rows(args: argparse.Namespace) -> tuple[list[Any], str, list[Any]]:
    """(training rows, where from, eval responses as UnseenPair-like rows), files checked row by row."""
    from dynamics.datasets import PreferenceRow, UnseenPair, load_preferences

    if args.train is not None:
        rows, source = load_preferences(args.train), args.train
    else:
        from experiments.studies.attribution_inputs import bundled_inputs

        train, _ = bundled_inputs("persona")
        rows = [
            PreferenceRow(r["prompt"], r["chosen"], r["rejected"], i, "persona", i + 1) for i, r in enumerate(train)
        ]
        source = "the bundled Persona training triples"
    extra: list[Any] = []
    if args.eval is not None:
        from dynamics.attribution import load_eval_items

        items = load_eval_items(args.eval)
        for r in items.rows:
            if items.kind == "responses":
                extra.append(r)
            else:
                extra += [UnseenPair(r.prompt, r.chosen, "+1", r.source, r.line),
                          UnseenPair(r.prompt, r.rejected, "-1", r.source, r.line)]  # fmt: skip
    return rows, source, extra


def table(result: Any, rows: list[Any], width: int = 40) -> list[str]:
    """One line per training pair: predicted (and actual) Δ ln π(y+), Δ ln π(y−), ln-CHES, a flag when y+ falls."""
    actual = result.actual_chosen is not None
    head = f"{'#':>3}  {'training pair (y+)':<{width}} {'Δlnπ(y+)':>10}" + (f" {'actual':>10}" if actual else "")
    head += f" {'Δlnπ(y−)':>10}" + (f" {'actual':>10}" if actual else "") + f" {'ln-CHES':>9}"
    lines = [head]
    for j, row in enumerate(rows):
        text = row.chosen if len(row.chosen) <= width else row.chosen[: width - 1] + "…"
        line = f"{j:>3}  {text:<{width}} {result.chosen[j]:>10.3g}"
        line += f" {result.actual_chosen[j]:>10.3g}" if actual else ""
        line += f" {result.rejected[j]:>10.3g}" + (f" {result.actual_rejected[j]:>10.3g}" if actual else "")
        line += f" {result.ln_ches[j]:>9.3g}" + ("  ↓ y+ falls" if result.chosen[j] < 0 else "")
        lines.append(line)
    return lines


def _check_options(args: argparse.Namespace) -> str:
    """The --params spec; every option checked (and the one-step defaults filled in) before JAX loads."""
    from dynamics.errors import ConfigError

    if args.run is not None:
        given = [f for f in RUN_SETTINGS if getattr(args, f[2:].replace("-", "_")) not in (None, False)]
        if given:
            raise ConfigError(f"--run takes η, the optimizer and the trained parameters from {args.run}/config.json, "
                              f"and its change is always checked: drop {', '.join(given)}")  # fmt: skip
        arguments.check_run_record(args.run, "im", args.objective)
    args.params = args.params or "all"
    args.optimizer = args.optimizer or "sgd"
    args.lr = arguments.DEFAULT_LR if args.lr is None else args.lr
    spec = arguments.resolve_params(args.params, ["im"])
    arguments.check_positive(args.lr, "--lr")
    arguments.check_positive(args.beta, "--beta")
    arguments.check_chunk_size(args.chunk_size)
    arguments.check_objective(args)
    from experiments.cli.preflight import check_input_file

    check_input_file(args.train, "--train")
    check_input_file(args.eval, "--eval")
    arguments.check_inputs(args, *OUT_FILES)
    return spec


def _compute(args: argparse.Namespace, loaded: Any, train: Any, ev: Any, spec: str) -> Any:
    """The one-step prediction (and check), or the along-run one of --run."""
    from dynamics.displacement import check_displacement, likelihood_displacement
    from dynamics.displacement_run import displacement_along_run
    from experiments.studies import one_step

    if args.run is not None:
        return displacement_along_run(args.run, loaded.lm, loaded.params, train, eval_responses=ev,
                                      chunk_size=args.chunk_size, progress=True)  # fmt: skip
    rm, params = one_step.reward_model("im", loaded, beta=args.beta)
    arguments.check_params_on_model(rm, params, spec)
    fn = likelihood_displacement if args.no_check else check_displacement
    return fn(rm, params, train, eval_responses=ev, params_spec=spec, lr=args.lr, optimizer=args.optimizer,
              objective=arguments.objective_for(args, rm), chunk_size=args.chunk_size, progress=True)  # fmt: skip


def _header(args: argparse.Namespace, rows: list[Any], source: str, loaded: Any, spec: str) -> str:
    what = f"one {args.optimizer} step on the {args.objective} loss (η = {args.lr:g}, params {spec})"
    if args.run is not None:
        what = f"along the run {args.run} (its η, optimizer, parameters, β and objective)"
    return f"likelihood displacement: {what}, {len(rows)} pairs from {source}; model {loaded.name}" + (
        "" if loaded.ref_source is None else f", reference {loaded.ref_source}"
    )


def run(args: argparse.Namespace) -> int:
    """Checks the options and files, predicts (and checks) the displacement, prints, writes JSON + figure."""
    spec = _check_options(args)
    rows, source, extra = _rows(args)

    from dynamics.outputs import portable_path, write_json_atomic  # JAX from here on
    from experiments.studies import one_step
    from figures.displacement import displacement_figure

    t0 = time.perf_counter()
    loaded = inputs.load_model(args)
    train = one_step.encode_triples(loaded, rows)
    ev = one_step.encode_unseen(loaded, extra) if extra else None
    print(_header(args, rows, source, loaded, spec) + f" ({time.perf_counter() - t0:.1f} s)")
    result = _compute(args, loaded, train, ev, spec)
    print("\n".join(table(result, rows)))
    s = result.summary()
    line = f"chosen log-likelihood predicted to fall on {s['predicted_chosen_falls']:.1%} of the pairs"
    if "actual_chosen_falls" in s:
        line += (f" (actual {s['actual_chosen_falls']:.1%}; sign agreement y+ {s['sign_agreement_chosen']:.1%}, "
                 f"y− {s['sign_agreement_rejected']:.1%})")  # fmt: skip
    print(line + f"; Spearman(ln-CHES, −Δ ln π(y+)) {s['spearman_ln_ches_vs_chosen_fall']:.3f}")
    out = Path(args.out)
    options = {"params": spec, "lr": args.lr, "optimizer": args.optimizer, "objective": args.objective,
               "gamma": args.gamma, "label_smoothing": args.label_smoothing, "beta": args.beta,
               "check": not args.no_check}  # fmt: skip
    if args.run is not None:
        options = {"run": portable_path(args.run, out), **{k: result.meta[k] for k in ("params", "lr", "optimizer",
                   "objective", "beta")}}  # fmt: skip
    data = {
        "model": loaded.describe(start=out),
        "train": {"source": source, "rows": one_step.describe_rows(rows)},
        "eval": None if not extra else one_step.describe_pairs(extra),
        "options": options,
        "result": result.to_dict(),
    }
    if args.run is not None:
        data["result"]["meta"]["run_dir"] = options["run"]
    js = write_json_atomic(out / "displacement.json", data)
    png, _ = displacement_figure(result, out / "displacement_scatter.png")
    print(f"wrote {js} and {png}")
    return 0

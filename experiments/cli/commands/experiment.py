"""`rmdyn experiment NAME`: run one of the paper's experiments from its plan (experiments/plans/NAME.toml).

A plan is a base config plus an options grid (the official code's plan style); a preset adapts it to a
machine: `cpu` runs here (SmolLM2-135M, a few blocks trained), `paper` is the paper's setting (its models as
local paths, full-parameter training, lr 1e-6). Every grid combination is one run in OUT/<run name>/
(config.json, metrics.jsonl, summary.json, checkpoints/); OUT/results.json holds the plan and the table.

Examples:

    rmdyn experiment persona --preset cpu
    rmdyn experiment persona --preset cpu --set reward=im --set epochs=2 --out runs/persona-smoke
    rmdyn experiment persona --preset cpu --out runs/persona-cpu --resume      # after Ctrl-C or a kill

Every run's data and options are checked before the first one trains.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    """Adds the `experiment` sub-command (no heavy imports here)."""
    parser = subparsers.add_parser(
        "experiment",
        help="run a paper experiment from its plan (persona, hamiltonian, ultrafeedback, ...)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "name",
        help="a bundled plan (persona, persona_ablations, hamiltonian, ultrafeedback, ultrafeedback_ablations, "
        "rewardmath) or a path to a .toml plan",
    )
    parser.add_argument("--preset", default="cpu", help="preset of the plan: cpu (default) or paper")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key (type-checked; a grid axis becomes one value); options.KEY=[json list] sets an axis",
    )
    parser.add_argument("--out", default=None, help="output directory (default runs/<name>-<preset>)")
    parser.add_argument("--resume", action="store_true", help="continue the runs in --out from their checkpoints")
    parser.add_argument("--dry-run", action="store_true", help="check the plan and the data, print the runs, stop")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def _check_resume(out: Any, runs: list[Any]) -> None:
    """ConfigError unless `out` holds at least one of the plan's runs to continue (--resume)."""
    from dynamics.errors import ConfigError

    expected = (
        f"expected run directories {out}/<run>/ with config.json and checkpoints/ for the runs "
        f"{', '.join(s.name for s in runs)} (written by an interrupted `rmdyn experiment` with the same plan, "
        "preset and --set); check --out, or leave out --resume to start afresh"
    )
    if not out.exists():
        raise ConfigError(f"--resume: nothing to resume: {out} does not exist; {expected}")
    if not out.is_dir():
        raise ConfigError(f"--resume: nothing to resume: {out} is a file, not a directory; {expected}")
    if not any((out / spec.name / "config.json").is_file() for spec in runs):
        found = sorted(p.name for p in out.iterdir() if (p / "config.json").is_file())
        seen = f"it holds the runs {found}, none of this plan's" if found else "it holds no run directories"
        raise ConfigError(f"--resume: nothing to resume in {out}: {seen}; {expected}")


def run(args: argparse.Namespace) -> int:
    """Checks the plan, its output directory and every run, then trains the runs one by one and writes results.json.

    The study is reached through its `StudyRunner` (`experiments.studies.protocol`).
    """
    import json
    import sys
    import time
    from pathlib import Path

    from dynamics.errors import ConfigError
    from experiments.cli.preflight import check_output_dir
    from experiments.plans.grammar import load_plan
    from experiments.studies.protocol import STUDY_PACKAGES

    plan = load_plan(args.name, args.preset, args.overrides)
    if plan.experiment not in STUDY_PACKAGES:
        raise ConfigError(f"{plan.source}: unknown experiment {plan.experiment!r}; known: {', '.join(STUDY_PACKAGES)}")
    runs = plan.runs()
    out = Path(args.out or f"runs/{plan.name}-{plan.preset or 'base'}")
    if not args.dry_run:  # the output directory is checked before anything heavy is imported or validated
        check_output_dir(out, "--out", files=["results.json"])
        for spec in runs:
            if (out / spec.name).exists() and not (out / spec.name).is_dir():
                raise ConfigError(f"--out {out}: {out / spec.name} is a file, but run {spec.name} needs a directory")
        if args.resume:
            _check_resume(out, runs)
        else:
            taken = [spec.name for spec in runs if (out / spec.name / "config.json").exists()]
            if taken:
                raise ConfigError(f"{out} already holds the runs {taken}; pass --resume or choose another --out")
    from experiments.plans.grammar import train_config

    for spec in runs:  # training values (pure Python) before the runner's imports (JAX): a bad --set fails at once
        train_config(spec.values)
    from experiments.studies.protocol import study_runner

    runner = study_runner(plan.experiment, plan.source)
    for spec in runs:  # every run's options and data are checked before anything trains
        runner.validate(spec.values)
    print(f"{plan.name} ({plan.preset or 'no preset'}): {len(runs)} run(s) → {out}")
    for spec in runs:
        print(f"  {spec.name}")
    if args.dry_run:
        print(json.dumps(plan.to_dict(), indent=1))
        return 0

    from dynamics.errors import DataError, SequenceTooLongError
    from dynamics.loading import load
    from dynamics.outputs import write_json_atomic

    models: dict[tuple[str, str], Any] = {}
    finals: dict[str, Any] = {}
    for spec in runs:
        key = (spec.values["model"], spec.values["dtype"])
        if key not in models:
            models.clear()  # one model in memory at a time
            t0 = time.perf_counter()
            print(f"loading model {key[0]} ({key[1]}) …", file=sys.stderr, flush=True)
            models[key] = load(key[0], dtype=key[1], progress=not args.no_progress)
            print(f"loaded {models[key].name} in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        print(f"\n== {spec.name}")
        try:
            result = runner.run(
                spec.values, out / spec.name, resume=args.resume, progress=not args.no_progress, loaded=models[key]
            )
        except SequenceTooLongError as err:  # the library says "pass truncate=True": say it in this command's terms
            raise DataError(
                f"{spec.name}: {err.where}: {err.lengths} = {err.total} tokens > max_length={err.max_length}; "
                "add --set truncate=true to cut prompts from the left"
            ) from None
        finals[spec.name] = dict(result.final_eval)
        print(f"   {result.steps} steps, {result.timing['total_s']:.0f} s, final eval written to {result.run_dir}")
    report = {"plan": plan.to_dict(), "runs": {s.name: s.to_dict() for s in runs}, "final_eval": finals}
    report["table"] = runner.table(plan, finals)
    print("\n" + runner.format_table(report["table"]))
    write_json_atomic(out / "results.json", report)
    print(f"\nwrote {out / 'results.json'}")
    for path in runner.report(plan, out):
        print(f"wrote {path}")
    return 0

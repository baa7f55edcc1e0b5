"""`rmdyn figures RUN_DIR... --out DIR`: every figure and table the given runs support (docs/math.md §7).

Each RUN_DIR is a run directory, an experiment's output directory (`rmdyn experiment … --out`), a parent of
several, or a Footnote-3 output (`rmdyn footnote3 --out`). What is drawn depends on what is found:

    Persona runs           persona_table (EX-RM vs IM-RM, the paper's numbers beside), persona_ablations (every
                           reward type, when EX-RM (mean), IM-RM (no ref) or EX-GRM runs are there),
                           persona_curves (accuracy along training)
    Hamiltonian runs       hamiltonian_table (accuracies and correct generations, paper beside), hamiltonian_curves
    UltraFeedback runs     per training set (ultrafeedback / rewardmath): <set>_figure2 (EX vs IM per evaluation
                           set, win / tie / loss, by category), <set>_aggregate (accuracy and normalized margin per
                           category, the paper's numbers beside for UltraFeedback training), <set>_summary (win /
                           tie / loss counts), <set>_ablations (every reward type), <set>_curves
    footnote3.json         footnote3_table

Tables are PNG + Markdown + JSON, figures PNG + JSON; OUT/index.md lists them with the runs they come from. A
column of a reward type is the mean over its runs (e.g. over models), as the paper's Persona table averages
over four LMs; the JSON keeps every run's values.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "PAPER_PERSONA",
    "curves_data",
    "footnote3_table",
    "hamiltonian_table_data",
    "make_figures",
    "persona_figure_table",
    "register",
    "run",
    "ultrafeedback_outputs",
]

#: docs/math.md §6.2's Persona table (accuracy, mean over four LMs).
PAPER_PERSONA = {
    ("original", "train"): {"EX-RM": 1.0, "IM-RM": 1.0},
    ("original", "test"): {"EX-RM": 1.0, "IM-RM": 1.0},
    ("paraphrased", "train"): {"EX-RM": 1.0, "IM-RM": 0.022},
    ("paraphrased", "test"): {"EX-RM": 1.0, "IM-RM": 0.019},
}
_UF_PREFIX = {"ultrafeedback_original": "ultrafeedback", "rewardmath": "rewardmath"}


def register(subparsers: Any) -> None:
    """Adds the `figures` sub-command (no heavy imports here)."""
    parser = subparsers.add_parser(
        "figures",
        help="every figure and table the given run directories support (PNG, Markdown, JSON)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run / experiment output directories")
    parser.add_argument("--out", required=True, help="output directory")
    parser.set_defaults(func=run)


# ----------------------------------------------------------------------------------------------------------
# Table builders (pure: run records in, table mappings out)
# ----------------------------------------------------------------------------------------------------------


def _mean(values: Sequence[Any]) -> float | None:
    found = [float(v) for v in values if v is not None]
    return sum(found) / len(found) if found else None


def _by_kind(runs: Sequence[Any]) -> dict[str, list[Any]]:
    from dynamics.reward_types import explicit_kinds, implicit_kinds

    kind_order = explicit_kinds() + implicit_kinds()
    kinds = sorted({r.reward for r in runs}, key=lambda k: (kind_order.index(k) if k in kind_order else 99, k))
    return {k: [r for r in runs if r.reward == k] for k in kinds}


def _models_note(runs: Sequence[Any]) -> str:
    models = sorted({r.model for r in runs})
    return f"a column is the mean over its runs; models: {', '.join(models)}; {len(runs)} runs"


def persona_figure_table(
    runs: Sequence[Any], kinds: Sequence[str] | None = None, *, paper: bool = True
) -> dict[str, Any]:
    """The figures' Persona table (docs/math.md §6.2) of run directories: a column per reward type, its runs averaged.

    Accuracy on original / paraphrased responses × train / test prompts, the paper's numbers beside. (The table of
    one plan's runs, a column per run, is `experiments.studies.persona.report.persona_accuracy_table`.)

    Args:
      runs: Persona `RunRecord`s.
      kinds: reward types to show (None: all found).
      paper: add the paper's EX-RM and IM-RM columns.

    Returns:
      A table mapping for `figures.tables.table_figure`.
    """
    from dynamics.reward_types import reward_label

    groups = {k: v for k, v in _by_kind(runs).items() if kinds is None or k in kinds}
    columns = [reward_label(k) for k in groups]
    rows = []
    for (responses, prompts), numbers in PAPER_PERSONA.items():
        row: dict[str, Any] = {"responses / prompts": f"{responses.capitalize()} / {prompts}"}
        key = f"{responses}/{prompts}/rewards/accuracies"
        for kind, label in zip(groups, columns, strict=True):
            row[label] = _mean([r.final_eval.get(key) for r in groups[kind]])
        if paper:
            row["paper EX-RM"], row["paper IM-RM"] = numbers["EX-RM"], numbers["IM-RM"]
        rows.append(row)
    used = [r for rs in groups.values() for r in rs]
    return {
        "title": "Persona: accuracy on original and paraphrased responses (docs/math.md §6.2)",
        "row_label": "responses / prompts",
        "columns": columns + (["paper EX-RM", "paper IM-RM"] if paper else []),
        "rows": rows,
        "notes": [_models_note(used), "paper: mean over pythia-1b, Llama-3.2-1B(-Instruct), Qwen2.5-1.5B-Instruct"],
        "runs": [r.to_dict() for r in used],
        "per_run": {r.path: {k: v for k, v in r.final_eval.items() if k.endswith("/rewards/accuracies")} for r in used},
    }


def hamiltonian_table_data(runs: Sequence[Any]) -> dict[str, Any]:
    """The Hamiltonian table (docs/math.md §6.1) with the paper's numbers beside; a column per reward type."""
    from dynamics.reward_types import reward_label
    from experiments.studies.hamiltonian.report import TABLE_ROWS, hamiltonian_table

    finals = {}
    for kind, rs in _by_kind(runs).items():
        finals[reward_label(kind)] = {key: _mean([r.final_eval.get(key) for r in rs]) for key, _ in TABLE_ROWS}
    table = hamiltonian_table(finals)
    return {
        "title": "Hamiltonian cycles: verification accuracy and correct generations (docs/math.md §6.1)",
        "row_label": "metric",
        "columns": table["columns"],
        "rows": table["rows"],
        "notes": [_models_note(runs), "generations: IM-RM only (one sample per prompt, temperature 1)"],
        "runs": [r.to_dict() for r in runs],
    }


def curves_data(runs: Sequence[Any], panels: Sequence[str], title: str) -> dict[str, Any]:
    """Accuracy along training (every evaluation) of each run, one panel per evaluation name."""
    from experiments.studies.ultrafeedback.report import SET_LABELS

    several_models = len({r.model for r in runs}) > 1
    out: dict[str, Any] = {"title": title, "x": "epoch", "panels": {}}
    for panel in panels:
        lines = {}
        for r in runs:
            key = f"{panel}/rewards/accuracies"
            points = [(e["epoch"], e[key]) for e in r.evals if key in e]
            if not points:
                continue
            label = r.label + (f" · {r.model}" if several_models else "")
            while label in lines:
                label += "'"
            lines[label] = {"x": [p[0] for p in points], "y": [p[1] for p in points], "kind": r.reward, "run": r.path}
        if lines:
            out["panels"][SET_LABELS.get(panel, panel)] = lines
    return out


def ultrafeedback_outputs(runs: Sequence[Any]) -> dict[str, dict[str, Any]]:
    """Per training set: the report (`experiments.studies.ultrafeedback.report.ultrafeedback_report`) and its tables.

    Returns:
      {prefix: {"report", "figure2", "aggregate", "summary", "ablations" (or None), "curves"}}.
    """
    from experiments.studies.ultrafeedback.report import SET_LABELS, TieRule, aggregate_table, ultrafeedback_report

    out = {}
    settings = dict.fromkeys(str(r.info.get("train_data", "?")) for r in runs)
    for setting in settings:
        mine = [r for r in runs if str(r.info.get("train_data", "?")) == setting]
        prefix = _UF_PREFIX.get(setting, Path(setting).stem)
        categories = dict(mine[0].info.get("categories", {}))
        rule_info = mine[0].info.get("tie_rule", {})
        rule = TieRule(rule_info.get("kind", "stderr"), rule_info.get("k", 1.0), rule_info.get("threshold", 0.01))
        records = [
            {"name": r.path, "reward": r.reward, "group": r.model if len({x.model for x in mine}) > 1 else "",
             "final_eval": r.final_eval} for r in mine
        ]  # fmt: skip
        report = ultrafeedback_report(records, categories, rule)
        paper = setting == "ultrafeedback_original"
        notes = [_models_note(mine), f"categories: {categories}", report["tie_rule"]["description"]]
        if paper:
            rows = (mine[0].info.get("rows") or {}).get("train_data") or {}
            n = rows.get("selected", mine[0].info.get("n_train", "?"))
            here = f"{n} of the bundled {rows.get('available', 200)} pairs"
            if rows.get("over_max_response_tokens"):
                over, cap = rows["over_max_response_tokens"], rows["max_response_tokens"]
                here += f" ({over} skipped: a response over {cap} tokens)"
            notes.append(f"paper: six models (1B-8B) trained on 2,000 UltraFeedback pairs; here: {here}")
        main = [{"label": r.label, "metrics": report["per_set"][r.path]} for r in mine if r.reward in ("ex", "im")]
        agg = aggregate_table(main, categories, paper=paper)
        aggregate = {
            "title": f"{prefix}: mean accuracy and normalized margin per category (docs/math.md §6.3)",
            "row_label": "category", **agg, "notes": notes,
        }  # fmt: skip
        summary_rows = []
        for pair, block in report["summary"].items():
            for category, b in block.items():
                summary_rows.append({"pair / category": f"{pair}: {category}", "EX wins": b["ex_wins"],
                                     "ties": b["ties"], "IM wins": b["im_wins"], "sets": b["n_sets"]})  # fmt: skip
        summary = {
            "title": f"{prefix}: win / tie / loss per category",
            "row_label": "pair / category",
            "columns": ["EX wins", "ties", "IM wins", "sets"],
            "rows": summary_rows,
            "notes": notes,
        }
        kinds = {r.reward for r in mine}
        ablations = None
        if kinds - {"ex", "im"}:
            every = [{"label": r.label, "metrics": report["per_set"][r.path]} for r in mine]
            ablations = {
                "title": f"{prefix} ablations (docs/math.md §6.4): accuracy and normalized margin per category",
                "row_label": "category", **aggregate_table(every, categories, paper=False), "notes": notes,
            }  # fmt: skip
        figure2 = {
            "title": f"{prefix}-trained RMs: EX-RM vs IM-RM per evaluation set",
            "tie_rule": report["tie_rule"],
            "comparisons": report["comparisons"],
            "summary": report["summary"],
            "set_labels": SET_LABELS,
        }
        curves = curves_data(mine, ["train", *categories], f"{prefix}: accuracy along training")
        out[prefix] = {"report": report, "figure2": figure2, "aggregate": aggregate, "summary": summary,
                       "ablations": ablations, "curves": curves}  # fmt: skip
    return out


def footnote3_table(path: str, data: Mapping[str, Any]) -> dict[str, Any]:
    """The Footnote-3 statistics (docs/math.md §6.2) as a table: one row per statistic."""
    from experiments.studies.footnote3 import STAT_NAMES

    rows = [{"quantity": name, **{s: stats[s] for s in STAT_NAMES}} for name, stats in data["statistics"].items()]
    mm = data.get("max_margin", {})
    model = data.get("info", {}).get("model", {}).get("name", "?")
    notes = [f"model: {model} (pre-trained); differences: {data.get('shapes')}"]
    if mm.get("separable"):
        notes.append(f"u*: norm {mm['norm']:.4g}, geometric margin {mm['geometric_margin']:.4g}, "
                     f"{mm['n_support']} support vectors ({mm['solver']})")  # fmt: skip
    else:
        notes.append(f"u*: none ({mm.get('reason')})")
    return {
        "title": "Footnote 3: seen vs unseen (paraphrase) hidden-state differences",
        "row_label": "quantity",
        "columns": list(STAT_NAMES),
        "rows": rows,
        "notes": notes,
        "source": path,
    }


# ----------------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------------


def make_figures(paths: Sequence[str], out: str | Path) -> list[Path]:
    """Writes every figure and table the runs under `paths` support into `out`; returns the files written.

    Raises:
      DataError: a path that does not exist, an unreadable run, or nothing found.
    """
    from experiments.cli.preflight import check_output_dir
    from experiments.records import find_outputs

    check_output_dir(out, "--out", files=["index.md"])
    runs, footnotes = find_outputs(paths)
    from figures.studies import training_curves_figure, ultrafeedback_figure  # matplotlib
    from figures.tables import table_figure

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    sources: dict[str, list[str]] = {}

    def table(stem: str, data: Mapping[str, Any], used: Sequence[str]) -> None:
        written.extend(table_figure(data, out / f"{stem}.png"))
        sources[stem] = list(used)

    def figure(stem: str, draw: Any, data: Mapping[str, Any], used: Sequence[str]) -> None:
        if data.get("panels", True):
            written.extend(draw(data, out / f"{stem}.png"))
            sources[stem] = list(used)

    persona = [r for r in runs if r.experiment == "persona"]
    if persona:
        paths_p = [r.path for r in persona]
        if {r.reward for r in persona} & {"ex", "im"}:
            table("persona_table", persona_figure_table(persona, ("ex", "im")), paths_p)
        if {r.reward for r in persona} - {"ex", "im"}:
            data = persona_figure_table(persona, None, paper=False)
            data["title"] = "Persona ablations (docs/math.md §6.4-6.5): accuracy by reward type"
            table("persona_ablations", data, paths_p)
        panels = ["original/train", "original/test", "paraphrased/train", "paraphrased/test"]
        figure(
            "persona_curves",
            training_curves_figure,
            curves_data(persona, panels, "Persona: accuracy along training"),
            paths_p,
        )
    ham = [r for r in runs if r.experiment == "hamiltonian"]
    if ham:
        paths_h = [r.path for r in ham]
        table("hamiltonian_table", hamiltonian_table_data(ham), paths_h)
        figure(
            "hamiltonian_curves",
            training_curves_figure,
            curves_data(ham, ["train", "test"], "Hamiltonian cycles: accuracy along training"),
            paths_h,
        )  # noqa: E501
    uf = [r for r in runs if r.experiment == "ultrafeedback"]
    for prefix, parts in (ultrafeedback_outputs(uf) if uf else {}).items():
        used = [r.path for r in uf]
        figure(f"{prefix}_figure2", ultrafeedback_figure, parts["figure2"], used)
        table(f"{prefix}_aggregate", parts["aggregate"], used)
        table(f"{prefix}_summary", parts["summary"], used)
        if parts["ablations"] is not None:
            table(f"{prefix}_ablations", parts["ablations"], used)
        figure(f"{prefix}_curves", training_curves_figure, parts["curves"], used)
    for k, (path, data) in enumerate(footnotes):
        table("footnote3_table" + (f"_{k}" if k else ""), footnote3_table(path, data), [path])
    lines = ["# rmdyn figures", ""]
    for stem, used in sources.items():
        lines.append(f"- `{stem}`: from {', '.join(f'`{u}`' for u in used)}")
    (out / "index.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    written.append(out / "index.md")
    return written


def run(args: argparse.Namespace) -> int:
    written = make_figures(args.runs, args.out)
    for path in written:
        print(path)
    return 0

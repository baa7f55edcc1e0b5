"""The Persona table (docs/math.md §6.2): accuracy on original / paraphrased responses × training / test prompts.

`persona_accuracy_table` builds it from final evaluations (a column per run), `plan_table` from a plan's runs (the
`experiment` command), `format_table` prints it. The `figures` command's Persona table, which averages run
directories by reward type and sets the paper's numbers beside, is `experiments.cli.commands.figures`.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

from dynamics.reward_types import reward_label

__all__ = ["format_table", "persona_accuracy_table", "plan_table"]


def persona_accuracy_table(final_evals: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """The paper's Persona table (docs/math.md §6.2): accuracy per (responses, prompts) row and per run.

    Args:
      final_evals: run label (e.g. "EX-RM", "IM-RM") → its final evaluation metrics.

    Returns:
      {"rows": [{"responses", "prompts", <label>: accuracy, ...}], "columns": [labels]}.
    """
    rows = []
    for responses, prompts in itertools.product(("original", "paraphrased"), ("train", "test")):
        row: dict[str, Any] = {"responses": responses.capitalize(), "prompts": prompts.capitalize()}
        for label, metrics in final_evals.items():
            row[label] = metrics.get(f"{responses}/{prompts}/rewards/accuracies")
        rows.append(row)
    return {"columns": list(final_evals), "rows": rows}


def format_table(table: Mapping[str, Any]) -> str:
    """The table as aligned text."""
    cols = table["columns"]
    lines = [f"{'Responses':<12} {'Prompts':<8} " + " ".join(f"{c:>12}" for c in cols)]
    for row in table["rows"]:
        cells = " ".join(f"{row[c]:>12.3f}" if row[c] is not None else f"{'-':>12}" for c in cols)
        lines.append(f"{row['responses']:<12} {row['prompts']:<8} {cells}")
    return "\n".join(lines)


def plan_table(plan: Any, finals: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """The Persona table of a plan's runs: a column per run, labelled by its reward type when only that varies."""
    only_reward = [a for a, v in plan.grid.items() if len(v) > 1] in (["reward"], [])  # [] : a collapsed grid
    columns = {}
    for spec in plan.runs():
        if spec.name in finals:
            label = reward_label(spec.values["reward"]) if only_reward else spec.name
            columns[label] = finals[spec.name]
    return persona_accuracy_table(columns)

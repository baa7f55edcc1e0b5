"""The Hamiltonian report (docs/math.md §6.1): the table of accuracies and correct generations, the paper's beside."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dynamics.reward_types import reward_label

__all__ = ["PAPER_TABLE", "TABLE_ROWS", "format_table", "hamiltonian_table", "plan_table"]

#: docs/math.md §6.1's table (pythia-1b, 1,000 train / 200 test graphs).
PAPER_TABLE = {
    "train/rewards/accuracies": {"EX-RM": 1.0, "IM-RM": 1.0},
    "test/rewards/accuracies": {"EX-RM": 0.980, "IM-RM": 0.993},
    "generation/train/accuracy": {"EX-RM": None, "IM-RM": 0.0},
    "generation/test/accuracy": {"EX-RM": None, "IM-RM": 0.0},
}
TABLE_ROWS = (
    ("train/rewards/accuracies", "Train accuracy"),
    ("test/rewards/accuracies", "Test accuracy"),
    ("generation/train/accuracy", "Correct generations (train prompts)"),
    ("generation/test/accuracy", "Correct generations (test prompts)"),
)


def hamiltonian_table(final_evals: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """The paper's Hamiltonian table (docs/math.md §6.1): one column per run, and the paper's numbers beside.

    Args:
      final_evals: column label (e.g. "EX-RM", "IM-RM") → final evaluation metrics of that run.

    Returns:
      {"columns": [labels..., "paper EX-RM", "paper IM-RM"], "rows": [{"metric", <column>: value or None}]}.
    """
    columns = list(final_evals) + ["paper EX-RM", "paper IM-RM"]
    rows = []
    for key, label in TABLE_ROWS:
        row: dict[str, Any] = {"metric": label}
        for name, metrics in final_evals.items():
            row[name] = metrics.get(key)
        row["paper EX-RM"] = PAPER_TABLE[key]["EX-RM"]
        row["paper IM-RM"] = PAPER_TABLE[key]["IM-RM"]
        rows.append(row)
    return {"columns": columns, "rows": rows}


def plan_table(plan: Any, finals: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """The Hamiltonian table of a plan's runs, a column per run (labelled by reward when only it varies)."""
    only_reward = [a for a, v in plan.grid.items() if len(v) > 1] in (["reward"], [])  # [] : a collapsed grid
    columns = {}
    for spec in plan.runs():
        if spec.name in finals:
            label = reward_label(spec.values["reward"]) if only_reward else spec.name
            columns[label] = finals[spec.name]
    return hamiltonian_table(columns)


def format_table(table: Mapping[str, Any]) -> str:
    """The table as aligned text ("-" where a value does not apply)."""
    cols = table["columns"]
    lines = [f"{'':<38}" + " ".join(f"{c:>14}" for c in cols)]
    for row in table["rows"]:
        cells = " ".join(f"{row[c]:>14.3f}" if row.get(c) is not None else f"{'-':>14}" for c in cols)
        lines.append(f"{row['metric']:<38}{cells}")
    return "\n".join(lines)

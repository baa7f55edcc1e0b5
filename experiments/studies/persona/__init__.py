"""The Persona experiment (docs/math.md §6.2): `data` (statements, split, responses; bundled trait files in
`bundled/`), `runner` (evaluation sets, checks, training) and `report` (the accuracy table)."""

from experiments.studies.protocol import StudyRunner

__all__ = ["study"]


def study() -> StudyRunner:
    """The Persona study as the `experiment` command runs it (built at call time from the modules' functions)."""
    from experiments.studies.persona import report
    from experiments.studies.persona import runner as persona_runner

    return StudyRunner(
        "persona", persona_runner.validate, persona_runner.run, report.plan_table, report.format_table,
        persona_runner.plan_report,
    )  # fmt: skip

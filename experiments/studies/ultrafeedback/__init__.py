"""The UltraFeedback / RewardMATH experiment (docs/math.md §6.3): `data` (the sets, the length filter, the
selections; bundled preference sets in `bundled/`), `runner` (checks, training) and `report` (tie rule, win / tie /
loss, aggregate table)."""

from experiments.studies.protocol import StudyRunner

__all__ = ["study"]


def study() -> StudyRunner:
    """The UltraFeedback study as the `experiment` command runs it (built at call time from the modules' functions)."""
    from experiments.studies.ultrafeedback import report
    from experiments.studies.ultrafeedback import runner as uf_runner

    return StudyRunner("ultrafeedback", uf_runner.validate, uf_runner.run, report.plan_table, report.format_table)

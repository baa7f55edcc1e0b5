"""The Hamiltonian-cycle experiment (docs/math.md §6.1): `graphs` (graphs, text, the cycle checker), `data` (a run's
graphs, the graph tokens), `generation` (the IM-RM generation test), `runner` (checks, training) and `report` (the
table)."""

from experiments.studies.protocol import StudyRunner

__all__ = ["study"]


def study() -> StudyRunner:
    """The Hamiltonian study as the `experiment` command runs it (built at call time from the modules' functions)."""
    from experiments.studies.hamiltonian import report
    from experiments.studies.hamiltonian import runner as hamiltonian_runner

    return StudyRunner(
        "hamiltonian", hamiltonian_runner.validate, hamiltonian_runner.run, report.plan_table, report.format_table
    )

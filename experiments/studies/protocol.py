"""The runner protocol: what the `experiment` command needs of a study, and where each study lives.

A plan's `experiment` key names a study ("persona", "hamiltonian", "ultrafeedback"); `study_runner(name)` imports
its package and asks its `study()` for a `StudyRunner`, a frozen record of four functions. Nothing else of a study is
reached by name, and every study provides all four (no optional attributes, no `hasattr`).

Pure Python: the study packages are imported only by `study_runner` (they import numpy, not JAX, at module level).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any

from dynamics.errors import ConfigError

__all__ = ["STUDY_PACKAGES", "StudyRunner", "study_runner"]

#: plan `experiment` key → the study's package, whose `study()` returns its `StudyRunner`.
STUDY_PACKAGES = {
    "persona": "experiments.studies.persona",
    "hamiltonian": "experiments.studies.hamiltonian",
    "ultrafeedback": "experiments.studies.ultrafeedback",
}


@dataclasses.dataclass(frozen=True)
class StudyRunner:
    """A study as the `experiment` command runs it.

    Attributes:
      name: the plan's `experiment` key.
      validate: (run values) → None; checks keys, options, data and the model path before any model loads
        (ConfigError, DataError, ModelError).
      run: (run values, run_dir, *, resume, progress, loaded) → `TrainResult`; trains one run of the plan and
        writes its run directory.
      table: (plan, {run name: final_eval}) → the study's table of the plan's runs (JSON-ready).
      format_table: (table) → the table as aligned text.
      report: (plan, output directory) → the paths of the study's report files written there after all runs
        (e.g. the controlled Persona design's intervals and forest plot), or [] when the plan has none.
    """

    name: str
    validate: Callable[[Mapping[str, Any]], None]
    run: Callable[..., Any]
    table: Callable[[Any, Mapping[str, Mapping[str, float]]], dict[str, Any]]
    format_table: Callable[[Mapping[str, Any]], str]
    report: Callable[[Any, Any], list[Any]] = dataclasses.field(default=lambda plan, out: [])


def study_runner(name: str, source: str = "the plan") -> StudyRunner:
    """The `StudyRunner` of the study `name` (its package's `study()`, built now: a patched function is seen).

    Raises:
      ConfigError: an unknown study, naming `source` and the known ones.
    """
    if name not in STUDY_PACKAGES:
        raise ConfigError(f"{source}: unknown experiment {name!r}; known: {', '.join(STUDY_PACKAGES)}")
    return importlib.import_module(STUDY_PACKAGES[name]).study()

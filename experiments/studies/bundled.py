"""The bundled data files, each folder beside the study that reads it, found by name (importlib.resources).

    persona/<trait>.jsonl          experiments/studies/persona/bundled/      (Persona statements, CC BY 4.0)
    preferences/<set>.jsonl        experiments/studies/ultrafeedback/bundled/ (preference sets of the official code)

Each folder keeps its README.md (and LICENSE) with the data. The names keep the group prefix ("persona/",
"preferences/") so that a name says what the file holds wherever it is read (the Persona and UltraFeedback
studies, the demo, the benchmarks, the tests). The library (`dynamics.datasets`) reads any JSONL file it is given
and knows nothing of these folders.
"""

from __future__ import annotations

import importlib.resources
import pathlib

from dynamics.errors import DataError

__all__ = ["BUNDLED_GROUPS", "bundled_data_names", "bundled_data_path"]

#: group name → the package whose `bundled/` folder holds its files.
BUNDLED_GROUPS = {
    "persona": "experiments.studies.persona",
    "preferences": "experiments.studies.ultrafeedback",
}
_DATA_SUFFIXES = (".jsonl",)
_DOC_NAMES = ("README.md", "LICENSE")


def _bundled_files() -> dict[str, pathlib.Path]:
    """{"persona/agreeableness.jsonl": path, ...}: every data, README and LICENSE file of the bundled folders."""
    files = {}
    for group, package in BUNDLED_GROUPS.items():
        root = importlib.resources.files(package).joinpath("bundled")
        if not root.is_dir():
            continue
        for entry in sorted(root.iterdir(), key=lambda t: t.name):
            if entry.is_file() and (entry.name.endswith(_DATA_SUFFIXES) or entry.name in _DOC_NAMES):
                files[f"{group}/{entry.name}"] = pathlib.Path(str(entry))
    return files


def bundled_data_names() -> list[str]:
    """Names of the bundled files, e.g. "persona/agreeableness.jsonl" (README and LICENSE files included)."""
    return sorted(_bundled_files())


def bundled_data_path(name: str) -> pathlib.Path:
    """Path of a bundled data file.

    Args:
      name: "group/file" ("preferences/ultrafeedback.test.jsonl"), or the file name alone
        ("ultrafeedback.test.jsonl") or without ".jsonl" ("ultrafeedback.test", "agreeableness") when that is
        unambiguous.

    Returns:
      The file's path.

    Raises:
      DataError: unknown or ambiguous name; the message lists the available names.
    """
    files = _bundled_files()
    if name in files:
        return files[name]
    matches = [k for k in files if k.split("/", 1)[1] in (name, f"{name}.jsonl")]
    if len(matches) == 1:
        return files[matches[0]]
    what = "ambiguous" if matches else "unknown"
    data = sorted(k for k in files if k.endswith(_DATA_SUFFIXES))  # not the README and LICENSE files
    raise DataError(f"{what} bundled data file {name!r}; available: {', '.join(data)}")

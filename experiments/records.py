"""Reading finished (or running) experiment outputs back: run directories and Footnote-3 results.

A run directory is what `dynamics.training.train` writes (config.json, metrics.jsonl, summary.json, checkpoints/),
plus generation.json for a Hamiltonian IM-RM. An experiment's output directory (`rmdyn experiment … --out DIR`)
holds one run directory per grid combination and results.json. `rmdyn footnote3` writes footnote3.json.

What a run is comes from its config.json: the experiment (data.info.experiment: persona | hamiltonian |
ultrafeedback), the reward type (reward_model.kind) and the model (model.name). Its final metrics are
summary.json's final_eval, or the last evaluation in metrics.jsonl while it is still running.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from dynamics.errors import DataError
from dynamics.outputs import portable_path
from dynamics.reward_types import reward_label

__all__ = ["RunRecord", "find_outputs", "read_run"]

_MAX_DEPTH = 4


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """One run directory, read back.

    Attributes:
      path: the directory, relative (`dynamics.outputs.portable_path`): it is written into figures and tables.
      experiment: "persona", "hamiltonian", "ultrafeedback" (or what config.json says).
      reward: the reward type ("ex", "im", "ex-mean", "im-noref", "exgrm").
      model: the model's name.
      final_eval: the final evaluation's metrics (summary.json, else the last "eval" line).
      evals: every "eval" line of metrics.jsonl, in order.
      info: config.json's data.info (the experiment's options, categories, tie rule, …).
      complete: whether summary.json exists (the run finished).
    """

    path: str
    experiment: str
    reward: str
    model: str
    final_eval: Mapping[str, Any]
    evals: tuple[Mapping[str, Any], ...]
    info: Mapping[str, Any]
    complete: bool

    @property
    def label(self) -> str:
        """ "EX-RM", "IM-RM", …"""
        return reward_label(self.reward)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "experiment": self.experiment,
            "reward": self.reward,
            "model": self.model,
            "complete": self.complete,
            "n_evals": len(self.evals),
        }


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: cannot read JSON ({err})") from err


def read_run(path: str | os.PathLike) -> RunRecord:
    """Reads one run directory.

    Raises:
      DataError: config.json or metrics.jsonl missing or unreadable (file and line), or no evaluation yet.
    """
    root = Path(path)
    config = _json(root / "config.json")
    evals = []
    log = root / "metrics.jsonl"
    if not log.exists():
        raise DataError(f"{root}: no metrics.jsonl (not a run directory written by dynamics.training)")
    for n, line in enumerate(log.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{log} line {n}: not valid JSON ({err.msg})") from err
        if entry.get("event") == "eval":
            evals.append(entry)
    summary = root / "summary.json"
    if summary.exists():
        final = dict(_json(summary).get("final_eval", {}))
    elif evals:
        final = {k: v for k, v in evals[-1].items() if k not in ("event", "step", "epoch")}
    else:
        raise DataError(f"{root}: no evaluation yet (metrics.jsonl has no eval line)")
    info = (config.get("data") or {}).get("info") or {}
    return RunRecord(
        path=portable_path(root),
        experiment=str(info.get("experiment", "unknown")),
        reward=str((config.get("reward_model") or {}).get("kind", "?")),
        model=str((config.get("model") or {}).get("name", "?")),
        final_eval=final,
        evals=tuple(evals),
        info=info,
        complete=summary.exists(),
    )


def _walk(root: Path, depth: int) -> Iterable[Path]:
    yield root
    if depth >= _MAX_DEPTH or (root / "config.json").exists():
        return
    for child in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "checkpoints"):
        yield from _walk(child, depth + 1)


def find_outputs(paths: Iterable[str | os.PathLike]) -> tuple[list[RunRecord], list[tuple[str, dict[str, Any]]]]:
    """The run directories and Footnote-3 results under `paths` (each a run, an experiment output or a parent).

    Returns:
      (runs, footnote3 results as (path, the JSON)), in path order.

    Raises:
      DataError: a path that does not exist, or nothing found under any path.
    """
    runs, footnotes = [], []
    for item in paths:
        root = Path(item)
        if not root.exists():
            raise DataError(f"{root}: no such directory")
        if root.is_file() and root.name == "footnote3.json":
            footnotes.append((portable_path(root), _json(root)))
            continue
        for d in _walk(root, 0):
            if (d / "config.json").exists() and (d / "metrics.jsonl").exists():
                runs.append(read_run(d))
            if (d / "footnote3.json").exists():
                footnotes.append((portable_path(d / "footnote3.json"), _json(d / "footnote3.json")))
    if not runs and not footnotes:
        raise DataError(f"no run directories (config.json + metrics.jsonl) or footnote3.json under {list(paths)}")
    return runs, footnotes

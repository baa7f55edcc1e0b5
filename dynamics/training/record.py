"""The record of a run (config.json): everything needed to reproduce it, and the checks that a resumed run is the
same run (its configuration, model, mask, data and initial parameters; `RESUMABLE_CHANGES` aside)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from dynamics.errors import ConfigError
from dynamics.masks import count_selected, leaf_paths
from dynamics.models import LM, Params
from dynamics.outputs import jsonable
from dynamics.rewards import ExplicitRM, ImplicitRM, RewardModel
from dynamics.training.checkpoint import flatten_tree, tree_sha256
from dynamics.training.config import RESUMABLE_CHANGES, TrainConfig
from dynamics.training.evaluation import EvalSuite
from dynamics.training.rows import Rows

__all__ = ["check_checkpoint_config", "check_resume", "record_fingerprint", "rows_sha256", "run_record"]

# the sections of config.json a checkpoint records a fingerprint of (meta.json "record"), checked on resume
_FINGERPRINTED = ("model", "mask", "data", "reward_model", "initial_params_sha256")


def rows_sha256(rows: Rows) -> str:
    """sha256 (16 hex digits) of the arrays of a sequence set (name, dtype, shape and bytes of each)."""
    fields = rows.arrays()
    h = hashlib.sha256()
    for k in sorted(fields):
        a = np.ascontiguousarray(fields[k])
        h.update(f"{k}:{a.dtype}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def _rm_options(rm: RewardModel) -> dict[str, Any]:
    if isinstance(rm, ImplicitRM):
        return {"beta": rm.beta, "reference_free": rm.reference_free, "length_normalised": rm.length_normalised}
    if isinstance(rm, ExplicitRM):
        return {"pooling": rm.pooling}
    return {"yes_id": rm.yes_id, "no_id": rm.no_id}


def _versions() -> dict[str, str]:
    import flax
    import optax

    return {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__, "numpy": np.__version__}


def run_record(
    config: TrainConfig,
    rm: RewardModel,
    lm: LM,
    params: Params,
    mask: Any,
    spec: str,
    train_sets: Mapping[str, Rows],
    suite: EvalSuite,
    *,
    model_info: Mapping[str, Any] | None,
    data_info: Mapping[str, Any] | None,
    steps_per_epoch: int,
    mesh_info: Mapping[str, Any],
) -> dict[str, Any]:
    """The content of config.json.

    Args:
      config: the options.
      rm: the reward model.
      lm: the language model as given (before any untying).
      params: the reward model's initial parameters.
      mask: which of them train (`dynamics.masks.trainable_mask`).
      spec: the normalized mask spec.
      train_sets: {"chosen", "rejected"} training rows.
      suite: the evaluation suite.
      model_info: the model's description, or None.
      data_info: how the data was built, or None.
      steps_per_epoch: optimizer steps per epoch.
      mesh_info: {"devices", "param_sharding", "eval_chunk"}.
    """
    eval_sets = {k: Rows.from_batch(v) for k, v in suite.sequences.items()}
    return {
        "train": config.to_dict(),
        "reward_model": {"kind": config.reward, "class": type(rm).__name__, **_rm_options(rm)},
        "model": dict(model_info) if model_info is not None else {"config": dataclasses.asdict(lm.config)},
        "mask": {
            "spec": spec,
            "n_trainable": count_selected(params, mask),
            "n_total": int(sum(np.size(x) for k, x in flatten_tree(params).items() if not k.startswith("ref/"))),
            "trainable": [p for p, m in zip(leaf_paths(params), jax.tree.leaves(mask), strict=True) if m],
            "untied": not rm.lm.config.tie_embeddings and lm.config.tie_embeddings,
        },
        "data": {
            "info": dict(data_info) if data_info is not None else None,
            "n_train": train_sets["chosen"].n_rows,
            "train_sha256": {side: rows_sha256(rows) for side, rows in train_sets.items()},
            "eval_sets": {k: {"rows": v.n_rows, "sha256": rows_sha256(v)} for k, v in eval_sets.items()},
            "comparisons": {k: list(v) for k, v in suite.comparisons.items()},
            "averages": {k: list(v) for k, v in suite.averages.items()},
        },
        "initial_params_sha256": tree_sha256({k: v for k, v in params.items() if k != "ref"}),
        "steps_per_epoch": steps_per_epoch,
        "mesh": dict(mesh_info),
        "versions": _versions(),
    }


def check_resume(run_dir: Path, record: Mapping[str, Any]) -> None:
    """A resumed run must have the same configuration, model, mask and data (RESUMABLE_CHANGES aside).

    Raises:
      ConfigError: naming the sections that differ from the run directory's config.json.
    """
    path = run_dir / "config.json"
    if not path.exists():
        return
    saved = json.loads(path.read_text())
    diffs = []
    for section in ("model", "mask", "data", "reward_model"):
        if jsonable(saved.get(section)) != jsonable(record.get(section)):
            diffs.append(section)
    if "initial_params_sha256" in saved and saved["initial_params_sha256"] != record["initial_params_sha256"]:
        diffs.append("initial_params_sha256 (the initial weights or EX-RM head)")
    old, new = saved.get("train", {}), record["train"]
    diffs += [
        f"train.{k}" for k in sorted(set(old) | set(new)) if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k)
    ]
    if diffs:
        raise ConfigError(
            f"{run_dir}: cannot resume: {', '.join(diffs)} differ from the run's config.json (only "
            f"{', '.join(RESUMABLE_CHANGES)} may change); use another output directory"
        )


def record_fingerprint(record: Mapping[str, Any]) -> dict[str, str]:
    """sha256 (16 hex digits) of each fingerprinted section of the run's record (model, mask, data, reward model,
    initial parameters): what a checkpoint's meta.json "record" holds."""
    out = {}
    for key in _FINGERPRINTED:
        text = json.dumps(jsonable(record.get(key)), sort_keys=True, default=str)
        out[key] = hashlib.sha256(text.encode()).hexdigest()[:16]
    return out


def check_checkpoint_config(
    meta: Mapping[str, Any], config: TrainConfig, record: Mapping[str, Any], where: str
) -> None:
    """The checkpoint's own record must agree with this run: its TrainConfig (RESUMABLE_CHANGES aside) and the
    fingerprints of the model, mask, data, reward model and initial parameters (checkpoints that have them).

    config.json is checked first (`check_resume`); this catches a checkpoint that does not belong to the run
    directory's config.json (copied from another run, or config.json missing).
    """
    fingerprint = meta.get("record")
    if isinstance(fingerprint, Mapping):
        ours = record_fingerprint(record)
        sections = [k for k in _FINGERPRINTED if k in fingerprint and fingerprint[k] != ours[k]]
        if sections:
            raise ConfigError(
                f"{where}: cannot resume: the checkpoint belongs to a run with another {', '.join(sections)}; use "
                "another output directory"
            )
    saved = meta.get("config")
    if not isinstance(saved, Mapping):
        raise ConfigError(f"{where}: the checkpoint's meta.json has no config: cannot tell whether it is this run's")
    new = config.to_dict()
    diffs = [
        f"train.{k}"
        for k in sorted(set(saved) | set(new))
        if k not in RESUMABLE_CHANGES and jsonable(saved.get(k)) != jsonable(new.get(k))
    ]
    if diffs:
        raise ConfigError(
            f"{where}: cannot resume: the checkpoint was written with other options ({', '.join(diffs)}; only "
            f"{', '.join(RESUMABLE_CHANGES)} may change); use another output directory"
        )

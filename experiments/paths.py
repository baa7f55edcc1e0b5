"""How the studies and commands write a file path into JSON and printed text: never an absolute machine path.

A path under the working directory is written relative to it ("runs/persona-cpu/reward=ex"); a bundled file
relative to the directory that holds the `experiments` package ("experiments/studies/persona/bundled/
agreeableness.jsonl"); any other absolute path relative to the working directory ("../scratch/runs/x").
"""

from __future__ import annotations

import os
import pathlib

__all__ = ["shown_path"]

_PACKAGE_PARENT = pathlib.Path(__file__).resolve().parent.parent  # the directory that holds `experiments/`


def shown_path(path: str | os.PathLike[str]) -> str:
    """`path` as it is recorded and printed: a relative POSIX path.

    Args:
      path: a file or directory path, relative or absolute.

    Returns:
      A relative path as given; an absolute one relative to the working directory when under it, to the
      directory holding `experiments` when inside the package, else relative to the working directory with "..";
      `str(path)` only when no relative path exists (another drive).
    """
    p = pathlib.Path(path)
    if not p.is_absolute():
        return p.as_posix()
    resolved = p.resolve()
    cwd = pathlib.Path.cwd().resolve()
    for root in (cwd, _PACKAGE_PARENT):
        try:
            return resolved.relative_to(root).as_posix()
        except ValueError:
            continue
    try:
        return pathlib.Path(os.path.relpath(resolved, cwd)).as_posix()
    except ValueError:
        return str(path)

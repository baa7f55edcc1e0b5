"""β and the objective of a DPO run, read from the `training_args.bin` that transformers' Trainer (TRL's DPOTrainer
and CPOTrainer with it) saves beside a model or adapter it writes (docs/math.md §12.2).

That file is `torch.save` of the run's config object (a zip archive holding a pickle). Unpickling it for real would
import torch, transformers and TRL and run whatever code the pickle names; `read_run_settings` instead reads the
pickle with an unpickler that resolves no global at all: every class the pickle names becomes an inert record of
the state it was saved with. Nothing from the file is executed, and no ML library is imported.

TRL's loss types map onto rmdyn's objectives (`dynamics.objectives`):

    loss_type "sigmoid" (label_smoothing 0)  → dpo      "sigmoid" with label_smoothing ε > 0 → cdpo (ε)
    loss_type "ipo"                          → ipo      "hinge"                              → hinge
    CPOConfig loss_type "simpo", cpo_alpha 0 → simpo (γ = simpo_gamma)

Any other loss type (or a weighted mix of several) has no rmdyn objective: `objective` is then None and `note`
says why.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

from dynamics.errors import ModelError

__all__ = ["TRAINING_ARGS", "RunSettings", "find_run_settings", "read_run_settings"]

#: The file transformers' Trainer writes beside every saved model or adapter.
TRAINING_ARGS = "training_args.bin"

_SAFE_BUILTINS = {
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "list"): list,
    ("builtins", "dict"): dict,
    ("builtins", "tuple"): tuple,
    ("collections", "OrderedDict"): dict,
}


class _Record:
    """An inert stand-in for any class a pickle names: keeps its constructor arguments and saved state."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            state = {**(state[0] or {}), **state[1]}  # (dict state, slot state)
        self.state = state if isinstance(state, dict) else {"value": state}


class _InertUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_BUILTINS:
            return _SAFE_BUILTINS[(module, name)]
        return type(name, (_Record,), {"__module__": f"inert:{module}"})

    def persistent_load(self, pid: Any) -> Any:  # torch's tensor storages: not needed for settings
        return None


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """What a saved run's training arguments say about its reward.

    Attributes:
      path: the training_args.bin read.
      config_class: the config's class name (e.g. "DPOConfig", "CPOConfig").
      beta: β of the run's implicit reward r = β ln(π_θ/π_ref), or None when the config has none.
      objective: rmdyn's objective name for the run's loss (module docstring), or None when there is none.
      label_smoothing: cDPO's ε (0 otherwise).
      gamma: SimPO's target margin γ (0 otherwise).
      loss_type: the run's loss type(s) as saved.
      note: why `objective` is None, or "".
    """

    path: str
    config_class: str
    beta: float | None
    objective: str | None
    label_smoothing: float
    gamma: float
    loss_type: Any
    note: str = ""


def _state(path: Path) -> tuple[str, dict[str, Any]]:
    """(class name, saved attributes) of the object pickled in a torch.save zip archive."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if not names:
                raise ModelError(f"{path}: a zip archive without data.pkl: not a file written by torch.save")
            data = archive.read(names[0])
    except zipfile.BadZipFile:
        raise ModelError(f"{path}: not a zip archive (torch.save's format since torch 1.6); cannot read it") from None
    except OSError as err:
        raise ModelError(f"{path}: cannot read ({err})") from None
    try:
        obj = _InertUnpickler(io.BytesIO(data)).load()
    except Exception as err:  # a damaged pickle can raise almost anything; report it as the file's
        raise ModelError(f"{path}: unreadable pickle in {names[0]} ({type(err).__name__}: {err})") from None
    if not isinstance(obj, _Record) or not isinstance(getattr(obj, "state", None), dict):
        raise ModelError(f"{path}: holds {type(obj).__name__}, not a training-arguments object")
    return type(obj).__name__, obj.state


def _value(x: Any) -> Any:
    """An enum member saved as a record (its constructor's value) as that value."""
    return x.args[0] if isinstance(x, _Record) and len(getattr(x, "args", ())) == 1 else x


def _objective(cls: str, state: dict[str, Any]) -> tuple[str | None, float, float, str]:
    """(objective, ε, γ, note) of the saved loss settings (module docstring's table)."""
    loss = _value(state.get("loss_type", "sigmoid"))
    losses = [_value(x) for x in loss] if isinstance(loss, (list, tuple)) else [loss]
    smoothing = float(state.get("label_smoothing") or 0.0)
    if len(losses) != 1:
        return None, 0.0, 0.0, f"a mix of loss types {losses} (weights {state.get('loss_weights')})"
    kind = losses[0]
    if kind == "sigmoid":
        return ("cdpo" if smoothing > 0 else "dpo"), smoothing, 0.0, ""
    if kind in ("ipo", "hinge") and smoothing == 0:
        return kind, 0.0, 0.0, ""
    if kind == "simpo" and float(state.get("cpo_alpha") or 0.0) == 0.0:
        return "simpo", 0.0, float(state.get("simpo_gamma") or 0.0), ""
    if kind == "simpo":
        return None, 0.0, 0.0, f"{cls} SimPO with cpo_alpha={state.get('cpo_alpha')} (an added NLL term)"
    return None, 0.0, 0.0, f"loss type {kind!r}" + (f" with label_smoothing {smoothing}" if smoothing else "")


def read_run_settings(path: str | os.PathLike[str]) -> RunSettings:
    """β and the objective of the run whose training arguments `path` (a training_args.bin) holds.

    Raises:
      ModelError: the file is missing, not a torch.save archive, or holds no training-arguments object.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such file")
    cls, state = _state(path)
    beta, loss = state.get("beta"), state.get("loss_type")
    loss = [_value(x) for x in loss] if isinstance(loss, (list, tuple)) else _value(loss)
    objective, smoothing, gamma, note = _objective(cls, state)
    return RunSettings(
        str(path), cls, None if beta is None else float(beta), objective, smoothing, gamma,
        loss, note,
    )  # fmt: skip


def find_run_settings(*directories: str | os.PathLike[str] | None) -> RunSettings | None:
    """`read_run_settings` of the first of `directories` (None and non-directories skipped) that holds a
    training_args.bin, or None when none does."""
    for d in directories:
        if d is not None and os.path.isdir(d) and os.path.isfile(os.path.join(d, TRAINING_ARGS)):
            return read_run_settings(os.path.join(d, TRAINING_ARGS))
    return None

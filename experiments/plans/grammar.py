"""Experiment plans: a TOML base config, presets, an options grid and `--set` overrides.

The shape follows the official code's plans (a base config plus an options grid, docs/math.md §6):

    experiment = "persona"             # which study (experiments.studies.protocol.STUDY_PACKAGES)
    description = "..."

    [base]                             # every key, with its default; its type is the key's type
    lr = 1e-6
    reward = "im"

    [options]                          # the grid: one run per combination, in this order
    reward = ["im", "ex"]

    [presets.cpu]                      # a preset overrides base keys ...
    lr = 3e-5
    [presets.cpu.options]              # ... and grid axes
    reward = ["im", "ex"]

Training plans also say where a run executes: `devices` (0: one device, no mesh; N: a mesh over the first N
devices, `dynamics.sharding.make_mesh`) and the TrainConfig key `param_sharding` ("replicate" | "fsdp");
`run_mesh` turns them into the `mesh` argument of `dynamics.training.train`.

Precedence: base < preset < `--set key=value`. A `--set` on a grid axis fixes it to that one value;
`--set options.key=[json list]` replaces an axis. Every key is type-checked against its base value (an int
is accepted where a float is expected); an unknown key is a ConfigError that names the valid keys.

Nothing here imports JAX, except `run_mesh` when a plan asks for devices.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import itertools
import json
import os
import pathlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from dynamics.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "DEVICE_KEYS",
    "ExperimentPlan",
    "RunSpec",
    "available_experiments",
    "config_path",
    "load_plan",
    "parse_value",
    "run_mesh",
    "train_config",
    "validate_training_keys",
]

_TOP_LEVEL = ("experiment", "description", "base", "options", "presets")
#: Keys of a training plan that are neither data, model nor TrainConfig keys: where the runs execute.
DEVICE_KEYS = ("devices",)
#: The model keys every training plan has (how the model loads and how texts become batches).
MODEL_KEYS = ("model", "dtype", "max_length", "truncate", "bucket_pad")


def train_config(values: Mapping[str, Any]) -> Any:
    """The `dynamics.training.TrainConfig` of a run: the plan keys that are TrainConfig fields (validated there).

    A plan's head_seed = -1 means "the run's seed", so that one grid axis over `seed` varies the data order and the
    EX-RM head's initialisation together."""
    from dynamics.training import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    fields = {k: v for k, v in values.items() if k in names}
    if fields.get("head_seed") == -1 and "seed" in fields:
        fields["head_seed"] = fields["seed"]
    return TrainConfig(**fields)


def validate_training_keys(experiment: str, values: Mapping[str, Any], own_keys: Sequence[str]) -> Any:
    """Checks a training plan's keys and builds its `TrainConfig`, before any model loads.

    Args:
      experiment: its name, for the messages.
      values: the run's resolved keys.
      own_keys: the experiment's data keys (besides MODEL_KEYS, DEVICE_KEYS and the TrainConfig fields).

    Returns:
      The run's `TrainConfig`.

    Raises:
      ConfigError: an unknown key (the message lists the valid ones), a missing key, a bad TrainConfig value or a
        bad device count.
    """
    from dynamics.training import TrainConfig

    known = set(own_keys) | set(MODEL_KEYS) | set(DEVICE_KEYS) | {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{experiment}: unknown keys {unknown}; valid keys: {', '.join(sorted(known))}")
    missing = sorted((set(own_keys) | set(MODEL_KEYS)) - set(values))
    if missing:
        raise ConfigError(f"{experiment}: the plan lacks the keys {missing}")
    config = train_config(values)
    run_mesh(values)  # a bad device count fails now, before any model loads
    return config


def run_mesh(values: Mapping[str, Any]) -> Any:
    """The device mesh of a run's `devices` key: None for 0 (or no key), else a mesh over the first N devices.

    Raises:
      ConfigError: devices is not an int >= 0, does not divide micro_batch_size, or exceeds the devices present.
    """
    devices = values.get("devices", 0)
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 0:
        raise ConfigError(f"devices must be an int >= 0 (0: one device, no mesh), got {devices!r}")
    if devices == 0:
        return None
    micro = values.get("micro_batch_size")
    if isinstance(micro, int) and micro % devices:
        raise ConfigError(
            f"micro_batch_size={micro} cannot be split over devices={devices}: use a multiple of {devices}"
        )
    from dynamics.sharding import make_mesh

    return make_mesh(devices)


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run of a plan: its name (the grid values that vary) and every resolved key."""

    name: str
    values: Mapping[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "values": dict(self.values)}


@dataclasses.dataclass(frozen=True)
class ExperimentPlan:
    """A loaded plan: base values after the preset and the overrides, and the grid.

    Attributes:
      name: the plan's name (the TOML file's stem).
      experiment: the study (a key of `experiments.studies.protocol.STUDY_PACKAGES`).
      description: one line.
      preset: the preset applied.
      source: the TOML file.
      values: every key with its resolved value (grid axes hold their first value).
      grid: axis → values; the runs are the Cartesian product, in axis order.
      overrides: the `--set` strings applied.
    """

    name: str
    experiment: str
    description: str
    preset: str
    source: str
    values: Mapping[str, Any]
    grid: Mapping[str, tuple[Any, ...]]
    overrides: tuple[str, ...] = ()

    def runs(self) -> list[RunSpec]:
        """One `RunSpec` per grid combination; named "key=value,..." over the axes with more than one value.

        A collapsed grid (one point, or no axes at all, e.g. after `--set reward=im`) is named the same way after
        its single-valued axes and the reward type ("reward=im"), so that its run directory says what it holds;
        "run" only when there is neither.
        """
        axes = list(self.grid)
        varying = [a for a in axes if len(self.grid[a]) > 1]
        if not varying:
            varying = axes + (["reward"] if "reward" in self.values and "reward" not in axes else [])
        out = []
        for combo in itertools.product(*(self.grid[a] for a in axes)):
            values = {**self.values, **dict(zip(axes, combo, strict=True))}
            name = ",".join(f"{a}={_name_part(values[a])}" for a in varying) or "run"
            out.append(RunSpec(name, values))
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with `source` relative (`dynamics.outputs.portable_path`): it goes into results.json."""
        from dynamics.outputs import portable_path

        return {
            "name": self.name,
            "experiment": self.experiment,
            "description": self.description,
            "preset": self.preset,
            "source": portable_path(self.source),
            "values": dict(self.values),
            "grid": {k: list(v) for k, v in self.grid.items()},
            "overrides": list(self.overrides),
        }


def _name_part(value: Any) -> str:
    text = os.path.basename(os.path.normpath(value)) if isinstance(value, str) and os.sep in value else str(value)
    return "".join(c if c.isalnum() or c in "-_.:" else "_" for c in text)


def config_dir() -> pathlib.Path:
    """experiments/plans, inside the installed package: the bundled plans (*.toml) lie beside this module."""
    return pathlib.Path(str(importlib.resources.files("experiments.plans")))


def available_experiments() -> list[str]:
    """Names of the bundled plans (experiments/plans/*.toml)."""
    return sorted(p.stem for p in config_dir().glob("*.toml"))


def config_path(name: str) -> pathlib.Path:
    """The TOML of a bundled plan name, or `name` itself when it is a path to a .toml file."""
    if name.endswith(".toml"):
        path = pathlib.Path(name)
        if not path.is_file():
            raise ConfigError(f"{name}: no such config file")
        return path
    path = config_dir() / f"{name}.toml"
    if not path.is_file():
        raise ConfigError(f"unknown experiment {name!r}; available: {', '.join(available_experiments())}")
    return path


def _type_name(value: Any) -> str:
    if isinstance(value, list):
        return "list of " + (_type_name(value[0]) if value else "str")
    return {bool: "bool", int: "int", float: "float", str: "str"}.get(type(value), type(value).__name__)


def check_type(key: str, value: Any, like: Any, where: str) -> Any:
    """`value` if it has the type of `like` (the base value), an int widened to float; else ConfigError."""
    if isinstance(like, bool):
        ok = isinstance(value, bool)
    elif isinstance(like, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(like, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(like, str):
        ok = isinstance(value, str)
    elif isinstance(like, list):
        ok = isinstance(value, list)
        if ok:
            element = like[0] if like else ""
            value = [check_type(f"{key}[{i}]", v, element, where) for i, v in enumerate(value)]
    else:
        raise ConfigError(f"{where}: {key} has an unsupported type {type(like).__name__}")
    if not ok:
        raise ConfigError(f"{where}: {key} must be {_type_name(like)}, got {value!r}")
    return value


def parse_value(key: str, text: str, like: Any) -> Any:
    """The value of `--set key=text`, parsed as the type of the base value `like`.

    bool: true/false/yes/no/1/0; int, float: Python literals; str: as given; list: a JSON list, or
    comma-separated strings.
    """
    where = f"--set {key}={text}"
    if isinstance(like, bool):
        lowered = text.strip().lower()
        if lowered in ("true", "yes", "1", "on"):
            return True
        if lowered in ("false", "no", "0", "off"):
            return False
        raise ConfigError(f"{where}: {key} must be a bool (true/false)")
    if isinstance(like, int):
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{where}: {key} must be an int") from None
    if isinstance(like, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{where}: {key} must be a float") from None
    if isinstance(like, list):
        if text.strip().startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{where}: not a JSON list ({err.msg})") from None
        else:
            value = [part for part in text.split(",") if part]
        return check_type(key, value, like, where)
    return text


def _read_toml(path: pathlib.Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: invalid TOML ({err})") from None


def _grid(table: Any, base: Mapping[str, Any], where: str) -> dict[str, tuple[Any, ...]]:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: options must be a table of lists")
    grid = {}
    for key, values in table.items():
        if key not in base:
            raise ConfigError(f"{where}: options.{key} is not a key of [base]; valid keys: {', '.join(sorted(base))}")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: options.{key} must be a non-empty list")
        grid[key] = tuple(check_type(f"options.{key}", v, base[key], where) for v in values)
    return grid


def load_plan(name: str, preset: str | None = None, overrides: Sequence[str] = ()) -> ExperimentPlan:
    """Loads a plan, applies a preset and `--set` overrides.

    Args:
      name: a bundled plan ("persona") or a path to a .toml file.
      preset: a preset name of the plan (None: none).
      overrides: "key=value" strings (base keys, or "options.key=[...]" for a grid axis).

    Returns:
      The `ExperimentPlan`.

    Raises:
      ConfigError: an unknown plan, preset or key (the message names the valid ones), a value of the wrong
        type, or a malformed TOML.
    """
    path = config_path(name)
    raw = _read_toml(path)
    where = str(path)
    unknown = sorted(set(raw) - set(_TOP_LEVEL))
    if unknown:
        raise ConfigError(f"{where}: unknown top-level keys {unknown}; expected {', '.join(_TOP_LEVEL)}")
    for key in ("experiment", "base"):
        if key not in raw:
            raise ConfigError(f"{where}: missing {key!r}")
    base = dict(raw["base"])
    if not isinstance(raw["base"], dict) or not base:
        raise ConfigError(f"{where}: [base] must be a non-empty table")
    grid = _grid(raw.get("options", {}), base, where)
    presets = raw.get("presets", {})
    if preset is not None:
        if preset not in presets:
            raise ConfigError(f"{where}: unknown preset {preset!r}; presets: {', '.join(sorted(presets)) or '(none)'}")
        table = dict(presets[preset])
        grid.update(_grid(table.pop("options", {}), base, f"{where} [presets.{preset}]"))
        for key, value in table.items():
            if key not in base:
                raise ConfigError(
                    f"{where} [presets.{preset}]: {key!r} is not a key of [base]; valid keys: {', '.join(sorted(base))}"
                )
            base[key] = check_type(key, value, raw["base"][key], f"{where} [presets.{preset}]")
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"--set {item!r}: expected key=value")
        if key.startswith("options."):
            axis = key.split(".", 1)[1]
            if axis not in base:
                raise ConfigError(f"--set {item}: {axis!r} is not a key; valid keys: {', '.join(sorted(base))}")
            values = parse_value(key, text, [raw["base"][axis]])
            if not values:
                raise ConfigError(f"--set {item}: a grid axis needs at least one value")
            grid[axis] = tuple(values)
            continue
        if key not in base:
            raise ConfigError(f"--set {item}: unknown key {key!r}; valid keys: {', '.join(sorted(base))}")
        base[key] = parse_value(key, text, raw["base"][key])
        grid.pop(key, None)
    for axis, values in grid.items():
        base[axis] = values[0]
    return ExperimentPlan(
        name=path.stem,
        experiment=str(raw["experiment"]),
        description=str(raw.get("description", "")),
        preset=preset or "",
        source=str(path),
        values=base,
        grid=grid,
        overrides=tuple(overrides),
    )

"""Experiment plans: the grammar (`experiments.plans.grammar`) and the bundled plans (*.toml beside it)."""

from experiments.plans.grammar import (
    DEVICE_KEYS,
    MODEL_KEYS,
    ExperimentPlan,
    RunSpec,
    available_experiments,
    config_path,
    load_plan,
    parse_value,
    run_mesh,
    train_config,
    validate_training_keys,
)

__all__ = [
    "DEVICE_KEYS",
    "MODEL_KEYS",
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

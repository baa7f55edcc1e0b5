"""Training of EX-RM / IM-RM on the Bradley-Terry loss and of EX-GRM on its cross-entropy (docs/math.md §6).

    from dynamics.training import EvalSuite, TrainConfig, train

    result = train(TrainConfig(reward="im", params="last:8", lr=3e-5, epochs=20),
                   lm, lm_params, train_data, EvalSuite.from_preferences(sets), run_dir="runs/x")

Modules (one idea each):

    config      TrainConfig, OptimizerSpec and the option tables (pure Python: no JAX)
    build       the reward model and its initial parameters; the optax optimizer
    rows        Rows, the one typed batch (a JAX pytree); bucketing, response positions, packing
    batching    epoch order, batch plan, passes of a micro-batch
    hidden      hidden states: plain, from cached frozen blocks, packed
    engine      the jitted step (compile_step) and gradient accumulation (accumulate_gradients)
    scoring     whole sequence sets in chunks: frozen-block cache, ln π(y|x), rewards
    evaluation  EvalSuite, evaluate, evaluate_rewards
    checkpoint  checkpoints (atomic), tree hashing
    record      config.json and the checks of a resumed run
    prepare     everything before the first step (Run, RunState)
    loop        train
    results     StepInfo, TrainResult

Importing this package does not import JAX (the CLI validates a TrainConfig before JAX loads): the names below
other than those of `config` are loaded on first use (PEP 562 module `__getattr__`).
"""

from __future__ import annotations

import importlib
from typing import Any

from dynamics.training.config import (
    CPU_PASS_POSITIONS,
    OPTIMIZERS,
    PARAM_SHARDINGS,
    RESUMABLE_CHANGES,
    REWARD_KINDS,
    OptimizerSpec,
    TrainConfig,
)

# public name → the submodule that defines it (imported on first access)
_LAZY = {
    "build_reward_model": "build",
    "make_optimizer": "build",
    "Rows": "rows",
    "bucket_length": "rows",
    "response_index": "rows",
    "take_rows": "rows",
    "with_packing": "rows",
    "PairSet": "batching",
    "batch_plan": "batching",
    "epoch_order": "batching",
    "pass_limit": "batching",
    "split_passes": "batching",
    "frozen_prefix": "hidden",
    "hidden_states": "hidden",
    "lower_hidden": "hidden",
    "upper_hidden": "hidden",
    "CompiledStep": "engine",
    "accumulate_gradients": "engine",
    "compile_step": "engine",
    "add_lower_cache": "scoring",
    "add_packed_lower_cache": "scoring",
    "packed_logprobs": "scoring",
    "score_packed": "scoring",
    "PackedEval": "packed_eval",
    "build_packed_eval": "packed_eval",
    "score_set": "scoring",
    "sequence_logprobs": "scoring",
    "EvalSuite": "evaluation",
    "evaluate": "evaluation",
    "evaluate_rewards": "evaluation",
    "score_suite": "evaluation",
    "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
    "deferred_interrupt": "interrupts",
    "train": "loop",
    "StepInfo": "results",
    "TrainResult": "results",
}

__all__ = [
    "CPU_PASS_POSITIONS",
    "OPTIMIZERS",
    "PARAM_SHARDINGS",
    "RESUMABLE_CHANGES",
    "REWARD_KINDS",
    "CompiledStep",
    "EvalSuite",
    "OptimizerSpec",
    "PackedEval",
    "PairSet",
    "Rows",
    "StepInfo",
    "TrainConfig",
    "TrainResult",
    "accumulate_gradients",
    "add_lower_cache",
    "add_packed_lower_cache",
    "batch_plan",
    "bucket_length",
    "build_packed_eval",
    "build_reward_model",
    "compile_step",
    "deferred_interrupt",
    "epoch_order",
    "evaluate",
    "evaluate_rewards",
    "frozen_prefix",
    "hidden_states",
    "load_checkpoint",
    "lower_hidden",
    "make_optimizer",
    "pass_limit",
    "packed_logprobs",
    "response_index",
    "save_checkpoint",
    "score_packed",
    "score_set",
    "score_suite",
    "sequence_logprobs",
    "split_passes",
    "take_rows",
    "train",
    "upper_hidden",
    "with_packing",
]


def __getattr__(name: str) -> Any:
    """Loads a lazily re-exported name from its submodule (PEP 562)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

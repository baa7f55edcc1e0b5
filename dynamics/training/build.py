"""What a run trains and how: the reward model with its initial parameters, and the optax optimizer."""

from __future__ import annotations

from typing import Any

from dynamics.errors import ConfigError
from dynamics.masks import prepare
from dynamics.models import LM, Params
from dynamics.objectives import reward_model
from dynamics.rewards import ExplicitRM, RewardModel, make_reward_model
from dynamics.training.config import OptimizerSpec, TrainConfig

__all__ = ["build_reward_model", "make_optimizer"]


def make_optimizer(spec: OptimizerSpec) -> Any:
    """The optax transformation of `spec` (constant learning rate, no clipping: docs/math.md §6)."""
    import optax

    if spec.name == "sgd":
        return optax.sgd(spec.lr)
    if spec.name == "adamw":
        return optax.adamw(spec.lr, b1=spec.b1, b2=spec.b2, eps=spec.eps, weight_decay=spec.weight_decay)
    return optax.adam(spec.lr, b1=spec.b1, b2=spec.b2, eps=spec.eps)


def build_reward_model(
    config: TrainConfig, lm: LM, lm_params: Params, *, answer_ids: tuple[int, int] | None = None
) -> tuple[RewardModel, Params, str]:
    """The reward model of `config.reward`, its initial parameters and the normalized mask spec.

    The EX-RM head is drawn from `config.head_seed`; the IM-RM's π_ref is the initial model; a spec that
    trains the unembedding apart from the input embedding unties it (`dynamics.masks.prepare`).

    Args:
      config: the training configuration.
      lm: the language model.
      lm_params: its parameters.
      answer_ids: (yes_id, no_id) for EX-GRM (`dynamics.text.exgrm_answer_ids`).

    Returns:
      (reward model, parameters, normalized spec).
    """
    if config.reward == "exgrm" and answer_ids is None:
        raise ConfigError("reward='exgrm' needs answer_ids=(yes_id, no_id) (dynamics.text.exgrm_answer_ids)")
    if config.lora_rank:  # fresh factors (PEFT's init: the same function); π_ref below is this initial model
        from dynamics.lora import add_lora

        lm, lm_params = add_lora(lm, lm_params, rank=config.lora_rank, alpha=config.lora_alpha,
                                 targets=config.lora_targets, seed=config.seed)  # fmt: skip
    yes_no = dict(zip(("yes_id", "no_id"), answer_ids or (), strict=False))
    rm = reward_model(make_reward_model(config.reward, lm, beta=config.beta, **yes_no), config.objective_spec)
    if isinstance(rm, ExplicitRM):
        params = rm.init(lm_params, seed=config.head_seed, std=config.head_init_std)
    else:
        params = rm.init(lm_params)
    return prepare(rm, params, config.params)

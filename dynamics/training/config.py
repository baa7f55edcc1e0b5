"""The options of a training run (`TrainConfig`, `OptimizerSpec`), in pure Python: no JAX import, so that a bad
value fails at once.

`dynamics.training` re-exports everything here; the CLI builds a run's TrainConfig before it imports JAX, so that
`rmdyn experiment ... --set lr=-1` is rejected in well under a second.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from dynamics.defaults import DEFAULT_BETA, HEAD_INIT_STD, LORA_TARGETS
from dynamics.errors import ConfigError
from dynamics.objectives import Objective
from dynamics.reward_types import REWARD_TYPES

__all__ = [
    "CPU_PASS_POSITIONS",
    "OPTIMIZERS",
    "PARAM_SHARDINGS",
    "RESUMABLE_CHANGES",
    "REWARD_KINDS",
    "OptimizerSpec",
    "TrainConfig",
]

REWARD_KINDS = tuple(REWARD_TYPES)  # the registered reward types (dynamics.reward_types)
OPTIMIZERS = ("adam", "adamw", "sgd")
PARAM_SHARDINGS = ("replicate", "fsdp")
# TrainConfig fields that may change when a run is resumed: they do not change the trajectory before the end, or
# (param_sharding, like the device count) only where the arrays live, which changes nothing but float rounding.
RESUMABLE_CHANGES = (
    "epochs",
    "max_steps",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "param_sharding",
    "pack_pairs",
    "pass_positions",
    "pack_eval",
)
# positions per forward/backward pass when `pass_positions` is left to the engine on a CPU backend (see TrainConfig)
CPU_PASS_POSITIONS = 1024


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every option of a training run (docs/math.md §6, common training protocol, for the defaults).

    Attributes:
      reward: "ex" (EX-RM, last token), "ex-mean" (EX-RM, mean over response positions, §6.4), "im" (IM-RM),
        "im-noref" (IM-RM without π_ref, §6.4) or "exgrm" (EX-GRM, cross-entropy, §6.5).
      beta: β of the IM-RM (> 0).
      params: trainable-parameter spec of `dynamics.masks` (head | unembed | output | last:K | lora | all | re:PATTERN).
      optimizer: "adam" (the paper's AdamW with weight decay 0), "adamw" or "sgd".
      lr: learning rate (constant).
      b1: Adam β1.
      b2: Adam β2.
      eps: Adam ε (added to the square root of the second moment, as torch does).
      weight_decay: decoupled weight decay of "adamw" (0 for the paper).
      epochs: number of passes over the training data.
      batch_size: effective batch (rows per optimizer step); the loss is the mean over its rows.
      micro_batch_size: rows per forward/backward pass; must divide batch_size (accumulation steps =
        batch_size / micro_batch_size).
      max_steps: stop after this many optimizer steps (0: no limit).
      seed: seed of the data order; epoch e's order is `epoch_order(seed, e, n)`.
      head_seed: seed of the EX-RM head's initialization u ~ N(0, head_init_std²).
      head_init_std: standard deviation of the EX-RM head at initialization (0.02, transformers' default).
      bucket: sequence lengths are padded up to a multiple of this (shape buckets against recompilation).
      eval_every_steps: also evaluate every this many steps (0: never by step count).
      eval_every_epochs: evaluate at the end of every this many epochs (0: never by epoch); the last step is
        always evaluated.
      eval_at_start: evaluate before the first step (step 0).
      eval_batch_size: sequences per forward pass when scoring evaluation sets and reference log-probs.
      log_every_steps: write a "train" line to metrics.jsonl every this many steps.
      checkpoint_every_steps: save a checkpoint every this many steps (0: at every epoch end); a checkpoint is
        also saved at the end and when interrupted by Ctrl-C.
      keep_checkpoints: how many checkpoints to keep (the newest).
      tie_tol: a pair is a tie when |r+ − r−| ≤ tie_tol (recorded with every metric).
      cache_frozen_blocks: when the input embedding and the blocks below some index are all frozen (e.g.
        `last:K`), run those blocks once per sequence and cache their output (a pure speed-up: the upper
        blocks then run on the cached residual stream).
      cache_max_gb: the cache is skipped when it would exceed this many GiB (rows × T × D floats).
      param_sharding: with a device mesh (`train(..., mesh=...)`): "replicate" the parameters and the optimizer
        state on every device (data parallelism) or split each matrix over the devices ("fsdp", each device
        holds about 1/n of them; `dynamics.sharding`). Without a mesh it has no effect.
      pack_pairs: run each training pair's chosen and rejected sequences as one packed row that holds their
        common prefix (the prompt) once (`dynamics.packing`), in micro-batches where that cuts the positions by
        at least 10 %. The same function: only the order of float sums changes.
      pack_eval: score the evaluation sets (and, for an IM-RM, their ln π_ref) on shared-prefix packed rows that
        hold each common prefix once, many sequences per row (`dynamics.training.packed_eval`), when that cuts
        the positions by at least 10 % and there is no device mesh. The same rewards: only the order of float
        sums changes.
      pass_positions: the most positions (rows × bucketed length, a packed row counted once) one forward /
        backward pass may hold: a larger micro-batch runs as several passes of near-equal size whose gradients
        are summed (the same gradient; only the order of float sums changes, as with accumulation). None: the
        engine chooses, `CPU_PASS_POSITIONS` (1024) on a CPU backend and no limit on an accelerator; 0: no
        limit. On the 2-core CPU of this project a SmolLM2-135M IM-RM pass (all parameters, packed pairs of 192
        positions) took 1.00–1.07 s per pair at 576–960 positions, 1.17 s at 1152, 1.20–1.36 s at 1536 and
        1.36 s at 3072 (the activations of a smaller pass stay in the caches).
      objective: the preference loss (`dynamics.objectives`, docs/math.md §11): dpo (Bradley-Terry), cdpo, ipo,
        hinge or simpo (which makes an IM-RM reference-free and length-normalised). EX-GRM trains its own
        cross-entropy and takes dpo only.
      gamma: SimPO's target margin γ ≥ 0.
      label_smoothing: cDPO's ε ∈ [0, ½).
      lora_rank: r > 0 adds fresh LoRA factors to `lora_targets` of every block before training, initialised as
        PEFT does (B = 0: the model's function is unchanged, and the IM-RM's π_ref is the base); with
        params="lora" only they (and an EX-RM's head) train (docs/math.md §13). 0: no LoRA.
      lora_alpha: α; the factors are scaled by α / r.
      lora_targets: the adapted projections among q, k, v, o, gate, up, down.
    """

    reward: str = "im"
    beta: float = DEFAULT_BETA
    params: str = "all"
    optimizer: str = "adam"
    lr: float = 1e-6
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    epochs: int = 1
    batch_size: int = 32
    micro_batch_size: int = 32
    max_steps: int = 0
    seed: int = 0
    head_seed: int = 0
    head_init_std: float = HEAD_INIT_STD
    bucket: int = 16
    eval_every_steps: int = 0
    eval_every_epochs: int = 1
    eval_at_start: bool = True
    eval_batch_size: int = 32
    log_every_steps: int = 1
    checkpoint_every_steps: int = 0
    keep_checkpoints: int = 1
    tie_tol: float = 0.0
    cache_frozen_blocks: bool = True
    cache_max_gb: float = 4.0
    param_sharding: str = "replicate"
    pack_pairs: bool = True
    pass_positions: int | None = None
    pack_eval: bool = True
    objective: str = "dpo"
    gamma: float = 0.0
    label_smoothing: float = 0.0
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q", "v")

    def __post_init__(self):
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        if self.reward not in REWARD_KINDS:
            raise ConfigError(f"reward must be one of {', '.join(REWARD_KINDS)}; got {self.reward!r}")
        if self.param_sharding not in PARAM_SHARDINGS:
            raise ConfigError(
                f"param_sharding must be one of {', '.join(PARAM_SHARDINGS)}; got {self.param_sharding!r}"
            )
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}")
        positive = ("batch_size", "micro_batch_size", "bucket", "eval_batch_size", "log_every_steps")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive int, got {value!r}")
        for name in (
            "epochs",
            "max_steps",
            "seed",
            "head_seed",
            "eval_every_steps",
            "eval_every_epochs",
            "checkpoint_every_steps",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be an int >= 0, got {value!r}")
        if self.pass_positions is not None and (
            isinstance(self.pass_positions, bool) or not isinstance(self.pass_positions, int) or self.pass_positions < 0
        ):
            raise ConfigError(f"pass_positions must be None or an int >= 0, got {self.pass_positions!r}")
        if isinstance(self.keep_checkpoints, bool) or not isinstance(self.keep_checkpoints, int):
            raise ConfigError(f"keep_checkpoints must be an int >= 1, got {self.keep_checkpoints!r}")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"keep_checkpoints must be an int >= 1, got {self.keep_checkpoints!r}")
        if self.batch_size % self.micro_batch_size:
            raise ConfigError(
                f"micro_batch_size={self.micro_batch_size} must divide batch_size={self.batch_size} "
                "(effective batch = micro-batch × accumulation steps)"
            )
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ConfigError(f"lr must be > 0, got {self.lr!r}")
        if not self.beta > 0:
            raise ConfigError(f"beta must be > 0, got {self.beta!r}")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1 and self.eps >= 0):
            raise ConfigError(f"need 0 <= b1, b2 < 1 and eps >= 0; got b1={self.b1}, b2={self.b2}, eps={self.eps}")
        if self.weight_decay < 0 or (self.weight_decay and self.optimizer != "adamw"):
            raise ConfigError(f"weight_decay={self.weight_decay} needs optimizer='adamw' and a value >= 0")
        if not self.tie_tol >= 0 or not self.head_init_std >= 0:
            raise ConfigError("tie_tol and head_init_std must be >= 0")
        Objective(self.objective, gamma=self.gamma, smoothing=self.label_smoothing)  # raises ConfigError
        bad = sorted(set(self.lora_targets) - set(LORA_TARGETS))
        if not (isinstance(self.lora_rank, int) and self.lora_rank >= 0) or bad or not self.lora_alpha > 0:
            raise ConfigError(
                f"LoRA: lora_rank must be an int >= 0 and lora_alpha > 0, and lora_targets among "
                f"{', '.join(LORA_TARGETS)}; got rank {self.lora_rank!r}, alpha {self.lora_alpha!r}, "
                f"unknown targets {bad or 'none'}"
            )
        if self.reward == "exgrm" and self.objective != "dpo":
            raise ConfigError(f"reward 'exgrm' trains its cross-entropy loss; objective {self.objective!r} needs a "
                              "reward margin (ex, ex-mean, im, im-noref)")  # fmt: skip

    @property
    def objective_spec(self) -> Objective:
        """The objective of this run, with IPO's β the run's β for an IM-RM (1 for an EX-RM)."""
        beta = self.beta if REWARD_TYPES[self.reward].model == "ImplicitRM" else 1.0
        return Objective(self.objective, beta=beta, gamma=self.gamma, smoothing=self.label_smoothing)

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step."""
        return self.batch_size // self.micro_batch_size

    def to_dict(self) -> dict[str, Any]:
        """Every field by name (JSON-ready: tuples as lists, as config.json holds them)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """The inverse of `to_dict`; an unknown key is a ConfigError naming the valid keys."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(f"unknown TrainConfig keys {unknown}; valid keys: {', '.join(names)}")
        return cls(**data)


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """The optimizer of a run, and nothing else: the key of the compiled training step (hashable).

    Attributes:
      name: "adam", "adamw" or "sgd" (`OPTIMIZERS`).
      lr: constant learning rate (> 0).
      b1: Adam β1.
      b2: Adam β2.
      eps: Adam ε.
      weight_decay: decoupled weight decay of "adamw".
    """

    name: str = "adam"
    lr: float = 1e-6
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.name!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ConfigError(f"lr must be > 0, got {self.lr!r}")

    @classmethod
    def from_config(cls, config: TrainConfig) -> OptimizerSpec:
        """The optimizer fields of a TrainConfig (`optimizer`, `lr`, `b1`, `b2`, `eps`, `weight_decay`)."""
        return cls(config.optimizer, config.lr, config.b1, config.b2, config.eps, config.weight_decay)

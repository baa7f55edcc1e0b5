"""The paper's default constants, in a module without JAX (`dynamics.training.config` reads them before JAX loads)."""

from __future__ import annotations

__all__ = ["DEFAULT_BETA", "HEAD_INIT_STD", "LORA_TARGETS"]

DEFAULT_BETA = 0.01  # β of the IM-RM (paper §6: β = 0.01)
HEAD_INIT_STD = 0.02  # transformers' initializer_range for the `score` head of a sequence classifier
#: The projections LoRA can adapt, by rmdyn's parameter names (attention q, k, v, o; MLP gate, up, down).
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")

"""The one registry of reward types: kind → label, explicit or implicit, and how to build the reward model.

Pure Python (no JAX at import), so that the CLI can check a `--reward` value and label a figure before JAX
loads. Every place that switches on a reward kind reads it from here: `dynamics.rewards.make_reward_model`,
training (`TrainConfig.reward`), `delta`'s result names, the CLI, the studies and the figures.

    kind       label            explicit  model (docs/math.md §1, §6.4, §6.5)
    ex         EX-RM            yes       ⟨u, h⟩ at the last real token
    ex-mean    EX-RM (mean)     yes       ⟨u, mean of h over the response positions⟩
    im         IM-RM            no        β ln π(y|x)/π_ref(y|x), summed over response tokens
    im-noref   IM-RM (no ref)   no        β ln π(y|x) (reference-free)
    exgrm      EX-GRM           yes       π("Yes" | x, y) of the LM asked to judge, trained by cross-entropy
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from dynamics.errors import ConfigError

__all__ = [
    "REWARD_TYPES",
    "RewardType",
    "explicit_kinds",
    "implicit_kinds",
    "reward_color",
    "reward_label",
    "reward_type",
]


@dataclasses.dataclass(frozen=True)
class RewardType:
    """One reward type.

    Attributes:
      kind: the short name used in configs, plans and on the command line ("ex", "im", ...).
      label: how results, tables and figures name it ("EX-RM", "IM-RM (no ref)", ...).
      explicit: True for a reward read off a learned head or an answer token (EX-RM, EX-GRM); False for the
        implicit reward β ln π/π_ref of the language model itself (IM-RM).
      model: the `dynamics.rewards` class that computes it ("ExplicitRM", "ImplicitRM", "GenerativeRM").
      color: its colour in every figure (matplotlib colour string).
      options: the constructor options the kind fixes, over any the caller passes (e.g. pooling="mean",
        reference_free=True); "ex" and "im" fix none, so a caller may choose them.
    """

    kind: str
    label: str
    explicit: bool
    model: str
    color: str
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def implicit(self) -> bool:
        """True for an IM-RM (the reward is the language model's own log-likelihood ratio)."""
        return not self.explicit


REWARD_TYPES: Mapping[str, RewardType] = MappingProxyType(
    {
        t.kind: t
        for t in (
            RewardType("ex", "EX-RM", True, "ExplicitRM", "#1f77b4"),
            RewardType("ex-mean", "EX-RM (mean)", True, "ExplicitRM", "#17becf", {"pooling": "mean"}),
            RewardType("im", "IM-RM", False, "ImplicitRM", "#d62728"),
            RewardType("im-noref", "IM-RM (no ref)", False, "ImplicitRM", "#e377c2", {"reference_free": True}),
            RewardType("exgrm", "EX-GRM", True, "GenerativeRM", "#ff7f0e"),
        )
    }
)


def reward_type(kind: str) -> RewardType:
    """The registered reward type `kind`; a ConfigError naming the choices for anything else."""
    try:
        return REWARD_TYPES[kind]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown reward type {kind!r}; expected one of {', '.join(REWARD_TYPES)}") from None


def reward_color(kind: str, default: str = "0.35") -> str:
    """The figure colour of `kind`; `default` (grey) for an unregistered kind."""
    t = REWARD_TYPES.get(kind)
    return t.color if t is not None else default


def reward_label(kind: str) -> str:
    """The label of `kind` ("im" → "IM-RM"); an unregistered kind is returned as given (e.g. a run name)."""
    t = REWARD_TYPES.get(kind)
    return t.label if t is not None else kind


def explicit_kinds() -> tuple[str, ...]:
    """The kinds whose reward is explicit (EX-RM variants, EX-GRM), in registry order."""
    return tuple(k for k, t in REWARD_TYPES.items() if t.explicit)


def implicit_kinds() -> tuple[str, ...]:
    """The kinds whose reward is implicit (IM-RM variants), in registry order."""
    return tuple(k for k, t in REWARD_TYPES.items() if t.implicit)

"""What a run evaluates (`EvalSuite`) and the metrics of an evaluation (`evaluate`, `evaluate_rewards`).

Scoring each distinct sequence set once and comparing sets afterwards lets one response set take part in many
comparisons (Persona's 2×2 paraphrase combinations share their four response sets, docs/math.md §6.2). The
metrics are TRL's names (docs/math.md §6): accuracy with ties ½, margins, and the BT loss of the rewards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from dynamics.errors import DataError
from dynamics.metrics import PreferenceMetrics, preference_metrics
from dynamics.models import Params
from dynamics.text import PreferenceBatch
from dynamics.training.config import TrainConfig
from dynamics.training.engine import CompiledStep
from dynamics.training.packed_eval import PackedEval
from dynamics.training.rows import Rows
from dynamics.training.scoring import score_packed, score_set

__all__ = ["EvalSuite", "eval_line", "evaluate", "evaluate_rewards", "score_suite"]


@dataclasses.dataclass(frozen=True)
class EvalSuite:
    """What to evaluate: named sets of sequences, and comparisons between row-aligned sets.

    Attributes:
      sequences: name → `PairBatch` (EX-RM, IM-RM) or `ExgrmBatch` (EX-GRM): the sequences to score.
      comparisons: metric name → (chosen set, rejected set); row i of one is compared with row i of the other.
      averages: name → comparison names whose metrics are averaged (e.g. over the paraphrase combinations).
    """

    sequences: Mapping[str, Any]
    comparisons: Mapping[str, tuple[str, str]]
    averages: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_preferences(cls, sets: Mapping[str, PreferenceBatch]) -> EvalSuite:
        """One comparison per preference set: "<name>" compares "<name>/chosen" with "<name>/rejected"."""
        sequences, comparisons = {}, {}
        for name, batch in sets.items():
            sequences[f"{name}/chosen"] = batch.chosen
            sequences[f"{name}/rejected"] = batch.rejected
            comparisons[name] = (f"{name}/chosen", f"{name}/rejected")
        return cls(sequences, comparisons)

    def validate(self) -> None:
        """Raises DataError for an empty set, an unknown name or comparisons of sets of different sizes."""
        for name, batch in self.sequences.items():
            if batch is None or _n_rows(batch) == 0:
                raise DataError(f"evaluation set {name!r} has no rows")
        for name, (a, b) in self.comparisons.items():
            for side in (a, b):
                if side not in self.sequences:
                    raise DataError(
                        f"comparison {name!r} names the unknown set {side!r}; sets: {sorted(self.sequences)}"
                    )
            if _n_rows(self.sequences[a]) != _n_rows(self.sequences[b]):
                raise DataError(
                    f"comparison {name!r}: {a!r} has {_n_rows(self.sequences[a])} rows but {b!r} has "
                    f"{_n_rows(self.sequences[b])}"
                )
        for name, members in self.averages.items():
            missing = [m for m in members if m not in self.comparisons]
            if missing or not members:
                raise DataError(f"average {name!r} names unknown comparisons {missing or '(none)'}")


def _n_rows(batch: Any) -> int:
    return int(np.asarray(batch.tokens).shape[0])


def _bt_loss(r_chosen: np.ndarray, r_rejected: np.ndarray) -> float:
    """−mean ln σ(r+ − r−), in float64 (the evaluation loss of every reward type, as the official code logs)."""
    return float(np.mean(np.logaddexp(0.0, -(r_chosen - r_rejected))))


def _metric_dict(m: PreferenceMetrics, loss: float, prefix: str) -> dict[str, float]:
    out = m.as_trl_dict(prefix)
    out[prefix + "loss"] = loss
    return out


def _pair_loss(r_chosen: np.ndarray, r_rejected: np.ndarray, objective: Any) -> float:
    """The mean loss of the pairs: BT in float64 (`_bt_loss`), or the objective's (docs/math.md §11)."""
    if objective is None or objective.name == "dpo":
        return _bt_loss(r_chosen, r_rejected)
    return float(np.mean(np.asarray(objective.losses(r_chosen, r_rejected))))


def evaluate_rewards(
    rewards: Mapping[str, np.ndarray], suite: EvalSuite, tie_tol: float = 0.0, objective: Any = None
) -> dict[str, float]:
    """Metrics of every comparison and average of `suite`, from the rewards of its sequence sets.

    `objective` (`dynamics.objectives.Objective`, None: Bradley-Terry) defines the "loss" metric.

    Returns:
      A flat dict: "<comparison>/rewards/accuracies" (ties ½), ".../accuracy_strict", ".../margins",
      ".../normalized_margin", ".../chosen", ".../rejected", ".../ties", "<comparison>/loss" (BT loss of the
      rewards); the same names for each average (the mean of its members' values); and
      "reward_mean/<set>" for each sequence set.
    """
    out: dict[str, float] = {}
    per: dict[str, dict[str, float]] = {}
    for name, (a, b) in suite.comparisons.items():
        m = preference_metrics(rewards[a], rewards[b], tie_tol=tie_tol)
        per[name] = _metric_dict(m, _pair_loss(rewards[a], rewards[b], objective), "")
        out.update({f"{name}/{k}": v for k, v in per[name].items()})
    for name, members in suite.averages.items():
        for k in per[members[0]]:
            out[f"{name}/{k}"] = float(np.mean([per[m][k] for m in members]))
    for name, r in rewards.items():
        out[f"reward_mean/{name}"] = float(np.mean(r))
    return out


def score_suite(
    step: CompiledStep,
    params: Params,
    suite: EvalSuite,
    sets: Mapping[str, Rows],
    ref_cache: Mapping[str, np.ndarray | None],
    config: TrainConfig,
    mesh: Any = None,
    bar: Any = None,
    packed: PackedEval | None = None,
) -> dict[str, np.ndarray]:
    """The rewards of every sequence set of `suite`: {set name: [n] float64}.

    Args:
      step: the run's jitted functions (`compile_step`).
      params: the reward model's parameters.
      suite: what to evaluate.
      sets: the rows of each sequence set (with the frozen-block cache `x` where used).
      ref_cache: ln π_ref of each set's rows (IM-RM), else None.
      config: the run's options (chunk size, bucket, tie tolerance).
      mesh: the device mesh the parameters are placed on (`train`'s), else None; each chunk is split over it.
      bar: a tqdm bar advanced by the rows of each scored chunk, or None.
      packed: the suite's sets on shared-prefix packed rows (`Run.packed_eval`), or None; when given, the
        rewards come from them (`score_packed`) and `sets` is not read.
    """
    if packed is not None:
        return score_packed(step, params, packed, ref_cache, bar)
    return {
        name: score_set(step, params, sets[name], ref_cache.get(name), config, mesh, bar) for name in suite.sequences
    }


def evaluate(
    step: CompiledStep,
    params: Params,
    suite: EvalSuite,
    sets: Mapping[str, Rows],
    ref_cache: Mapping[str, np.ndarray | None],
    config: TrainConfig,
    mesh: Any = None,
    bar: Any = None,
    packed: PackedEval | None = None,
) -> dict[str, float]:
    """`evaluate_rewards`' metrics of the rewards `score_suite` gives (the same arguments)."""
    rewards = score_suite(step, params, suite, sets, ref_cache, config, mesh, bar, packed=packed)
    return evaluate_rewards(rewards, suite, config.tie_tol, config.objective_spec)


def eval_line(step: int, evaluation: Mapping[str, float], suite: EvalSuite) -> str:
    """The progress line of an evaluation: the accuracy of each average and each comparison outside them."""
    names = list(suite.averages) + [c for c in suite.comparisons if not any(c in m for m in suite.averages.values())]
    parts = [f"{name} {evaluation[f'{name}/rewards/accuracies']:.3f}" for name in names]
    return f"step {step} eval accuracy: " + ", ".join(parts)

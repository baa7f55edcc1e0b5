"""Likelihood displacement: does one DPO step lower the log-probability of the responses it prefers?
(docs/math.md §12).

One step on the training pairs D moves ln π_θ(y|x) of every response. For the IM-RM r = β (ln π_θ − ln π_ref),
π_ref is fixed, so the first-order change of the policy's log-likelihood is the IM-RM's Δr over β:

    Δ ln π_θ(y|x) = Δr_IM(x, y) / β              (SimPO's length-normalised reward: |y| Δr / β)

`likelihood_displacement` predicts it, through `dynamics.delta.delta_reward`, for the chosen and rejected responses
of every training pair (their own step) and for any eval responses. It flags the pairs whose chosen log-likelihood
is predicted to fall. It also reports each pair's CHES similarity (Razin et al. 2025, "Unintentional
Unalignment"), which predicts that fall from the hidden states alone:

    CHES(x, y+, y−)    = ⟨ĥ+, ĥ−⟩ − ‖ĥ+‖²,                ĥ± = Σ_k h_{x, y±<k}
    ln-CHES(x, y+, y−) = ⟨ĥ+, ĥ−⟩ / (|y+| |y−|) − ‖ĥ+‖² / |y+|²

Here h_{x,y<k} is the hidden state that predicts token k, and the sums run over the response tokens. The sums grow
with the response length, so on long responses of large models the unnormalised CHES spans many orders of
magnitude (float32 overflows past ~1e38). The length-normalised one is the comparable score. `check_displacement`
compares the prediction with real optimizer steps (`dynamics.step_check.check_step`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dynamics.batches import PairBatch, PreferenceBatch
from dynamics.errors import ConfigError, DataError

__all__ = [
    "Displacement",
    "check_displacement",
    "check_implicit",
    "ches_scores",
    "concat_pairs",
    "likelihood_displacement",
    "log_likelihood_scale",
    "response_sequences",
    "split_rows",
]


@dataclasses.dataclass(frozen=True)
class Displacement:
    """Predicted first-order changes of the policy's log-likelihoods after one step (docs/math.md §12).

    Attributes:
      chosen: Δ ln π_θ(y_j+ | x_j) per training pair, [N] (nats, at the step's η).
      rejected: Δ ln π_θ(y_j− | x_j), [N].
      eval: Δ ln π_θ(y|x) of each eval response, [M], or None.
      ches: CHES(x_j, y_j+, y_j−), [N] (hidden units², float64).
      ln_ches: the length-normalised CHES, [N].
      actual_chosen, actual_rejected, actual_eval: the same changes after a real step (`check_displacement`),
        or along a real run (`dynamics.displacement_run.displacement_along_run`), or None.
      meta: settings (lr, params, optimizer, objective, β, N, M; a run's directory and checkpoints).
      path_steps: along a run, the checkpoint steps t_0 = 0, …, t_C, [C + 1]; else None.
      path_predicted, path_actual: along a run, the cumulative predicted and actual Δ ln π at each checkpoint,
        [C + 1, 2N + M] (the chosen, rejected and eval rows, in that order); else None.
    """

    chosen: np.ndarray
    rejected: np.ndarray
    eval: np.ndarray | None
    ches: np.ndarray
    ln_ches: np.ndarray
    meta: dict[str, Any]
    actual_chosen: np.ndarray | None = None
    actual_rejected: np.ndarray | None = None
    actual_eval: np.ndarray | None = None
    path_steps: np.ndarray | None = None
    path_predicted: np.ndarray | None = None
    path_actual: np.ndarray | None = None

    @property
    def chosen_falls(self) -> np.ndarray:
        """The pairs whose chosen log-likelihood is predicted to fall (Δ ln π(y+) < 0), bool [N]."""
        return self.chosen < 0

    def summary(self) -> dict[str, Any]:
        """Fractions of pairs whose chosen (rejected) log-likelihood falls, predicted and actual, and the sign
        agreement of predicted and actual Δ ln π(y+); Spearman of ln-CHES with −Δ ln π(y+)."""
        from dynamics.attribution.overlap import spearman

        out: dict[str, Any] = {
            "n_pairs": int(self.chosen.size),
            "predicted_chosen_falls": float(np.mean(self.chosen < 0)),
            "predicted_rejected_falls": float(np.mean(self.rejected < 0)),
            "spearman_ln_ches_vs_chosen_fall": spearman(self.ln_ches, -self.chosen),
        }
        if self.actual_chosen is not None:
            out["actual_chosen_falls"] = float(np.mean(self.actual_chosen < 0))
            out["actual_rejected_falls"] = float(np.mean(self.actual_rejected < 0))
            out["sign_agreement_chosen"] = float(np.mean(np.sign(self.chosen) == np.sign(self.actual_chosen)))
            out["sign_agreement_rejected"] = float(np.mean(np.sign(self.rejected) == np.sign(self.actual_rejected)))
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: every array as a list, the meta and the summary."""
        from dynamics.outputs import jsonable

        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return jsonable({**fields, "summary": self.summary()})

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Writes `to_dict` as JSON (atomically) and returns the path."""
        from dynamics.outputs import write_json_atomic

        return write_json_atomic(path, self.to_dict())


def concat_pairs(batches: Sequence[PairBatch]) -> PairBatch:
    """The rows of several `PairBatch`es as one, padded to the longest T on the side they are padded on.

    Raises:
      DataError: batches padded on different sides (one left, one right).
    """
    left = [bool(np.any(np.asarray(b.attention_mask)[:, 0] == 0)) for b in batches]
    right = [bool(np.any(np.asarray(b.attention_mask)[:, -1] == 0)) for b in batches]
    if any(left) and any(right):
        raise DataError("cannot join sequences padded on the left with sequences padded on the right")
    T = max(b.seq_len for b in batches)

    def pad(a, n):
        widths = ((0, 0), (n, 0)) if any(left) else ((0, 0), (0, n))
        return np.pad(np.asarray(a), widths)

    fields = ("tokens", "attention_mask", "response_mask")
    parts = [[pad(getattr(b, f), T - b.seq_len) for b in batches] for f in fields]
    return PairBatch(*(np.concatenate(p) for p in parts))


def ches_scores(lm, lm_params, train: PreferenceBatch) -> tuple[np.ndarray, np.ndarray]:
    """(CHES, ln-CHES) of every training pair, [N] each, float64 (the module docstring's formulas)."""
    from dynamics.attribution.overlap import sequence_states

    def summed(batch):
        s = sequence_states(lm, lm_params, batch)
        h = (s.contexts.astype(np.float64) * s.mask[..., None]).sum(axis=1)  # [n, D]
        return h, s.mask.sum(axis=1).astype(np.float64)

    hp, lp = summed(train.chosen)
    hm, lm_ = summed(train.rejected)
    cross, own = np.einsum("nd,nd->n", hp, hm), np.einsum("nd,nd->n", hp, hp)
    return cross - own, cross / (lp * lm_) - own / lp**2


def log_likelihood_scale(rm, batch: PairBatch) -> np.ndarray:
    """Δ ln π = scale · Δr per row of `batch`, [B]: 1/β, or |y|/β for a length-normalised reward (SimPO's)."""
    scale = np.full(batch.batch_size, 1.0 / rm.beta)
    if getattr(rm, "length_normalised", False):
        scale = scale * np.maximum(np.asarray(batch.response_mask).sum(axis=1), 1)
    return scale


def response_sequences(train: PreferenceBatch, eval_responses: PairBatch | None) -> PairBatch:
    """The chosen responses of `train`, then its rejected ones, then `eval_responses` (if any), as one batch."""
    return concat_pairs([train.chosen, train.rejected] + ([eval_responses] if eval_responses is not None else []))


def split_rows(values: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(chosen, rejected, eval or None) of values over `response_sequences` rows, for N = n pairs."""
    return values[:n], values[n : 2 * n], (values[2 * n :] if values.size > 2 * n else None)


def _build(rm, params, train, sequences, objective, delta, meta: dict, lr: float, actual=None) -> Displacement:
    """The `Displacement` of the predicted reward changes `delta` (and the `actual` ones of a real step, or None)
    over `sequences`: the chosen, rejected and eval rows."""
    from dynamics.objectives import reward_model

    scale = log_likelihood_scale(reward_model(rm, objective), sequences)
    n = train.batch_size
    chosen, rejected, ev = split_rows(delta * scale, n)
    a_chosen, a_rejected, a_eval = (None, None, None) if actual is None else split_rows(actual * scale, n)
    ches, ln_ches = ches_scores(rm.lm, params["lm"], train)
    keep = {k: meta[k] for k in ("params", "n_trained", "optimizer", "n_train", "objective")}
    meta = {**keep, "lr": float(lr), "beta": rm.beta, "n_eval": sequences.batch_size - 2 * n}
    return Displacement(chosen, rejected, ev, ches, ln_ches, meta, a_chosen, a_rejected, a_eval)


def check_implicit(rm) -> None:
    """Refuses a reward model that is not an IM-RM (ConfigError)."""
    from dynamics.rewards import ImplicitRM

    if not isinstance(rm, ImplicitRM):
        raise ConfigError("likelihood displacement is a change of the policy π_θ: it needs an IM-RM (ImplicitRM)")


def likelihood_displacement(
    rm,
    params,
    train: PreferenceBatch,
    *,
    eval_responses: PairBatch | None = None,
    params_spec: str = "all",
    lr: float = 1e-3,
    optimizer: str = "sgd",
    objective=None,
    chunk_size: int = 16,
    progress: bool = False,
) -> Displacement:
    """Predicted Δ ln π_θ of every training response and eval response after one step on `train`.

    Args:
      rm, params: an IM-RM (`ImplicitRM`; its π_θ is the policy) and its parameters {"lm", "ref"}.
      train: the N training pairs (the step's batch; its loss is their mean).
      eval_responses: M more responses whose log-likelihood change to predict, or None.
      params_spec, lr, optimizer, objective, chunk_size, progress: as `dynamics.delta.delta_reward`.

    Raises:
      ConfigError: a reward model that is not an IM-RM, and the errors of `delta_reward`.
      DataError: as `delta_reward` (a response with no token, ...).
    """
    from dynamics.delta import delta_reward

    check_implicit(rm)
    sequences = response_sequences(train, eval_responses)
    d = delta_reward(
        rm, params, train, sequences, params_spec=params_spec, lr=lr, optimizer=optimizer, decompose=False,
        chunk_size=chunk_size, progress=progress, objective=objective,
    )  # fmt: skip
    return _build(rm, params, train, sequences, objective, d.delta, d.meta, lr)


def check_displacement(
    rm,
    params,
    train: PreferenceBatch,
    *,
    eval_responses: PairBatch | None = None,
    params_spec: str = "all",
    lr: float = 1e-3,
    optimizer: str = "sgd",
    objective=None,
    chunk_size: int = 16,
    progress: bool = False,
) -> Displacement:
    """`likelihood_displacement` with the actual changes after one real optimizer step of learning rate `lr`
    (`dynamics.step_check.check_step`: its prediction and the log-likelihoods after the jitted optax step)."""
    from dynamics.step_check import check_step

    check_implicit(rm)
    sequences = response_sequences(train, eval_responses)
    res = check_step(
        rm, params, train, sequences, lrs=[lr], params_spec=params_spec, optimizer=optimizer, method="ntk",
        chunk_size=chunk_size, progress=progress, objective=objective,
    )  # fmt: skip
    return _build(rm, params, train, sequences, objective, res.predicted[0], res.prediction.meta, lr, res.actual[0])

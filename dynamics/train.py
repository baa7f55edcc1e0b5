"""Training of EX-RM / IM-RM on the Bradley-Terry loss (and EX-GRM on its cross-entropy) with optax.

The common training protocol of docs/math.md §6 is the default: Adam (torch's defaults: betas 0.9/0.999,
eps 1e-8, no weight decay), lr 1e-6, constant, no clipping; β = 0.01; effective batch 32 by gradient
accumulation (micro-batch × accumulation steps) of the batch-mean loss; evaluation at the end of every epoch.

    result = train(TrainConfig(reward="im", params="last:8", lr=3e-5, epochs=20),
                   lm, lm_params, train_data, eval_suite, run_dir="runs/x")

Design:

- Which parameters train is a `dynamics.masks` spec. Gradients are taken with respect to the trainable tree
  alone (`partition` / `combine`), so JAX skips the backward pass through frozen lower blocks.
- π_ref never changes, so the reference log-probabilities ln π_ref(y|x) of every sequence (training and
  evaluation) are computed once, before the first step, and cached: one forward pass per step instead of two.
- The data order of epoch e is a pure function of (seed, e) (`epoch_order`), checkpoints are taken at step
  boundaries, and nothing depends on the wall clock: a run interrupted (Ctrl-C, SIGKILL) and resumed with
  `resume=True` ends with the same metrics and parameters, bit for bit, as an uninterrupted run.
- Sequence lengths are bucketed (T rounded up to a multiple of `bucket`), so a data set of varied lengths
  compiles a handful of programs; each jitted function counts its traces (`TrainResult.timing["traces"]`).
- Three exact speed-ups, checked against the plain computation in the tests: when the input embedding and the
  blocks below some index are frozen (`last:K`), their output is computed once per sequence and cached
  (`lower_hidden` / `upper_hidden`); the IM-RM unembeds only the positions that predict response tokens
  (`response_index`), |y| rows of V logits per sequence instead of T; and each pair's chosen and rejected
  sequences run as one packed row holding their shared prompt once (`dynamics.packing`, `pack_pairs`).
- The gradient of a step is Σ_i ∇ℓ_i over its micro-batches divided by the number of rows, so accumulation
  equals the full-batch step of the batch-mean loss, also for a short last batch.
- Several devices: `train(..., mesh=dynamics.sharding.make_mesh(n))` places the parameters and the optimizer
  state by `param_sharding` (replicated, or FSDP) and splits every micro-batch and evaluation chunk along its
  rows; the jitted functions are the same (GSPMD propagates the shardings), and so are the numbers, up to the
  order of float reductions.

Run directory:

    config.json        everything needed to reproduce (train config, model, mask, data fingerprints, versions)
    metrics.jsonl      one JSON object a line: {"event": "train" | "eval", "step", "epoch", ...}
    summary.json       the final evaluation and the run's totals (written at the end)
    checkpoints/       step_XXXXXXXX/{state.safetensors, meta.json} and latest.json
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dynamics.errors import ConfigError, DataError
from dynamics.masks import combine, count_selected, leaf_paths, partition, prepare, trainable_mask
from dynamics.metrics import PreferenceMetrics, preference_metrics
from dynamics.models import LM, Params
from dynamics.outputs import atomic_write_text, permissions, write_json_atomic
from dynamics.outputs import jsonable as _jsonable
from dynamics.packing import pack_pairs, packed_attention_mask, worth_packing
from dynamics.rewards import (
    ExplicitRM,
    GenerativeRM,
    ImplicitRM,
    RewardModel,
    make_reward_model,
)
from dynamics.text import ExgrmBatch, PairBatch, PreferenceBatch, last_token_index
from dynamics.train_config import REWARD_KINDS, TrainConfig

__all__ = [
    "RESUMABLE_CHANGES",
    "REWARD_KINDS",
    "EvalSuite",
    "StepInfo",
    "TrainConfig",
    "TrainResult",
    "atomic_write_text",
    "batch_plan",
    "bucket_length",
    "build_reward_model",
    "epoch_order",
    "evaluate",
    "evaluate_rewards",
    "frozen_prefix",
    "load_checkpoint",
    "lower_hidden",
    "make_optimizer",
    "pass_limit",
    "response_index",
    "save_checkpoint",
    "split_passes",
    "take_rows",
    "train",
    "upper_hidden",
]

_CHECKPOINT_FORMAT = 1
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
)
# positions per forward/backward pass when `pass_positions` is left to the engine on a CPU backend (see TrainConfig)
CPU_PASS_POSITIONS = 1024


# ----------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------


def make_optimizer(config: TrainConfig) -> Any:
    """The optax transformation of `config` (constant learning rate, no clipping: docs/math.md §6)."""
    import optax

    if config.optimizer == "sgd":
        return optax.sgd(config.lr)
    if config.optimizer == "adamw":
        return optax.adamw(config.lr, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay)
    return optax.adam(config.lr, b1=config.b1, b2=config.b2, eps=config.eps)


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
    yes_no = dict(zip(("yes_id", "no_id"), answer_ids or (), strict=False))
    rm = make_reward_model(config.reward, lm, beta=config.beta, **yes_no)
    if isinstance(rm, ExplicitRM):
        params = rm.init(lm_params, seed=config.head_seed, std=config.head_init_std)
    else:
        params = rm.init(lm_params)
    return prepare(rm, params, config.params)


# ----------------------------------------------------------------------------------------------------------
# Evaluation sets
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EvalSuite:
    """What to evaluate: named sets of sequences, and comparisons between row-aligned sets.

    Scoring each distinct sequence once and comparing sets afterwards lets one response set take part in many
    comparisons (Persona's 2×2 paraphrase combinations share their four response sets, docs/math.md §6.2).

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
            if batch is None or _rows(batch) == 0:
                raise DataError(f"evaluation set {name!r} has no rows")
        for name, (a, b) in self.comparisons.items():
            for side in (a, b):
                if side not in self.sequences:
                    raise DataError(
                        f"comparison {name!r} names the unknown set {side!r}; sets: {sorted(self.sequences)}"
                    )
            if _rows(self.sequences[a]) != _rows(self.sequences[b]):
                raise DataError(
                    f"comparison {name!r}: {a!r} has {_rows(self.sequences[a])} rows but {b!r} has "
                    f"{_rows(self.sequences[b])}"
                )
        for name, members in self.averages.items():
            missing = [m for m in members if m not in self.comparisons]
            if missing or not members:
                raise DataError(f"average {name!r} names unknown comparisons {missing or '(none)'}")


def _rows(batch: Any) -> int:
    return int(np.asarray(batch.tokens).shape[0])


# ----------------------------------------------------------------------------------------------------------
# Small pure functions: order, batching, bucketing
# ----------------------------------------------------------------------------------------------------------


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of the n training rows in epoch `epoch`: a pure function of (seed, epoch).

    Returns:
      int64 [n], a permutation of range(n) from numpy's PCG64 seeded with SeedSequence([seed, epoch]).
    """
    return np.random.default_rng(np.random.SeedSequence([seed, epoch])).permutation(n)


def batch_plan(order: np.ndarray, batch_size: int, micro_batch_size: int) -> list[list[np.ndarray]]:
    """Steps of micro-batches: consecutive `batch_size` rows of `order`, each cut into micro-batches.

    The last step may be short (the last rows of the epoch), as with a PyTorch DataLoader that keeps its last
    batch; its loss is still the mean over its own rows.

    Returns:
      A list (one per optimizer step) of lists of row-index arrays (one per micro-batch).
    """
    steps = []
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        steps.append([rows[m : m + micro_batch_size] for m in range(0, len(rows), micro_batch_size)])
    return steps


def bucket_length(longest: int, bucket: int, limit: int) -> int:
    """`longest` rounded up to a multiple of `bucket`, but never past `limit` (the padded array's T)."""
    return min(-(-longest // bucket) * bucket, limit)


def _padding_side(mask: np.ndarray) -> str:
    """'right' if every row starts with a real token, 'left' if every row ends with one."""
    if mask.shape[1] == 0 or bool(np.all(mask[:, 0] == 1)):
        return "right"
    if bool(np.all(mask[:, -1] == 1)):
        return "left"
    raise DataError("a batch must be padded on one side only (right or left)")


def _fields(batch: Any) -> dict[str, np.ndarray]:
    """The array fields of a PairBatch / ExgrmBatch as host numpy arrays (static fields stripped)."""
    out = {"tokens": np.asarray(batch.tokens), "attention_mask": np.asarray(batch.attention_mask)}
    if getattr(batch, "response_mask", None) is not None:
        out["response_mask"] = np.asarray(batch.response_mask)
    return out


def take_rows(fields: Sequence[Mapping[str, np.ndarray]], rows: np.ndarray, bucket: int) -> list[dict[str, np.ndarray]]:
    """Rows `rows` of each array set, cut to one common bucketed length T (the padding side is kept).

    Args:
      fields: array sets of the same padded length (e.g. chosen and rejected).
      rows: row indices.
      bucket: T is the longest selected sequence rounded up to a multiple of this.

    Returns:
      The selected rows of each set, all with the same T.
    """
    full = fields[0]["tokens"].shape[1]
    sides = [_padding_side(f["attention_mask"]) for f in fields]
    longest = max(int(f["attention_mask"][rows].sum(axis=1).max()) for f in fields)
    T = bucket_length(longest, bucket, full)
    out = []
    for f, side in zip(fields, sides, strict=True):
        cut = slice(0, T) if side == "right" else slice(full - T, full)
        out.append({k: v[rows][:, cut] for k, v in f.items()})
    return out


def _concat(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([a[k], b[k]], axis=0) for k in a}


def response_index(tokens: np.ndarray, response_mask: np.ndarray, bucket: int) -> dict[str, np.ndarray]:
    """Where the IM-RM reads: for each response token y_k at position t ≥ 1, the position t − 1 whose hidden
    state predicts it (docs/math.md §1: softmax(W h_{x,y<k})).

    Only these positions need the unembedding (|y| ≪ T rows of V logits instead of T).

    Returns:
      {"resp_src": int32 [B, R] positions t − 1, "resp_tgt": int32 [B, R] tokens y_k, "resp_valid": float32
      [B, R] 1 on real entries}; R is the longest response rounded up to a multiple of `bucket`.
    """
    B, T = tokens.shape
    counts = (response_mask[:, 1:] > 0).sum(axis=1)
    R = bucket_length(max(int(counts.max()), 1), bucket, max(T - 1, 1))
    src = np.zeros((B, R), np.int32)
    tgt = np.zeros((B, R), np.int32)
    valid = np.zeros((B, R), np.float32)
    for b in range(B):
        ts = np.flatnonzero(response_mask[b, 1:] > 0) + 1
        src[b, : len(ts)] = ts - 1
        tgt[b, : len(ts)] = tokens[b, ts]
        valid[b, : len(ts)] = 1.0
    return {"resp_src": src, "resp_tgt": tgt, "resp_valid": valid}


def _as_batch(fields: Mapping[str, Any]) -> Any:
    if "response_mask" in fields:
        return PairBatch(fields["tokens"], fields["attention_mask"], fields["response_mask"])
    return ExgrmBatch(fields["tokens"], fields["attention_mask"])


# ----------------------------------------------------------------------------------------------------------
# Rewards from hidden states (the fast path; `dynamics.rewards` is the reference the tests compare with)
# ----------------------------------------------------------------------------------------------------------


def frozen_prefix(params: Params, mask: Any, n_layers: int) -> int:
    """How many lower blocks are frozen together with the input embedding (their output never changes).

    Returns:
      0 when the input embedding trains (e.g. `all` on a tied model), else the index of the lowest block with
      a trainable parameter (n_layers when no block trains, e.g. `head`).
    """
    start = n_layers
    for path, selected in zip(leaf_paths(params), jax.tree.leaves(mask), strict=True):
        group, _, rest = path.partition("/")
        if not selected or group != "lm":
            continue
        if rest.startswith("embed/"):
            return 0
        match = re.match(r"layers_(\d+)/", rest)
        if match:
            start = min(start, int(match.group(1)))
    return start


def lower_hidden(lm: LM, lm_params: Params, tokens: Any, mask: Any, stop: int) -> Any:
    """The residual stream after the input embedding and blocks 0 … stop − 1 (`LM.lower`)."""
    return lm.lower(lm_params, tokens, mask, stop)


def upper_hidden(lm: LM, lm_params: Params, x: Any, mask: Any, start: int) -> Any:
    """The final hidden states h from the residual stream after block start − 1 (`LM.upper`).

    upper_hidden(lower_hidden(tokens, k), k) equals `lm.forward(tokens)` for every k.
    """
    return lm.upper(lm_params, x, mask, start)


def _hidden(lm: LM, lm_params: Params, fields: Mapping[str, Any], start: int) -> Any:
    if "pack_tokens" in fields:
        return _packed_hidden(lm, lm_params, fields, start)
    if "x" in fields:  # the frozen lower blocks' output, cached
        return upper_hidden(lm, lm_params, fields["x"], fields["attention_mask"], start)
    return lm.forward(lm_params, fields["tokens"], fields["attention_mask"])


def _packed_hidden(lm: LM, lm_params: Params, fields: Mapping[str, Any], start: int) -> Any:
    """The hidden states [2b, T, D] of b pairs, computed on their packed rows (`dynamics.packing`)."""
    attn = packed_attention_mask(fields["pack_segment"])
    positions, mask = fields["pack_positions"], fields["pack_mask"]
    if "x" in fields:  # the cached residual stream, rearranged into the packed rows
        x = fields["x"]
        flat = jnp.reshape(x, (x.shape[0] * x.shape[1], x.shape[2]))
        h = lm.upper(lm_params, flat[fields["pack_source"]], mask, start, positions=positions, attn_mask=attn)
    else:
        h = lm.forward(lm_params, fields["pack_tokens"], mask, positions=positions, attn_mask=attn)
    b = h.shape[0]
    rows = jnp.arange(2 * b) % b
    return h[rows[:, None], fields["unpack_index"]]


def _response_logprob(lm: LM, lm_params: Params, hidden: Any, fields: Mapping[str, Any]) -> Any:
    """ln π(y|x) = Σ_k ln π(y_k | x, y<k), from the hidden states at the positions of `response_index`."""
    B, R = fields["resp_src"].shape
    h = jnp.take_along_axis(hidden, fields["resp_src"][..., None], axis=1)  # [B, R, D]
    logits = lm.unembed(lm_params, jnp.reshape(h, (B * R, h.shape[-1])))  # [B·R, V]: 2-D throughout
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    target = jnp.take_along_axis(logits, jnp.reshape(fields["resp_tgt"], (B * R, 1)), axis=-1)[:, 0]
    lp = jnp.reshape(target - jax.nn.logsumexp(logits, axis=-1), (B, R))
    return jnp.sum(lp * fields["resp_valid"].astype(lp.dtype), axis=-1)


def _last_state(hidden: Any, mask: Any) -> Any:
    return jnp.take_along_axis(hidden, last_token_index(mask)[:, None, None], axis=1)[:, 0]


def _answer_logprobs(rm: GenerativeRM, lm_params: Params, hidden: Any, mask: Any) -> Any:
    """[ln π("Yes"), ln π("No")] at the last real position (docs/math.md §6.5), [B, 2]."""
    logits = rm.lm.unembed(lm_params, _last_state(hidden, mask))
    lp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
    return jnp.stack([lp[:, rm.yes_id], lp[:, rm.no_id]], axis=-1)


def _ex_reward(rm: ExplicitRM, params: Params, hidden: Any, fields: Mapping[str, Any]) -> Any:
    """⟨u, h⟩ at the last token, or averaged over the response positions (docs/math.md §1, §6.4)."""
    if rm.pooling == "last":
        h = _last_state(hidden, fields["attention_mask"])
    else:
        w = fields["response_mask"].astype(hidden.dtype)
        h = jnp.einsum("BTD,BT->BD", hidden, w) / jnp.sum(w, axis=-1, keepdims=True)
    return jnp.einsum("BD,D->B", h, params["head"]["u"].astype(h.dtype))


def _pair_losses(rm: RewardModel, params: Params, both: Mapping[str, Any], ref: Any, b: int, start: int):
    """Per-row losses ℓ_i and rewards (r+, r−) of b pairs whose chosen rows come first in `both` [2b, T].

    BT (docs/math.md §1): ℓ_i = −ln σ(r(x_i,y_i+) − r(x_i,y_i−)), with r_IM = β (ln π_θ − ln π_ref) and the cached
    ln π_ref. EX-GRM (docs/math.md §6.5): ℓ_i = −½ [ln π(Yes | x_i, y_i+) + ln π(No | x_i, y_i−)], so that the
    batch mean is the official code's mean over the 2b concatenated sequences.
    """
    hidden = _hidden(rm.lm, params["lm"], both, start)
    if isinstance(rm, GenerativeRM):
        lp = _answer_logprobs(rm, params["lm"], hidden, both["attention_mask"])
        rewards = jnp.exp(lp[:, 0])
        return -0.5 * (lp[:b, 0] + lp[b:, 1]), rewards[:b], rewards[b:]
    if isinstance(rm, ImplicitRM):
        rewards = rm.beta * (_response_logprob(rm.lm, params["lm"], hidden, both) - ref)
    else:
        rewards = _ex_reward(rm, params, hidden, both)
    return -jax.nn.log_sigmoid(rewards[:b] - rewards[b:]), rewards[:b], rewards[b:]


class _Compiled:
    """The jitted functions of one (reward model, frozen prefix, optimizer), each with a trace counter.

    Attributes:
      start: blocks below this index are frozen and their output is cached (0: no cache).
    """

    def __init__(self, rm: RewardModel, tx: Any, start: int):
        import optax

        self.rm = rm
        self.tx = tx
        self.start = start
        self.traces: dict[str, int] = {"micro_step": 0, "apply": 0, "score": 0, "logprob": 0, "lower": 0}

        def first_micro_step(train, frozen, both, ref):
            self.traces["micro_step"] += 1
            b = both["tokens"].shape[0] // 2

            def total(t):
                losses, rc, rr = _pair_losses(rm, combine(t, frozen), both, ref, b, start)
                return jnp.sum(losses), (losses, rc, rr)

            (_, (losses, rc, rr)), grads = jax.value_and_grad(total, has_aux=True)(train)
            wins = jnp.sum((rc > rr).astype(jnp.float32)) + 0.5 * jnp.sum((rc == rr).astype(jnp.float32))
            return grads, jnp.sum(losses), wins

        def micro_step(train, frozen, acc, both, ref):
            grads, loss, wins = first_micro_step(train, frozen, both, ref)
            return jax.tree.map(lambda a, g: a + g.astype(a.dtype), acc, grads), loss, wins

        def apply(train, opt_state, acc, n):
            self.traces["apply"] += 1
            grads = jax.tree.map(lambda g: g / n.astype(g.dtype), acc)
            updates, opt_state = tx.update(grads, opt_state, train)
            return optax.apply_updates(train, updates), opt_state, optax.tree.norm(grads)

        def score(params, fields):
            self.traces["score"] += 1
            hidden = _hidden(rm.lm, params["lm"], fields, start)
            if isinstance(rm, GenerativeRM):
                return jnp.exp(_answer_logprobs(rm, params["lm"], hidden, fields["attention_mask"])[:, 0])
            return _ex_reward(rm, params, hidden, fields)

        def logprob(lm_params, fields):
            self.traces["logprob"] += 1
            return _response_logprob(rm.lm, lm_params, _hidden(rm.lm, lm_params, fields, start), fields)

        def lower(lm_params, tokens, mask):
            self.traces["lower"] += 1
            return lower_hidden(rm.lm, lm_params, tokens, mask, start)

        self.first_micro_step = jax.jit(first_micro_step)
        self.micro_step = jax.jit(micro_step, donate_argnums=(2,))
        # donating the parameters and the optimizer state lets XLA update them in place: on CPU,
        # allocating fresh outputs for a 135M-parameter Adam step costs several times the arithmetic
        self.apply = jax.jit(apply, donate_argnums=(0, 1))
        self.score = jax.jit(score)
        self.logprob = jax.jit(logprob)
        self.lower = jax.jit(lower)

    def prepare(self, fields: Mapping[str, np.ndarray], rows: np.ndarray, bucket: int) -> dict[str, np.ndarray]:
        """Rows of one sequence set cut to their bucketed length, with IM-RM response positions added."""
        out = take_rows([fields], rows, bucket)[0]
        if isinstance(self.rm, ImplicitRM):
            out.update(response_index(out["tokens"], out["response_mask"], bucket))
        return out


@functools.lru_cache(maxsize=16)
def _compiled_for(rm: RewardModel, start: int, optimizer: tuple[Any, ...]) -> _Compiled:
    """The jitted functions of a reward model and optimizer, shared by the runs of one process."""
    config = TrainConfig(**dict(optimizer))
    return _Compiled(rm, make_optimizer(config), start)


def _optimizer_key(config: TrainConfig) -> tuple[Any, ...]:
    fields = ("optimizer", "lr", "b1", "b2", "eps", "weight_decay")
    return tuple((f, getattr(config, f)) for f in fields)


def _n_devices(mesh: Any) -> int:
    """Devices along the mesh's "data" axis (1 without a mesh)."""
    if mesh is None:
        return 1
    from dynamics.sharding import AXIS

    return int(mesh.shape[AXIS])


def _eval_chunk(config: TrainConfig, mesh: Any = None) -> int:
    """Rows per evaluation / precompute chunk: `eval_batch_size`, rounded up to a multiple of the mesh's devices."""
    n = _n_devices(mesh)
    return -(-config.eval_batch_size // n) * n


def _on_mesh(tree: Any, mesh: Any) -> Any:
    """One micro-batch or chunk (arrays with rows first) as the jitted functions take it.

    Without a mesh: unchanged (host arrays). On a mesh: split along the rows over its devices, or replicated
    when the rows do not divide (only the short last micro-batch of an epoch can be such).
    """
    if mesh is None:
        return tree
    from dynamics.sharding import replicate, shard_batch

    n = _n_devices(mesh)
    rows = [np.shape(leaf)[0] for leaf in jax.tree.leaves(tree)]  # b (packed) or 2b rows
    return shard_batch(tree, mesh) if all(r % n == 0 for r in rows) else replicate(tree, mesh)


def _chunks(n: int, size: int) -> list[tuple[np.ndarray, int]]:
    """Row chunks of exactly `size` rows (the last one padded by repeating its last row) and their real counts.

    One row count for every chunk means one compiled program per sequence-length bucket.
    """
    out = []
    for start in range(0, n, size):
        idx = np.arange(start, min(start + size, n))
        out.append((np.pad(idx, (0, size - len(idx)), mode="edge"), len(idx)))
    return out


def _add_lower_cache(
    compiled: _Compiled,
    lm_params: Params,
    fields: dict[str, np.ndarray],
    chunk: int,
    bucket: int,
    mesh: Any = None,
    bar: Any = None,
):
    """Adds "x" [n, T, D]: the residual stream after the frozen blocks 0 … start − 1, computed once per row.

    `bar` (a tqdm bar, or None) advances by the rows of each chunk."""
    tokens, mask = fields["tokens"], fields["attention_mask"]
    n, full = tokens.shape
    side = _padding_side(mask)
    x = None
    for idx, k in _chunks(n, chunk):
        part = take_rows([{"tokens": tokens, "attention_mask": mask}], idx, bucket)[0]
        out = np.asarray(compiled.lower(lm_params, *_on_mesh((part["tokens"], part["attention_mask"]), mesh)))
        idx, out = idx[:k], out[:k]
        if x is None:
            x = np.zeros((n, full, out.shape[-1]), out.dtype)
        T = out.shape[1]
        x[idx, :T] = out if side == "right" else 0
        if side == "left":
            x[idx, full - T :] = out
        if bar is not None:
            bar.update(k)
    fields["x"] = x


def _logprobs(
    compiled: _Compiled,
    lm_params: Params | None,
    fields: Mapping[str, np.ndarray],
    config,
    mesh: Any = None,
    bar: Any = None,
) -> np.ndarray:
    """ln π(y|x) of every row under `lm_params`, float64 [n], in evaluation-sized chunks (0 when None).

    The IM-RM's reference log-probs and its evaluation log-probs go through this same function, chunks and
    shapes (and, on a mesh, placements), so that at initialization r = β (ln π_θ − ln π_ref) is exactly 0 on
    every row.
    """
    n = fields["tokens"].shape[0]
    if lm_params is None:
        if bar is not None:
            bar.update(n)
        return np.zeros(n, np.float64)
    out = []
    for idx, k in _chunks(n, _eval_chunk(config, mesh)):
        out.append(
            np.asarray(compiled.logprob(lm_params, _on_mesh(compiled.prepare(fields, idx, config.bucket), mesh)))[:k]
        )
        if bar is not None:
            bar.update(k)
    return np.concatenate(out).astype(np.float64)


def _score_set(
    compiled: _Compiled, params: Params, fields, ref: np.ndarray | None, config, mesh: Any = None, bar: Any = None
) -> np.ndarray:
    """The reward of every row of one sequence set, float64 [n] (`bar`: a tqdm bar advanced per chunk, or None)."""
    if isinstance(compiled.rm, ImplicitRM):
        lp = _logprobs(compiled, params["lm"], fields, config, mesh, bar)
        return compiled.rm.beta * (lp - ref)
    out = []
    for idx, k in _chunks(fields["tokens"].shape[0], _eval_chunk(config, mesh)):
        out.append(np.asarray(compiled.score(params, _on_mesh(compiled.prepare(fields, idx, config.bucket), mesh)))[:k])
        if bar is not None:
            bar.update(k)
    return np.concatenate(out).astype(np.float64)


def _bt_loss(r_chosen: np.ndarray, r_rejected: np.ndarray) -> float:
    """−mean ln σ(r+ − r−), in float64 (the evaluation loss of every reward type, as the official code logs)."""
    return float(np.mean(np.logaddexp(0.0, -(r_chosen - r_rejected))))


def _metric_dict(m: PreferenceMetrics, loss: float, prefix: str) -> dict[str, float]:
    out = m.as_trl_dict(prefix)
    out[prefix + "loss"] = loss
    return out


def evaluate_rewards(rewards: Mapping[str, np.ndarray], suite: EvalSuite, tie_tol: float = 0.0) -> dict[str, float]:
    """Metrics of every comparison and average of `suite`, from the rewards of its sequence sets.

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
        per[name] = _metric_dict(m, _bt_loss(rewards[a], rewards[b]), "")
        out.update({f"{name}/{k}": v for k, v in per[name].items()})
    for name, members in suite.averages.items():
        for k in per[members[0]]:
            out[f"{name}/{k}"] = float(np.mean([per[m][k] for m in members]))
    for name, r in rewards.items():
        out[f"reward_mean/{name}"] = float(np.mean(r))
    return out


def evaluate(
    compiled: _Compiled,
    params: Params,
    suite: EvalSuite,
    fields: Mapping[str, Mapping[str, np.ndarray]],
    ref_cache: Mapping[str, np.ndarray | None],
    config: TrainConfig,
    mesh: Any = None,
    bar: Any = None,
) -> dict[str, float]:
    """Scores every sequence set of `suite` and returns `evaluate_rewards`' metrics.

    Args:
      compiled: the run's jitted functions.
      params: the reward model's parameters.
      suite: what to evaluate.
      fields: the arrays of each sequence set (with the frozen-block cache "x" where used).
      ref_cache: ln π_ref of each set's rows (IM-RM), else None.
      config: the run's options (chunk size, bucket, tie tolerance).
      mesh: the device mesh the parameters are placed on (`train`'s), else None; each chunk is split over it.
      bar: a tqdm bar advanced by the rows of each scored chunk, or None.
    """
    rewards = {
        name: _score_set(compiled, params, fields[name], ref_cache.get(name), config, mesh, bar)
        for name in suite.sequences
    }
    return evaluate_rewards(rewards, suite, config.tie_tol)


# ----------------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """What a callback sees after each optimizer step (all numbers already logged).

    Attributes:
      step: optimizer steps done.
      epoch: index of the epoch the step belongs to.
      loss: the step's batch-mean training loss (before the update).
      accuracy: the step's training accuracy (ties ½, before the update).
      eval: the evaluation made at this step, if any.
    """

    step: int
    epoch: int
    loss: float
    accuracy: float
    eval: Mapping[str, float] | None


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """The outcome of `train`.

    Attributes:
      config: the training configuration.
      run_dir: where the files are (None when nothing was written).
      steps: optimizer steps done.
      epochs: epochs done (fractional when stopped by max_steps).
      final_eval: the last evaluation's metrics (`evaluate_rewards` names).
      history: every line of the metrics log, in order (train and eval events).
      resumed_from_step: the checkpoint step this process started from (None: a fresh run).
      n_trainable: number of trained scalars.
      timing: seconds spent and trace counts (never part of the metrics; not reproducible).
      params: the final parameters (not serialized).
    """

    config: TrainConfig
    run_dir: str | None
    steps: int
    epochs: float
    final_eval: Mapping[str, float]
    history: tuple[Mapping[str, Any], ...]
    resumed_from_step: int | None
    n_trainable: int
    timing: Mapping[str, Any]
    params: Any = dataclasses.field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (without the parameters and the history, which metrics.jsonl holds)."""
        return {
            "config": self.config.to_dict(),
            "run_dir": self.run_dir,
            "steps": self.steps,
            "epochs": self.epochs,
            "final_eval": dict(self.final_eval),
            "resumed_from_step": self.resumed_from_step,
            "n_trainable": self.n_trainable,
            "timing": dict(self.timing),
        }

    def to_json(self) -> str:
        return json.dumps(_jsonable(self.to_dict()), indent=1, allow_nan=False)


# ----------------------------------------------------------------------------------------------------------
# Files: atomic writes, checkpoints
# ----------------------------------------------------------------------------------------------------------


def _key_str(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _flat(tree: Any) -> dict[str, Any]:
    return {"/".join(_key_str(k) for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _unflat(template: Any, arrays: Mapping[str, np.ndarray], where: str) -> Any:
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    leaves = []
    for path, leaf in paths:
        key = "/".join(_key_str(k) for k in path)
        if key not in arrays:
            raise ConfigError(f"{where}: the checkpoint lacks {key!r} (was it written with another mask or model?)")
        value = arrays[key]
        if value.shape != np.shape(leaf) and value.size == np.size(leaf) == 1:
            value = value.reshape(np.shape(leaf))  # safetensors stores 0-d arrays as [1]
        if value.shape != np.shape(leaf) or value.dtype != np.asarray(leaf).dtype:
            raise ConfigError(
                f"{where}: {key!r} is {value.dtype}{list(value.shape)} in the checkpoint but "
                f"{np.asarray(leaf).dtype}{list(np.shape(leaf))} here"
            )
        leaves.append(jnp.asarray(value))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _tree_sha256(tree: Any) -> str:
    h = hashlib.sha256()
    for key, leaf in sorted(_flat(tree).items()):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{key}:{a.dtype}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def _fields_sha256(fields: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(fields):
        a = np.ascontiguousarray(fields[k])
        h.update(f"{k}:{a.dtype}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def save_checkpoint(run_dir: Path, state: Mapping[str, Any], meta: Mapping[str, Any], keep: int) -> Path:
    """Writes checkpoints/step_XXXXXXXX/{state.safetensors, meta.json}, then points latest.json at it.

    The step directory is written under a temporary name and renamed, and latest.json is replaced atomically,
    so a kill at any moment leaves the previous checkpoint usable.
    """
    from safetensors.numpy import save_file

    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{int(meta['step']):08d}"
    final = root / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        os.chmod(tmp, permissions(0o777))
        save_file(
            {k: np.ascontiguousarray(np.asarray(v)) for k, v in _flat(state).items()}, str(tmp / "state.safetensors")
        )
        write_json_atomic(tmp / "meta.json", meta)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_json_atomic(root / "latest.json", {"checkpoint": name, "step": int(meta["step"])})
    for old in sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))[:-keep]:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def load_checkpoint(run_dir: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """(arrays, meta) of the checkpoint latest.json points at, or None when the run has none."""
    from safetensors.numpy import load_file

    latest = run_dir / "checkpoints" / "latest.json"
    if not latest.exists():
        return None
    hint = "the checkpoint is damaged: delete the run directory's checkpoints/ to start over, or use another run_dir"
    try:
        name = json.loads(latest.read_text())["checkpoint"]
        if not isinstance(name, str) or not re.fullmatch(r"step_\d{8}", name):
            raise ValueError(f"'checkpoint' is {name!r}, not step_XXXXXXXX")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{latest}: cannot read the latest checkpoint's name ({err}); {hint}") from err
    folder = run_dir / "checkpoints" / name
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if not isinstance(meta, dict):
            raise ValueError(f"a JSON {type(meta).__name__}, not an object")
    except (OSError, ValueError) as err:
        raise ConfigError(f"{folder / 'meta.json'}: unreadable checkpoint metadata ({err}); {hint}") from err
    if meta.get("format") != _CHECKPOINT_FORMAT:
        raise ConfigError(f"{folder}: checkpoint format {meta.get('format')} is not {_CHECKPOINT_FORMAT}")
    missing = [k for k in ("step", "epoch", "step_in_epoch", "last_eval_step", "log_lines") if k not in meta]
    if missing:
        raise ConfigError(f"{folder / 'meta.json'}: checkpoint metadata lacks {missing}; {hint}")
    try:
        arrays = load_file(str(folder / "state.safetensors"))
    except Exception as err:  # safetensors raises its own SafetensorError (and OSError for a missing file)
        raise ConfigError(f"{folder / 'state.safetensors'}: unreadable checkpoint state ({err}); {hint}") from err
    return arrays, meta


def _truncate_log(path: Path, n_lines: int) -> list[dict[str, Any]]:
    """Keeps the first n_lines lines of the metrics log (rewritten atomically) and returns them parsed."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True) if path.exists() else []
    if len(lines) < n_lines:
        raise ConfigError(f"{path} has {len(lines)} lines but the checkpoint recorded {n_lines}")
    kept = lines[:n_lines]
    atomic_write_text(path, "".join(kept))
    return [json.loads(line) for line in kept]


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------


def _check_train_data(data: PreferenceBatch, kind: str) -> dict[str, dict[str, np.ndarray]]:
    chosen, rejected = _fields(data.chosen), _fields(data.rejected)
    n = chosen["tokens"].shape[0]
    if n == 0:
        raise DataError("the training set has no rows")
    if rejected["tokens"].shape != chosen["tokens"].shape:
        raise DataError(
            f"training chosen and rejected arrays differ in shape: {chosen['tokens'].shape} vs "
            f"{rejected['tokens'].shape}"
        )
    needs_response = kind != "exgrm"
    if needs_response != ("response_mask" in chosen):
        what = "PairBatch (with response_mask)" if needs_response else "ExgrmBatch"
        raise DataError(f"reward {kind!r} trains on {what} sequences")
    return {"chosen": chosen, "rejected": rejected}


def _check_resume(run_dir: Path, record: Mapping[str, Any]) -> None:
    """A resumed run must have the same configuration, model, mask and data (RESUMABLE_CHANGES aside)."""
    path = run_dir / "config.json"
    if not path.exists():
        return
    saved = json.loads(path.read_text())
    diffs = []
    for section in ("model", "mask", "data", "reward_model"):
        if _jsonable(saved.get(section)) != _jsonable(record.get(section)):
            diffs.append(section)
    if "initial_params_sha256" in saved and saved["initial_params_sha256"] != record["initial_params_sha256"]:
        diffs.append("initial_params_sha256 (the initial weights or EX-RM head)")
    old, new = saved.get("train", {}), record["train"]
    diffs += [
        f"train.{k}" for k in sorted(set(old) | set(new)) if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k)
    ]
    if diffs:
        raise ConfigError(
            f"{run_dir}: cannot resume: {', '.join(diffs)} differ from the run's config.json (only "
            f"{', '.join(RESUMABLE_CHANGES)} may change); use another output directory"
        )


# the sections of config.json a checkpoint records a fingerprint of (meta.json "record"), checked on resume
_FINGERPRINTED = ("model", "mask", "data", "reward_model", "initial_params_sha256")


def _record_fingerprint(record: Mapping[str, Any]) -> dict[str, str]:
    """sha256 (16 hex digits) of each `_FINGERPRINTED` section of the run's record."""
    out = {}
    for key in _FINGERPRINTED:
        text = json.dumps(_jsonable(record.get(key)), sort_keys=True, default=str)
        out[key] = hashlib.sha256(text.encode()).hexdigest()[:16]
    return out


def _check_checkpoint_config(
    meta: Mapping[str, Any], config: TrainConfig, record: Mapping[str, Any], where: str
) -> None:
    """The checkpoint's own record must agree with this run: its TrainConfig (RESUMABLE_CHANGES aside) and the
    fingerprints of the model, mask, data, reward model and initial parameters (checkpoints that have them).

    config.json is checked first (`_check_resume`); this catches a checkpoint that does not belong to the run
    directory's config.json (copied from another run, or config.json missing).
    """
    fingerprint = meta.get("record")
    if isinstance(fingerprint, Mapping):
        ours = _record_fingerprint(record)
        sections = [k for k in _FINGERPRINTED if k in fingerprint and fingerprint[k] != ours[k]]
        if sections:
            raise ConfigError(
                f"{where}: cannot resume: the checkpoint belongs to a run with another {', '.join(sections)}; use "
                "another output directory"
            )
    saved = meta.get("config")
    if not isinstance(saved, Mapping):
        raise ConfigError(f"{where}: the checkpoint's meta.json has no config: cannot tell whether it is this run's")
    new = config.to_dict()
    diffs = [
        f"train.{k}"
        for k in sorted(set(saved) | set(new))
        if k not in RESUMABLE_CHANGES and _jsonable(saved.get(k)) != _jsonable(new.get(k))
    ]
    if diffs:
        raise ConfigError(
            f"{where}: cannot resume: the checkpoint was written with other options ({', '.join(diffs)}; only "
            f"{', '.join(RESUMABLE_CHANGES)} may change); use another output directory"
        )


def train(
    config: TrainConfig,
    lm: LM,
    lm_params: Params,
    train_data: PreferenceBatch,
    eval_suite: EvalSuite | None = None,
    *,
    run_dir: str | os.PathLike | None = None,
    resume: bool = False,
    answer_ids: tuple[int, int] | None = None,
    model_info: Mapping[str, Any] | None = None,
    data_info: Mapping[str, Any] | None = None,
    callbacks: Sequence[Callable[[StepInfo], None]] = (),
    progress: bool = True,
    mesh: Any = None,
    final_metrics: Callable[[Any], Mapping[str, float]] | None = None,
) -> TrainResult:
    """Trains a reward model (docs/math.md §6, common training protocol) and evaluates it along the way.

    Every input is checked before the first step (and before anything is written). Evaluations happen at step 0
    (if `eval_at_start`), at the end of every `eval_every_epochs`-th epoch, every `eval_every_steps` steps, and
    at the last step; each is one "eval" line of metrics.jsonl (`evaluate_rewards` names).

    Args:
      config: the options.
      lm: the language model.
      lm_params: its initial parameters (π_ref for an IM-RM).
      train_data: the training triples; `chosen`/`rejected` are `PairBatch` (EX-RM, IM-RM) or `ExgrmBatch`
        (EX-GRM) with the same padded shape.
      eval_suite: what to evaluate (None: nothing; use `EvalSuite.from_preferences` for plain sets).
      run_dir: where to write config.json, metrics.jsonl, summary.json and checkpoints (None: write nothing).
      resume: continue from the run directory's latest checkpoint (a fresh start if it has none).
      answer_ids: (yes_id, no_id) for EX-GRM.
      model_info: the model's description (`Loaded.describe()`), recorded in config.json.
      data_info: how the data was built (experiment options), recorded in config.json.
      callbacks: called with a `StepInfo` after each optimizer step (after its logging, evaluation and
        checkpoint); an exception they raise stops training (KeyboardInterrupt first saves a checkpoint).
      progress: show a tqdm progress bar with the loss and accuracy.
      mesh: a `jax.sharding.Mesh` with a "data" axis (`dynamics.sharding.make_mesh`) to train on several devices
        (None: one device, as without sharding). The trainable and frozen parameters and the optimizer state
        are placed by `config.param_sharding` (replicated, or FSDP: each matrix split along its largest axis the
        device count divides; optimizer-state leaves that mirror a parameter get its layout, scalars are
        replicated); every micro-batch and evaluation chunk is split along its rows. The jitted functions are
        the same: GSPMD propagates the shardings, so the numbers equal a one-device run's up to float rounding.
        `micro_batch_size` must be a multiple of the device count; evaluation chunks are `eval_batch_size`
        rounded up to one.
      final_metrics: called once, after the final evaluation, with the final reward-model parameters (what
        `TrainResult.params` holds); the name → finite float metrics it returns are added to `final_eval` (and
        so to summary.json), also on a resumed run that finishes. A name the evaluation already has, a value
        that is not a real number, or a non-finite value is an error.

    Returns:
      A `TrainResult`.

    Raises:
      DataError: empty training data, an empty or malformed evaluation set.
      ConfigError: bad options, a run directory that already holds a run (without `resume`), a resumed
        run whose configuration differs, a mesh without a "data" axis or whose device count does not
        divide `micro_batch_size`, or `final_metrics` returning something other than a mapping of new names
        to real numbers.
      DataError: `final_metrics` returning a non-finite value.
    """
    t_start = time.perf_counter()
    suite = eval_suite if eval_suite is not None else EvalSuite({}, {})
    data = _check_train_data(train_data, config.reward)
    suite.validate()
    for name, batch in suite.sequences.items():
        if (config.reward == "exgrm") == ("response_mask" in _fields(batch)):
            raise DataError(f"evaluation set {name!r}: wrong sequence type for reward {config.reward!r}")
    run_path = Path(run_dir) if run_dir is not None else None
    if resume and run_path is None:
        raise ConfigError("resume=True needs a run_dir")
    if run_path is not None and not resume and (run_path / "config.json").exists():
        raise ConfigError(f"{run_path} already holds a run (config.json); pass resume=True or use another directory")
    if mesh is not None:
        from dynamics.sharding import AXIS, shard_params

        if AXIS not in mesh.axis_names:
            raise ConfigError(f"the mesh needs a {AXIS!r} axis (dynamics.sharding.make_mesh); it has {mesh.axis_names}")
        if config.micro_batch_size % _n_devices(mesh):
            raise ConfigError(
                f"micro_batch_size={config.micro_batch_size} cannot be split over the mesh's {_n_devices(mesh)} "
                f"devices: use a multiple of {_n_devices(mesh)} (each device takes micro_batch_size / devices pairs)"
            )
    n_devices = _n_devices(mesh)

    def place(tree: Any) -> Any:
        """Parameters (and optimizer state) as they live during the run: on the mesh by param_sharding, if any."""
        return tree if mesh is None else shard_params(tree, mesh, config.param_sharding)

    import optax  # noqa: F401  (fail early if missing)

    rm, params, spec = build_reward_model(config, lm, lm_params, answer_ids=answer_ids)
    mask = trainable_mask(rm, params, spec)
    train_tree, frozen = partition(params, mask)
    ref_params = params.get("ref") if isinstance(rm, ImplicitRM) and not rm.reference_free else None
    # The step never reads π_ref (its log-probs are cached): keep it out of the traced trees.
    train_tree = {k: v for k, v in train_tree.items() if k != "ref"}
    # a private copy: the update donates (reuses) these buffers, and π_ref, the caller's params and `frozen` may
    # share them (the IM-RM's reference is the initial model, the same arrays)
    train_tree = place(jax.tree.map(jnp.copy, train_tree))
    frozen = place({k: v for k, v in frozen.items() if k != "ref"})
    eval_fields = {name: _fields(batch) for name, batch in suite.sequences.items()}
    start = frozen_prefix(params, mask, rm.lm.config.n_layers) if config.cache_frozen_blocks else 0
    cache_bytes = sum(
        f["tokens"].size * rm.lm.config.d_model * np.dtype(params["lm"]["final_norm"]["scale"].dtype).itemsize
        for f in [*data.values(), *eval_fields.values()]
    )
    if cache_bytes > config.cache_max_gb * 2**30:
        start = 0
    compiled = _compiled_for(rm, start, _optimizer_key(config))
    tx = compiled.tx
    traces_before = dict(compiled.traces)

    n = data["chosen"]["tokens"].shape[0]
    steps_per_epoch = math.ceil(n / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)

    record = {
        "train": config.to_dict(),
        "reward_model": {"kind": config.reward, "class": type(rm).__name__, **_rm_options(rm)},
        "model": dict(model_info) if model_info is not None else {"config": dataclasses.asdict(lm.config)},
        "mask": {
            "spec": spec,
            "n_trainable": count_selected(params, mask),
            "n_total": int(sum(np.size(x) for k, x in _flat(params).items() if not k.startswith("ref/"))),
            "trainable": [p for p, m in zip(leaf_paths(params), jax.tree.leaves(mask), strict=True) if m],
            "untied": not rm.lm.config.tie_embeddings and lm.config.tie_embeddings,
        },
        "data": {
            "info": dict(data_info) if data_info is not None else None,
            "n_train": n,
            "train_sha256": {side: _fields_sha256(f) for side, f in data.items()},
            "eval_sets": {
                k: {"rows": _rows(v), "sha256": _fields_sha256(_fields(v))} for k, v in suite.sequences.items()
            },
            "comparisons": {k: list(v) for k, v in suite.comparisons.items()},
            "averages": {k: list(v) for k, v in suite.averages.items()},
        },
        "initial_params_sha256": _tree_sha256({k: v for k, v in params.items() if k != "ref"}),
        "steps_per_epoch": steps_per_epoch,
        "mesh": {
            "devices": n_devices,
            "param_sharding": None if mesh is None else config.param_sharding,
            "eval_chunk": _eval_chunk(config, mesh),
        },
        "versions": _versions(),
    }

    # State: everything a checkpoint restores.
    opt_state = place(tx.init(train_tree))
    step, epoch, step_in_epoch, last_eval_step, last_ckpt_step = 0, 0, 0, -1, -1
    history: list[dict[str, Any]] = []
    resumed_from = None
    log_path = run_path / "metrics.jsonl" if run_path is not None else None
    if run_path is not None:
        if resume:
            _check_resume(run_path, record)
        loaded = load_checkpoint(run_path) if resume else None
        if loaded is not None:
            arrays, meta = loaded
            where = f"{run_path}/checkpoints/step_{meta['step']:08d}"
            _check_checkpoint_config(meta, config, record, where)
            restored = _unflat({"params": train_tree, "opt_state": opt_state}, arrays, where)
            train_tree, opt_state = place(restored["params"]), place(restored["opt_state"])
            step, epoch, step_in_epoch = meta["step"], meta["epoch"], meta["step_in_epoch"]
            last_eval_step, last_ckpt_step = meta["last_eval_step"], meta["step"]
            history = _truncate_log(log_path, meta["log_lines"])
            resumed_from = step
        elif log_path.exists():
            log_path.unlink()
        if (run_path / "summary.json").exists() and loaded is None:
            (run_path / "summary.json").unlink()
        write_json_atomic(run_path / "config.json", record)

    t_pre = time.perf_counter()
    if start > 0:  # blocks below `start` never change: run them once per row
        sets = [*data.values(), *eval_fields.values()]
        bar = _stage_bar(progress, f"caching frozen blocks 0-{start - 1}", sum(f["tokens"].shape[0] for f in sets))
        for f in sets:
            _add_lower_cache(compiled, frozen["lm"], f, _eval_chunk(config, mesh), config.bucket, mesh, bar)
        bar.close()
    ref_train: dict[str, np.ndarray | None] = {"chosen": None, "rejected": None}
    ref_eval: dict[str, np.ndarray | None] = {}
    if isinstance(rm, ImplicitRM):
        # on a mesh π_ref is placed as π_θ is, so that both go through the same program (r = 0 at the start)
        ref_on = place(ref_params) if ref_params is not None else None
        # the training step subtracts the cache from log-probs it computes in this dtype (float32, or float64 in
        # a float64 run): a float32 cache would round ln π_ref by ~1e-6 nats in a float64 run
        lp_dtype = np.dtype(jnp.promote_types(params["lm"]["final_norm"]["scale"].dtype, jnp.float32))
        n_ref = sum(f["tokens"].shape[0] for f in [*data.values(), *eval_fields.values()])
        bar = _stage_bar(progress, "reference log-probs ln π_ref", n_ref)
        ref_train = {
            side: _logprobs(compiled, ref_on, f, config, mesh, bar).astype(lp_dtype) for side, f in data.items()
        }
        ref_eval = {name: _logprobs(compiled, ref_on, f, config, mesh, bar) for name, f in eval_fields.items()}
        bar.close()
        del ref_on
    t_pre = time.perf_counter() - t_pre

    def log(entry: dict[str, Any]) -> None:
        history.append(entry)
        if log_path is not None:
            with open(log_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(_jsonable(entry), allow_nan=False) + "\n")

    def checkpoint() -> None:
        nonlocal last_ckpt_step
        if run_path is None or last_ckpt_step == step:
            return
        meta = {
            "format": _CHECKPOINT_FORMAT,
            "step": step,
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "last_eval_step": last_eval_step,
            "log_lines": len(history),
            "rng": {"kind": "numpy PCG64(SeedSequence([seed, epoch]))", "seed": config.seed, "epoch": epoch},
            "data_order": epoch_order(config.seed, epoch, n).tolist(),
            "config": config.to_dict(),
            "record": _record_fingerprint(record),
        }
        save_checkpoint(run_path, {"params": train_tree, "opt_state": opt_state}, meta, config.keep_checkpoints)
        last_ckpt_step = step

    def full_params():
        return combine(train_tree, frozen)

    def eval_due() -> bool:
        return (
            (step == 0 and config.eval_at_start)
            or (
                step > 0
                and config.eval_every_epochs > 0
                and step_in_epoch == steps_per_epoch
                and (epoch + 1) % config.eval_every_epochs == 0
            )
            or (step > 0 and config.eval_every_steps > 0 and step % config.eval_every_steps == 0)
            or step == total_steps
        )

    def checkpoint_due() -> bool:
        if step == 0:
            return False
        if config.checkpoint_every_steps:
            return step % config.checkpoint_every_steps == 0 or step == total_steps
        return step_in_epoch == steps_per_epoch or step == total_steps

    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=min(step, total_steps), desc="train", disable=not progress, leave=True)
    t_steps, t_eval, n_steps_here, n_packed, n_passes = 0.0, 0.0, 0, 0, 0
    last: dict[str, Any] = {}
    plan: list[list[np.ndarray]] = []
    plan_epoch = -1
    try:
        just_stepped = False
        while True:
            evaluation = None
            if suite.comparisons and eval_due() and last_eval_step != step:
                t0 = time.perf_counter()
                n_eval = sum(f["tokens"].shape[0] for f in eval_fields.values())
                desc = "initial evaluation" if step == 0 else f"evaluation at step {step}"
                eval_bar = _stage_bar(progress, desc, n_eval, leave=False)
                evaluation = evaluate(compiled, full_params(), suite, eval_fields, ref_eval, config, mesh, eval_bar)
                eval_bar.close()
                t_eval += time.perf_counter() - t0
                with _deferred_interrupt():  # the log line and the state that records it change together
                    epochs_done = _epochs_done(step, epoch, step_in_epoch, steps_per_epoch)
                    log({"event": "eval", "step": step, "epoch": epochs_done, **evaluation})
                    last_eval_step = step
                if progress:
                    bar.write(_eval_line(step, evaluation, suite))
            if checkpoint_due():
                checkpoint()
            if just_stepped:
                info = StepInfo(step, epoch, last["loss"], last["accuracy"], evaluation)
                for callback in callbacks:
                    callback(info)
                just_stepped = False
            if step >= total_steps:
                break
            if step_in_epoch == steps_per_epoch:
                epoch, step_in_epoch = epoch + 1, 0
            if plan_epoch != epoch:
                plan = batch_plan(epoch_order(config.seed, epoch, n), config.batch_size, config.micro_batch_size)
                plan_epoch = epoch
            t0 = time.perf_counter()
            micro_batches = plan[step_in_epoch]
            acc, stats, counts = _accumulate(compiled, train_tree, frozen, micro_batches, data, ref_train, config, mesh)
            n_packed, n_passes = n_packed + counts["packed_micro_batches"], n_passes + counts["passes"]
            # the update consumes (donates) the old parameters and optimizer state: a Ctrl-C between the update
            # and the assignment would leave nothing valid to checkpoint, so it waits until both are done
            with _deferred_interrupt():
                train_tree, opt_state, gnorm = compiled.apply(
                    train_tree, opt_state, acc, jnp.asarray(stats["rows"], jnp.float32)
                )
                stats["grad_norm"] = float(gnorm)
                step, step_in_epoch = step + 1, step_in_epoch + 1
                last = stats
                if step % config.log_every_steps == 0 or step == total_steps:
                    epochs_done = _epochs_done(step, epoch, step_in_epoch, steps_per_epoch)
                    log({"event": "train", "step": step, "epoch": epochs_done, **stats})
            t_steps += time.perf_counter() - t0
            n_steps_here += 1
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.4f}", acc=f"{stats['accuracy']:.3f}", refresh=False)
            just_stepped = True
    except KeyboardInterrupt:
        checkpoint()
        bar.close()
        raise
    bar.close()

    final_eval = next((h for h in reversed(history) if h["event"] == "eval"), {})
    final_eval = {k: v for k, v in final_eval.items() if k not in ("event", "step", "epoch")}
    final_params = full_params()
    if final_metrics is not None:
        final_eval.update(_checked_final_metrics(final_metrics(final_params), final_eval))
    timing = {
        "total_s": time.perf_counter() - t_start,
        "precompute_s": t_pre,
        "train_steps_s": t_steps,
        "steps_this_process": n_steps_here,
        "mean_step_s": t_steps / n_steps_here if n_steps_here else None,
        "eval_s": t_eval,
        "traces": {k: v - traces_before[k] for k, v in compiled.traces.items()},
        "frozen_blocks_cached": start,
        "packed_micro_batches": n_packed,
        "passes": n_passes,
        "pass_positions": pass_limit(config),
        "devices": n_devices,
    }
    result = TrainResult(
        config=config,
        run_dir=str(run_path) if run_path is not None else None,
        steps=step,
        epochs=_epochs_done(step, epoch, step_in_epoch, steps_per_epoch),
        final_eval=final_eval,
        history=tuple(history),
        resumed_from_step=resumed_from,
        n_trainable=record["mask"]["n_trainable"],
        timing=timing,
        params=final_params,
    )
    if run_path is not None:
        write_json_atomic(run_path / "summary.json", result.to_dict())
    return result


def _checked_final_metrics(extra: Any, final_eval: Mapping[str, Any]) -> dict[str, float]:
    """The metrics a `final_metrics` hook returned, as floats: a mapping of new names to finite real numbers."""
    if not isinstance(extra, Mapping):
        raise ConfigError(f"final_metrics must return a mapping of name to float, got {type(extra).__name__}")
    out = {}
    for name, value in extra.items():
        if not isinstance(name, str):
            raise ConfigError(f"final_metrics returned the non-string name {name!r}")
        if name in final_eval:
            raise ConfigError(f"final_metrics returned {name!r}, which the final evaluation already has")
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ConfigError(f"final_metrics returned {name}={value!r}: not a real number")
        if not math.isfinite(float(value)):
            raise DataError(f"final_metrics returned {name}={value!r}: not finite")
        out[name] = float(value)
    return out


def _stage_bar(progress: bool, desc: str, total: int, leave: bool = True) -> Any:
    """A tqdm bar on stderr over the sequences of a stage before or between training steps (disabled without
    `progress`): caching the frozen blocks, π_ref's log-probs, an evaluation."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="seq", disable=not progress, leave=leave)


@contextlib.contextmanager
def _deferred_interrupt():
    """Holds back SIGINT (Ctrl-C) inside the block and raises KeyboardInterrupt after it (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def pass_limit(config: TrainConfig, backend: str | None = None) -> int:
    """The most positions per forward/backward pass (0: no limit): `config.pass_positions`, or when None
    `CPU_PASS_POSITIONS` on a CPU backend and no limit on an accelerator (`backend`: jax.default_backend())."""
    if config.pass_positions is not None:
        return config.pass_positions
    return CPU_PASS_POSITIONS if (backend or jax.default_backend()) == "cpu" else 0


def split_passes(rows: np.ndarray, positions: int, limit: int, unit: int = 1) -> list[np.ndarray]:
    """Cuts one micro-batch's rows (pairs) into the fewest consecutive passes of ≤ `limit` positions.

    Args:
      rows: the micro-batch's pair indices, in order.
      positions: positions the whole micro-batch takes in one pass (rows × bucketed length, packed or not).
      limit: the most positions per pass (0: no limit, one pass).
      unit: every pass holds a multiple of this many pairs (the mesh's device count); the micro-batch's size is
        a multiple of it.

    Returns:
      The passes, in order, covering `rows` exactly once: p = ⌈positions / limit⌉ passes (at most one per
      unit of pairs) of near-equal size, so that a micro-batch compiles at most two pass shapes per bucket.
      Positions are assumed proportional to pairs; a pass may exceed `limit` only when one unit of pairs does.
    """
    n_units = len(rows) // unit
    if limit <= 0 or positions <= limit or n_units <= 1 or len(rows) % unit:  # (a short last micro-batch)
        return [np.asarray(rows)]
    p = min(n_units, -(-positions // limit))
    sizes = [(n_units // p + (i < n_units % p)) * unit for i in range(p)]
    cuts = np.cumsum([0] + sizes)
    return [np.asarray(rows[cuts[i] : cuts[i + 1]]) for i in range(p)]


def _micro_fields(compiled, idx, data, ref_train, config):
    """The arrays of one pass over pairs `idx`: chosen rows then rejected rows, cut to their bucketed length,
    with the IM-RM's response positions, the packed rows when packing pays, and the cached ln π_ref [2b]."""
    chosen, rejected = take_rows([data["chosen"], data["rejected"]], idx, config.bucket)
    ref = None
    if ref_train["chosen"] is not None:
        ref = np.concatenate([ref_train["chosen"][idx], ref_train["rejected"][idx]])
    both = _concat(chosen, rejected)
    if isinstance(compiled.rm, ImplicitRM):
        both.update(response_index(both["tokens"], both["response_mask"], config.bucket))
    packed = False
    if config.pack_pairs:
        pack = pack_pairs(chosen, rejected, config.bucket)
        T, T_r = chosen["tokens"].shape[1], rejected["tokens"].shape[1]
        if worth_packing(pack["pack_tokens"].shape[1], T, T_r):
            both.update(pack)
            packed = True
    return both, ref, packed


def _positions(both: Mapping[str, np.ndarray]) -> int:
    """Positions one pass over these arrays runs: the packed rows, else the 2b separate rows."""
    return int(np.prod(both["pack_tokens"].shape if "pack_tokens" in both else both["tokens"].shape))


def _accumulate(compiled, train_tree, frozen, micro_batches, data, ref_train, config, mesh=None):
    """Σ of per-row gradients over the micro-batches of one step, and the step's loss and accuracy.

    Each micro-batch runs as one forward/backward pass, or as several (`split_passes`) when it holds more than
    `pass_limit(config)` positions. The first pass's gradients start the sum (no zero tree is allocated); later
    ones are added in place (the accumulator is donated). On a mesh each pass is split over its devices along
    the rows.

    Returns:
      (summed gradients, {"loss", "accuracy", "rows"}, {"packed_micro_batches", "passes", "packed_passes"}):
      the micro-batches that ran packed (in some pass), the passes, and the passes that ran packed.
    """
    acc = None
    loss_sum, wins, rows = 0.0, 0.0, 0
    counts = {"packed_micro_batches": 0, "passes": 0, "packed_passes": 0}
    limit = pass_limit(config)
    for idx in micro_batches:
        both, ref, packed = _micro_fields(compiled, idx, data, ref_train, config)
        parts = split_passes(idx, _positions(both), limit, _n_devices(mesh))
        passes = (
            [(both, ref, packed)]
            if len(parts) == 1
            else [_micro_fields(compiled, i, data, ref_train, config) for i in parts]
        )
        counts["packed_micro_batches"] += any(p for _, _, p in passes)
        for both, ref, packed in passes:
            both, ref = _on_mesh((both, ref), mesh)
            if acc is None:
                acc, l_sum, w_sum = compiled.first_micro_step(train_tree, frozen, both, ref)
            else:
                acc, l_sum, w_sum = compiled.micro_step(train_tree, frozen, acc, both, ref)
            loss_sum, wins = loss_sum + l_sum, wins + w_sum
            counts["passes"] += 1
            counts["packed_passes"] += packed
        rows += len(idx)
    stats = {"loss": float(loss_sum) / rows, "accuracy": float(wins) / rows, "rows": rows}
    return acc, stats, counts


def _epochs_done(step: int, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> float:
    if step == 0:
        return 0.0
    return epoch + step_in_epoch / steps_per_epoch


def _eval_line(step: int, evaluation: Mapping[str, float], suite: EvalSuite) -> str:
    names = list(suite.averages) + [c for c in suite.comparisons if not any(c in m for m in suite.averages.values())]
    parts = [f"{name} {evaluation[f'{name}/rewards/accuracies']:.3f}" for name in names]
    return f"step {step} eval accuracy: " + ", ".join(parts)


def _rm_options(rm: RewardModel) -> dict[str, Any]:
    if isinstance(rm, ImplicitRM):
        return {"beta": rm.beta, "reference_free": rm.reference_free}
    if isinstance(rm, ExplicitRM):
        return {"pooling": rm.pooling}
    return {"yes_id": rm.yes_id, "no_id": rm.no_id}


def _versions() -> dict[str, str]:
    import flax
    import optax

    return {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__, "numpy": np.__version__}

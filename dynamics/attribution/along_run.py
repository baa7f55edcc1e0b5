"""Attribution along a real training run, from its checkpoints (docs/math.md §10.3; TracIn-style).

A run of `dynamics.training.train` with checkpoints θ_{t_0} = θ_0, θ_{t_1}, …, θ_{t_C} (the last at its final
step) is cut into the intervals [t_c, t_{c+1}); every step s of an interval is linearised at the interval's
checkpoint θ_t = θ_{t_c}, with the batch B_s the trainer took at step s (`training_batches`):

    SGD:   Δq_i(s) ≈ ⟨∇q_i(θ_t), Δθ_s⟩,  Δθ_s = (η/|B_s|) Σ_{j∈B_s} w_j(θ_t) ∇m_j(θ_t)
           C_ij += (η/|B_s|) w_j(θ_t) ⟨∇q_i(θ_t), ∇m_j(θ_t)⟩                       for each j ∈ B_s

    Adam:  g_s = −(1/|B_s|) Σ_{j∈B_s} w_j ∇m_j,  μ ← b1 μ + (1−b1) g_s,  ν ← b2 ν + (1−b2) g_s²,  c ← c + 1,
           D_s = 1 / (√(ν / (1 − b2^c)) + ε),    Δθ_s = −η (μ / (1 − b1^c)) ⊙ D_s  (− η λ θ_t for AdamW)
           C_ij += η (1−b1) / ((1 − b1^c) |B_s|) · w_j ⟨∇q_i ⊙ D_s, ∇m_j⟩                for each j ∈ B_s
           o_i  += −η b1 / (1 − b1^c) · ⟨∇q_i ⊙ D_s, μ_prev⟩ − η λ ⟨∇q_i, θ_t⟩

with w_j = σ(r_j− − r_j+) and q_i an eval margin or reward. C (M × N) holds each training pair's contribution
summed over the run, o (M) what Adam's update carries that is not this step's batch (the momentum of earlier
batches, weight decay). The predicted change is Σ_j C_ij + o_i; the actual one q_i(θ_final) − q_i(θ_0).

Approximations: the first-order expansion of q at θ_t, per step. SGD with a checkpoint at every step is
TracIn exactly (error O(η²) per step); with a checkpoint every k steps all k steps use θ_t's gradients. Adam:
μ, ν, c start from the checkpoint's saved state and are advanced with the batch gradients at θ_t, so with a
checkpoint every step the update direction is exactly the trainer's and only the expansion of q is approximate;
momentum is attributed to no pair (o_i).

θ_0 is rebuilt from the caller's model exactly as the trainer built it, and checked against the run's record
(config.json: reward type, model, initial parameters, training data).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dynamics.attribution.contributions import batch_rewards, eval_values
from dynamics.attribution.evalset import EvalSet
from dynamics.attribution.gradients import gradient_features
from dynamics.attribution.trajectory import training_batches
from dynamics.batches import PreferenceBatch
from dynamics.chunking import chunks, strip
from dynamics.delta import reference_is_policy
from dynamics.errors import ConfigError, DataError
from dynamics.masks import combine, partition, trainable_mask
from dynamics.rewards import GenerativeRM

__all__ = ["RunAttribution", "RunModel", "attribute_run", "checkpoint_plan", "load_run_model", "without_ref"]


@dataclasses.dataclass(frozen=True)
class RunAttribution:
    """Contributions summed along a run, and what really happened (docs/math.md §10.3).

    Attributes:
      contribution: C_ij, [M, N]: training pair j's predicted contribution to Δq_i over the whole run (reward
        units; > 0 pushes q_i up).
      other: o_i, [M]: the predicted change no pair carries (Adam's momentum of earlier batches, weight decay;
        0 for SGD).
      actual_change: q_i(θ_final) − q_i(θ_0), [M].
      checkpoint_steps: t_0 = 0, t_1, …, t_C, [C + 1]: the checkpoints used (t_C the final step).
      eval_value: q_i(θ_{t_c}), [C + 1, M].
      interval_predicted: the predicted Δq_i of each interval [t_c, t_{c+1}), [C, M].
      meta: run directory, reward, optimizer, η, steps, counts, the approximation.
    """

    contribution: np.ndarray
    other: np.ndarray
    actual_change: np.ndarray
    checkpoint_steps: np.ndarray
    eval_value: np.ndarray
    interval_predicted: np.ndarray
    meta: dict[str, Any]

    @property
    def predicted_change(self) -> np.ndarray:
        """Σ_j C_ij + o_i: the predicted q_i(θ_final) − q_i(θ_0), [M]."""
        return self.contribution.sum(axis=1) + self.other

    @property
    def pearson(self) -> float:
        """Pearson's correlation of predicted and actual change over the M eval items (nan when M < 2 or one is
        constant)."""
        p, a = self.predicted_change, self.actual_change
        if len(p) < 2 or np.std(p) == 0 or np.std(a) == 0:
            return float("nan")
        return float(np.corrcoef(p, a)[0, 1])

    def to_dict(self) -> dict[str, Any]:
        """Every field, the predicted change and Pearson's r, as JSON-ready values."""
        from dynamics.outputs import jsonable

        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["predicted_change"] = self.predicted_change
        out["pearson"] = None if math.isnan(self.pearson) else self.pearson
        return jsonable(out)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write `to_dict()` as JSON, atomically; returns the path."""
        from dynamics.outputs import write_json_atomic

        return write_json_atomic(path, self.to_dict())


@dataclasses.dataclass(frozen=True)
class RunModel:
    """A run directory read back, its reward model rebuilt and checked (`load_run_model`).

    Attributes:
      run_dir: the directory.
      config: its `TrainConfig` (config.json "train").
      rm: the reward model, as the trainer built it.
      params: θ_0, the full initial parameters (π_ref included for an IM-RM).
      train_tree: the trainable part of θ_0 (`dynamics.masks.partition`; π_ref's leaves None).
      frozen: the frozen part.
      tx: the run's optax optimizer.
      checkpoints: step → checkpoint folder, every checkpoint on disk, by step.
      complete: whether the run finished (summary.json exists).
    """

    run_dir: Path
    config: Any
    rm: Any
    params: Any
    train_tree: Any
    frozen: Any
    tx: Any
    checkpoints: dict[int, Path]
    complete: bool

    def state(self, step: int) -> tuple[Any, Any]:
        """(trainable parameters, optimizer state) after `step` steps: the checkpoint's, or the start's at 0."""
        template = {"params": without_ref(self.train_tree), "opt_state": self.tx.init(without_ref(self.train_tree))}
        if step not in self.checkpoints:
            if step == 0:
                return self.train_tree, template["opt_state"]
            raise ConfigError(f"{self.run_dir}/checkpoints has no checkpoint of step {step}")
        from safetensors.numpy import load_file

        from dynamics.training.checkpoint import unflatten_tree

        folder = self.checkpoints[step]
        try:
            arrays = load_file(str(folder / "state.safetensors"))
        except Exception as err:  # safetensors raises its own SafetensorError (and OSError for a missing file)
            raise ConfigError(f"{folder / 'state.safetensors'}: unreadable checkpoint state ({err})") from err
        state = unflatten_tree(template, arrays, str(folder))
        tree = {**state["params"], **({"ref": self.train_tree["ref"]} if "ref" in self.train_tree else {})}
        return tree, state["opt_state"]

    def params_at(self, train_tree: Any) -> Any:
        """The full parameters of a trainable tree (with the frozen part and π_ref)."""
        return combine(train_tree, self.frozen)


def without_ref(tree: Any) -> Any:
    """`tree` without its π_ref subtree (the part an optimizer and a checkpoint hold)."""
    return {k: v for k, v in tree.items() if k != "ref"}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ConfigError(f"{path}: no such file: is {path.parent} a run directory of rmdyn's trainer?") from err
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: cannot read JSON ({err})") from err


def _check_model(record: dict, lm: Any, where: Path) -> None:
    """config.json "model" must describe `lm` (its full config, or the fields `Loaded.describe` records)."""
    from dynamics.outputs import jsonable

    model, c = record.get("model") or {}, lm.config
    if "config" in model:
        ours = jsonable(dataclasses.asdict(c))
        diffs = sorted(k for k in set(ours) | set(model["config"]) if ours.get(k) != model["config"].get(k))
    else:
        keys = ("family", "n_layers", "d_model", "vocab_size", "tie_embeddings", "n_params")
        diffs = [k for k in keys if k in model and model[k] != getattr(c, k)]
    if diffs:
        shown = ", ".join(
            f"{k}={(model.get('config') or model).get(k)!r} there, {getattr(c, k, None)!r} here" for k in diffs[:4]
        )
        raise ConfigError(f"{where}: the run was trained with another model ({shown})")


def _checkpoint_folders(run_dir: Path) -> dict[int, Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return {}
    return {int(p.name[5:]): p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"step_\d{8}", p.name)}


def _due_steps(config: Any, n: int, last: int) -> list[int]:
    """The steps ≤ last at which the trainer saves a checkpoint (every k steps or at epoch ends, and the end)."""
    per_epoch = math.ceil(n / config.batch_size)
    total = per_epoch * config.epochs
    if config.max_steps:
        total = min(total, config.max_steps)
    every = config.checkpoint_every_steps or per_epoch
    return [s for s in range(1, min(total, last) + 1) if s % every == 0 or s == total]


def load_run_model(
    run_dir: str | os.PathLike, lm: Any, lm_params: Any, train: PreferenceBatch, *, reward: str | None = None
) -> RunModel:
    """Reads a run directory of `dynamics.training.train` and rebuilds its θ_0, checking that it is this run's.

    Args:
      run_dir: the run directory (config.json, checkpoints/step_XXXXXXXX/).
      lm, lm_params: the language model and the parameters the run started from (as passed to `train`).
      train: the run's training pairs (as passed to `train`).
      reward: the reward type the caller expects ("ex", "im", …), or None for the run's own.

    Raises:
      ConfigError: no config.json; a run of another reward type than `reward`, or an EX-GRM; another model,
        other initial parameters (model, EX-RM head seed, dtype) or other training data than the run's.
    """
    from dynamics.training import TrainConfig, build_reward_model, make_optimizer
    from dynamics.training.checkpoint import tree_sha256
    from dynamics.training.config import OptimizerSpec
    from dynamics.training.record import rows_sha256
    from dynamics.training.rows import Rows

    run_dir = Path(run_dir)
    where = run_dir / "config.json"
    record = _read_json(where)
    kind = (record.get("reward_model") or {}).get("kind")
    if reward is not None and kind != reward:
        raise ConfigError(f"run directory {run_dir} was trained with reward {kind}, not {reward} ({where})")
    if kind == "exgrm":
        raise ConfigError(f"{where}: an EX-GRM run: attribution is defined for Bradley-Terry reward models")
    config = TrainConfig.from_dict(record["train"])
    _check_model(record, lm, where)
    data = record.get("data") or {}
    ours = {
        "chosen": rows_sha256(Rows.from_batch(train.chosen)),
        "rejected": rows_sha256(Rows.from_batch(train.rejected)),
    }
    if data.get("train_sha256") != ours:
        raise ConfigError(
            f"{where}: the training pairs differ from the run's ({data.get('n_train')} pairs, sha256 "
            f"{data.get('train_sha256')}; here {train.batch_size} pairs, {ours})"
        )
    rm, params, spec = build_reward_model(config, lm, lm_params)
    if tree_sha256(without_ref(params)) != record.get("initial_params_sha256"):
        raise ConfigError(
            f"{where}: the initial parameters differ from the run's (initial_params_sha256): another model's "
            "weights, another dtype, or another EX-RM head seed"
        )
    train_tree, frozen = partition(params, trainable_mask(rm, params, spec))
    tx = make_optimizer(OptimizerSpec.from_config(config))
    return RunModel(
        run_dir, config, rm, params, train_tree, frozen, tx, dict(sorted(_checkpoint_folders(run_dir).items())),
        (run_dir / "summary.json").exists(),
    )  # fmt: skip


def _flat(tree: Any) -> jax.Array:
    return jnp.concatenate([x.reshape(-1) for x in jax.tree.leaves(tree)])


def _difference_blocks(features, plus, minus, block: int):
    """Yields (row indices, features(plus) − features(minus) of those rows as a numpy [k, P] block); `minus` None:
    features(plus) alone. Rows `block` at a time, so that only a few blocks are alive at once."""
    for idx, keep in chunks(plus.batch_size, block):
        part = features(strip(plus.select(idx[:keep])))
        if minus is not None:
            part = part - features(strip(minus.select(idx[:keep])))
        yield idx[:keep], np.asarray(part)


def _difference_rows(features, plus, minus, block: int) -> np.ndarray:
    """All rows of `_difference_blocks` in one preallocated [n, P] array (no concatenation copy)."""
    out = None
    for idx, part in _difference_blocks(features, plus, minus, block):
        if out is None:
            out = np.empty((plus.batch_size, part.shape[1]), part.dtype)
        out[idx] = part
    return out


def _adam_state(opt_state: Any) -> Any:
    import optax

    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
             if isinstance(s, optax.ScaleByAdamState)]  # fmt: skip
    return found[0]


def _interval(run: RunModel, tree, opt_state, batches: list[np.ndarray], train, evalset, features_of, block: int):
    """(ΔC [M, N], Δo [M]) of the steps `batches`, linearised at the checkpoint (tree, opt_state) they start from."""
    config, rm = run.config, run.rm
    params = run.params_at(tree)
    features = features_of(tree)
    eval_feats = _difference_rows(features, evalset.chosen, evalset.rejected, block)  # ∇q_i, [M, P]
    rows = np.unique(np.concatenate(batches))
    sub = strip(train.select(rows))
    r_plus, r_minus = batch_rewards(rm, params, sub.chosen), batch_rewards(rm, params, sub.rejected)
    if reference_is_policy(rm, params):
        r_plus, r_minus = np.zeros_like(r_plus), np.zeros_like(r_minus)
    w = np.asarray(config.objective_spec.weight(jnp.asarray(r_plus), jnp.asarray(r_minus)), np.float64)
    delta = np.zeros((evalset.size, train.batch_size))
    other = np.zeros(evalset.size)
    lr = config.lr
    if config.optimizer == "sgd":
        inner = np.zeros((evalset.size, len(rows)))  # ⟨∇q_i, ∇m_j⟩, the pair gradients streamed block by block
        for idx, part in _difference_blocks(features, sub.chosen, sub.rejected, block):
            inner[:, idx] = eval_feats @ part.T
        for b in batches:
            pos = np.searchsorted(rows, b)
            np.add.at(delta, (slice(None), b), inner[:, pos] * (w[pos] * lr / len(b)))
        return delta, other
    grads = _difference_rows(features, sub.chosen, sub.rejected, block)  # ∇m_j, [|rows|, P]
    adam = _adam_state(opt_state)
    mu, nu, count = (np.asarray(x) for x in (_flat(adam.mu), _flat(adam.nu), adam.count))
    count, dtype = int(count), mu.dtype
    theta = np.asarray(_flat(without_ref(tree)))
    for b in batches:
        pos = np.searchsorted(rows, b)
        wb = (w[pos] / len(b)).astype(dtype)
        g = -(wb @ grads[pos])
        count += 1
        c1, c2 = 1 - config.b1**count, 1 - config.b2**count
        mu_prev, mu = mu, config.b1 * mu + (1 - config.b1) * g
        nu = config.b2 * nu + (1 - config.b2) * g * g
        d = (1.0 / (np.sqrt(nu / c2) + config.eps)).astype(dtype)
        scaled = eval_feats * d[None, :]  # ∇q_i ⊙ D_s, [M, P]
        per_pair = np.asarray(scaled @ grads[pos].T, np.float64)  # ⟨∇q_i ⊙ D_s, ∇m_j⟩
        np.add.at(delta, (slice(None), b), per_pair * (wb.astype(np.float64) * lr * (1 - config.b1) / c1))
        other += -lr * config.b1 / c1 * np.asarray(scaled @ mu_prev, np.float64)
        if config.optimizer == "adamw" and config.weight_decay:
            other += -lr * config.weight_decay * np.asarray(eval_feats @ theta, np.float64)
    return delta, other


def checkpoint_plan(run: RunModel, n: int, require_all: bool) -> list[int]:
    """t_0 = 0, t_1, …, t_C: the checkpoints on disk (step 0 rebuilt), checked for gaps."""
    steps = [s for s in run.checkpoints if s > 0]
    if not steps:
        raise ConfigError(f"{run.run_dir}/checkpoints holds no checkpoint: nothing to attribute")
    missing = sorted(set(_due_steps(run.config, n, steps[-1])) - set(steps))
    if missing and require_all:
        c = run.config
        raise ConfigError(
            f"{run.run_dir}/checkpoints lacks the checkpoints of steps {missing[:5]}{' …' if len(missing) > 5 else ''} "
            f"(keep_checkpoints={c.keep_checkpoints} kept only the newest): train with keep_checkpoints at least "
            f"the number of checkpoints (and checkpoint_every_steps=1 for a step-by-step attribution), or pass "
            "require_all=False to attribute over the longer intervals"
        )
    return [0, *steps]


def _check_budget(run: RunModel, evalset: EvalSet, steps, batches, block: int, budget_gb: float) -> tuple[int, int]:
    """(P, the backward passes of the whole attribution); refuses more held gradients than `budget_gb` GiB."""
    n_params = sum(int(np.size(x)) for x in jax.tree.leaves(run.train_tree))
    itemsize = jnp.dtype(jax.tree.leaves(run.train_tree)[0].dtype).itemsize
    widths = [len(np.unique(np.concatenate(batches[a:b]))) for a, b in zip(steps, steps[1:], strict=False)]
    held = evalset.size + 3 * block + (evalset.size + max(widths) if run.config.optimizer != "sgd" else 0)
    need = held * n_params * itemsize
    if need > budget_gb * 2**30:
        raise ConfigError(
            f"attribution along {run.run_dir} would hold {need / 2**30:.1f} GiB of per-sequence gradients "
            f"({held} rows of {n_params:,} parameters: the eval items, 3 blocks, with Adam also ∇q ⊙ D and the "
            f"{max(widths)} training pairs of an interval), over the "
            f"{budget_gb:g} GiB budget: fewer eval items, checkpoints more often, or a larger budget"
        )
    per_eval = 2 if evalset.rejected is not None else 1
    return n_params, sum(per_eval * evalset.size + 2 * w for w in widths)


def _meta(run: RunModel, steps: list[int], n: int, evalset: EvalSet, n_params: int, total: int) -> dict[str, Any]:
    from dynamics.outputs import portable_path

    c = run.config
    approximation = "first order in each step's update, linearised at the interval's checkpoint"
    if c.optimizer != "sgd":
        approximation += "; Adam's μ, ν advanced with the gradients at the checkpoint, momentum in 'other'"
    return {
        "run_dir": portable_path(run.run_dir),
        "reward": c.reward,
        "optimizer": c.optimizer,
        "lr": c.lr,
        "params": c.params,
        "steps": steps[-1],
        "complete": run.complete and steps[-1] == len(training_batches(c, n)),
        "checkpoints": len(steps) - 1,
        "longest_interval": int(max(np.diff(steps))),
        "n_train": n,
        "n_eval": evalset.size,
        "eval_kind": evalset.kind,
        "n_trained": n_params,
        "backward_passes": total,
        "approximation": approximation,
    }


def attribute_run(
    run_dir: str | os.PathLike,
    lm: Any,
    lm_params: Any,
    train: PreferenceBatch,
    evalset: EvalSet,
    *,
    reward: str | None = None,
    block: int = 8,
    memory_budget_gb: float = 8.0,
    require_all: bool = True,
    progress: bool = False,
) -> RunAttribution:
    """Per-pair contributions summed along a run's checkpoints, and the actual change (docs/math.md §10.3).

    Args:
      run_dir: the run directory of `dynamics.training.train`, trained with SGD, Adam or AdamW and checkpoints
        kept (keep_checkpoints ≥ their number; checkpoint_every_steps=1 for TracIn at every step).
      lm, lm_params: the language model and the parameters the run started from.
      train: the run's N training pairs.
      evalset: the M eval items q_i (margins or single rewards).
      reward: the reward type the caller expects, or None for the run's own.
      block: rows per backward-pass block.
      memory_budget_gb: refuse to hold more per-sequence gradients than this (each P scalars: the M eval
        gradients and 3 blocks; with Adam also M preconditioned copies and the pairs of one interval, which SGD
        streams block by block).
      require_all: refuse a run whose checkpoints were not all kept (else attribute over the longer intervals).
      progress: a progress bar over the per-sequence backward passes.

    Returns:
      A `RunAttribution`.

    Raises:
      ConfigError: see `load_run_model`; no checkpoint, missing checkpoints (with `require_all`), gradients over
        the memory budget, block < 1.
      DataError: M = 0.
    """
    if block < 1:
        raise ConfigError(f"block must be ≥ 1, got {block}")
    if evalset.size == 0:
        raise DataError("no eval items (M = 0): attribution needs at least one")
    run = load_run_model(run_dir, lm, lm_params, train, reward=reward)
    if isinstance(run.rm, GenerativeRM):
        raise ConfigError("attribution is defined for Bradley-Terry reward models (EX-RM, IM-RM), not the EX-GRM")
    n = train.batch_size
    steps = checkpoint_plan(run, n, require_all)
    batches = training_batches(run.config, n)[: steps[-1]]
    n_params, total = _check_budget(run, evalset, steps, batches, block, memory_budget_gb)
    from tqdm.auto import tqdm

    contribution, other = np.zeros((evalset.size, n)), np.zeros(evalset.size)
    values, per_interval = [], []
    with tqdm(total=total, desc="gradients along the run", unit="seq", disable=not progress, leave=False) as bar:

        def features_of(tree):
            return gradient_features(run.rm, tree, run.frozen, block=block, progress=bar)

        for a, b in zip(steps, steps[1:], strict=False):
            tree, opt_state = run.state(a)
            values.append(eval_values(run.rm, run.params_at(tree), evalset))
            delta, extra = _interval(run, tree, opt_state, batches[a:b], train, evalset, features_of, block)
            contribution, other = contribution + delta, other + extra
            per_interval.append(delta.sum(axis=1) + extra)
    values.append(eval_values(run.rm, run.params_at(run.state(steps[-1])[0]), evalset))
    meta = _meta(run, steps, n, evalset, n_params, total)
    return RunAttribution(
        contribution=contribution,
        other=other,
        actual_change=values[-1] - values[0],
        checkpoint_steps=np.asarray(steps, np.int64),
        eval_value=np.stack(values),
        interval_predicted=np.stack(per_interval),
        meta=meta,
    )

"""The training loop: `train` a reward model on the BT loss (EX-GRM: its cross-entropy) and evaluate it.

The common training protocol of docs/math.md §6 is the default: Adam (torch's defaults: betas 0.9/0.999, eps
1e-8, no weight decay), lr 1e-6, constant, no clipping; β = 0.01; effective batch 32 by gradient accumulation
(micro-batch × accumulation steps) of the batch-mean loss; evaluation at the end of every epoch.

    result = train(TrainConfig(reward="im", params="last:8", lr=3e-5, epochs=20),
                   lm, lm_params, train_data, eval_suite, run_dir="runs/x")

`train` prepares a `Run` (what never changes during the run) and a `RunState` (what a checkpoint restores, and
the counters; `dynamics.training.prepare`), then steps: each piece is a small function of these two objects.

- Which parameters train is a `dynamics.masks` spec. Gradients are taken with respect to the trainable tree
  alone (`partition` / `combine`), so JAX skips the backward pass through frozen lower blocks.
- π_ref never changes, so the reference log-probabilities ln π_ref(y|x) of every sequence (training and
  evaluation) are computed once, before the first step, and cached: one forward pass per step instead of two.
- The data order of epoch e is a pure function of (seed, e) (`epoch_order`), checkpoints are taken at step
  boundaries, and nothing depends on the wall clock: a run interrupted (Ctrl-C, SIGKILL) and resumed with
  `resume=True` ends with the same metrics and parameters, bit for bit, as an uninterrupted run.
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

import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from dynamics.errors import ConfigError, DataError
from dynamics.masks import combine
from dynamics.models import LM, Params
from dynamics.outputs import jsonable
from dynamics.sharding import data_devices
from dynamics.text import PreferenceBatch
from dynamics.training import engine
from dynamics.training.batching import batch_plan, epoch_order, pass_limit
from dynamics.training.checkpoint import CHECKPOINT_FORMAT, save_checkpoint
from dynamics.training.config import TrainConfig
from dynamics.training.evaluation import EvalSuite, eval_line, evaluate_rewards, score_suite
from dynamics.training.interrupts import deferred_interrupt
from dynamics.training.prepare import Run, RunState, open_run_dir, precompute, prepare_run, stage_bar
from dynamics.training.record import record_fingerprint
from dynamics.training.results import StepInfo, TrainResult

__all__ = ["train"]


def _log(run: Run, state: RunState, entry: dict[str, Any]) -> None:
    state.history.append(entry)
    if run.log_path is not None:
        with open(run.log_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(jsonable(entry), allow_nan=False) + "\n")


def _epochs_done(run: Run, state: RunState) -> float:
    if state.step == 0:
        return 0.0
    return state.epoch + state.step_in_epoch / run.steps_per_epoch


def _checkpoint(run: Run, state: RunState) -> None:
    """Saves the state at this step boundary (once per step; nothing without a run directory)."""
    if run.run_path is None or state.last_ckpt_step == state.step:
        return
    config = run.config
    meta = {
        "format": CHECKPOINT_FORMAT,
        "step": state.step,
        "epoch": state.epoch,
        "step_in_epoch": state.step_in_epoch,
        "last_eval_step": state.last_eval_step,
        "log_lines": len(state.history),
        "rng": {"kind": "numpy PCG64(SeedSequence([seed, epoch]))", "seed": config.seed, "epoch": state.epoch},
        "data_order": epoch_order(config.seed, state.epoch, run.pairs.n_rows).tolist(),
        "config": config.to_dict(),
        "record": record_fingerprint(run.record),
    }
    tree = {"params": state.train_tree, "opt_state": state.opt_state}
    save_checkpoint(run.run_path, tree, meta, config.keep_checkpoints)
    state.last_ckpt_step = state.step


def _eval_due(run: Run, state: RunState) -> bool:
    config, step = run.config, state.step
    return (
        (step == 0 and config.eval_at_start)
        or (
            step > 0
            and config.eval_every_epochs > 0
            and state.step_in_epoch == run.steps_per_epoch
            and (state.epoch + 1) % config.eval_every_epochs == 0
        )
        or (step > 0 and config.eval_every_steps > 0 and step % config.eval_every_steps == 0)
        or step == run.total_steps
    )


def _checkpoint_due(run: Run, state: RunState) -> bool:
    if state.step == 0:
        return False
    if run.config.checkpoint_every_steps:
        return state.step % run.config.checkpoint_every_steps == 0 or state.step == run.total_steps
    return state.step_in_epoch == run.steps_per_epoch or state.step == run.total_steps


def _full_params(run: Run, state: RunState) -> Params:
    return combine(state.train_tree, run.frozen)


def _evaluate_now(run: Run, state: RunState, bar: Any) -> dict[str, float]:
    """Evaluates the current parameters and logs the "eval" line (the log and the state change together)."""
    t0 = time.perf_counter()
    n_eval = sum(rows.n_rows for rows in run.eval_sets.values())
    desc = "initial evaluation" if state.step == 0 else f"evaluation at step {state.step}"
    eval_bar = stage_bar(run.progress, desc, n_eval, leave=False)
    params = _full_params(run, state)
    rewards = score_suite(run.step_fn, params, run.suite, run.eval_sets, run.ref_eval, run.config, run.mesh, eval_bar,
                          packed=run.packed_eval)  # fmt: skip
    evaluation = evaluate_rewards(rewards, run.suite, run.config.tie_tol, run.config.objective_spec)
    state.last_rewards = rewards
    eval_bar.close()
    state.timing["eval"] += time.perf_counter() - t0
    with deferred_interrupt():
        _log(run, state, {"event": "eval", "step": state.step, "epoch": _epochs_done(run, state), **evaluation})
        state.last_eval_step = state.step
    if run.progress:
        bar.write(eval_line(state.step, evaluation, run.suite))
    return evaluation


def _optimizer_step(run: Run, state: RunState) -> dict[str, Any]:
    """One optimizer step over the next batch of the epoch's plan; returns its logged statistics."""
    config = run.config
    if state.step_in_epoch == run.steps_per_epoch:
        state.epoch, state.step_in_epoch = state.epoch + 1, 0
    if state.plan_epoch != state.epoch:
        order = epoch_order(config.seed, state.epoch, run.pairs.n_rows)
        state.plan, state.plan_epoch = batch_plan(order, config.batch_size, config.micro_batch_size), state.epoch
    t0 = time.perf_counter()
    micro_batches = state.plan[state.step_in_epoch]
    acc, stats, counts = engine.accumulate_gradients(
        run.step_fn, state.train_tree, run.frozen, micro_batches, run.pairs, config, run.mesh
    )
    state.timing["packed"] += counts["packed_micro_batches"]
    state.timing["passes"] += counts["passes"]
    # the update consumes (donates) the old parameters and optimizer state: a Ctrl-C between the update and the
    # assignment would leave nothing valid to checkpoint, so it waits until both are done
    with deferred_interrupt():
        rows = jnp.asarray(stats["rows"], jnp.float32)
        state.train_tree, state.opt_state, gnorm = run.step_fn.apply(state.train_tree, state.opt_state, acc, rows)
        stats["grad_norm"] = float(gnorm)
        state.step, state.step_in_epoch = state.step + 1, state.step_in_epoch + 1
        state.last = stats
        if state.step % config.log_every_steps == 0 or state.step == run.total_steps:
            _log(run, state, {"event": "train", "step": state.step, "epoch": _epochs_done(run, state), **stats})
    state.timing["steps"] += time.perf_counter() - t0
    state.timing["n_steps"] += 1
    return stats


def _steps(run: Run, state: RunState, callbacks: Sequence[Callable[[StepInfo], None]], bar: Any) -> None:
    """Steps until `total_steps`: evaluation, checkpoint and callbacks at each step boundary."""
    just_stepped = False
    while True:
        evaluation = None
        if run.suite.comparisons and _eval_due(run, state) and state.last_eval_step != state.step:
            evaluation = _evaluate_now(run, state, bar)
        if _checkpoint_due(run, state):
            _checkpoint(run, state)
        if just_stepped:
            info = StepInfo(state.step, state.epoch, state.last["loss"], state.last["accuracy"], evaluation)
            for callback in callbacks:
                callback(info)
            just_stepped = False
        if state.step >= run.total_steps:
            return
        stats = _optimizer_step(run, state)
        bar.update(1)
        bar.set_postfix(loss=f"{stats['loss']:.4f}", acc=f"{stats['accuracy']:.3f}", refresh=False)
        just_stepped = True


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


def _timing(run: Run, state: RunState, t_start: float, t_pre: float, traces_before: Mapping[str, int]) -> dict:
    """Seconds spent, trace counts and pass counts of this process (`TrainResult.timing`)."""
    t = state.timing
    return {
        "total_s": time.perf_counter() - t_start,
        "precompute_s": t_pre,
        "train_steps_s": t["steps"],
        "steps_this_process": t["n_steps"],
        "mean_step_s": t["steps"] / t["n_steps"] if t["n_steps"] else None,
        "eval_s": t["eval"],
        "traces": {k: v - traces_before[k] for k, v in run.step_fn.traces.items()},
        "frozen_blocks_cached": run.step_fn.start,
        "packed_micro_batches": t["packed"],
        "passes": t["passes"],
        "pass_positions": pass_limit(run.config),
        "devices": data_devices(run.mesh),
    }


def _result(
    run: Run, state: RunState, final_metrics: Callable[[Any], Mapping[str, float]] | None, timing: dict[str, Any]
) -> TrainResult:
    """The run's outcome: the last evaluation (with the hook's metrics) and the final parameters."""
    final_eval = next((h for h in reversed(state.history) if h["event"] == "eval"), {})
    final_eval = {k: v for k, v in final_eval.items() if k not in ("event", "step", "epoch")}
    final_params = _full_params(run, state)
    if final_metrics is not None:
        final_eval.update(_checked_final_metrics(final_metrics(final_params), final_eval))
    return TrainResult(
        config=run.config,
        run_dir=str(run.run_path) if run.run_path is not None else None,
        steps=state.step,
        epochs=_epochs_done(run, state),
        final_eval=final_eval,
        history=tuple(state.history),
        resumed_from_step=state.resumed_from,
        n_trainable=run.record["mask"]["n_trainable"],
        timing=timing,
        params=final_params,
        final_rewards=dict(state.last_rewards) if state.last_eval_step == state.step else None,
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
      DataError: empty training data, an empty or malformed evaluation set; `final_metrics` returning a
        non-finite value.
      ConfigError: bad options, a run directory that already holds a run (without `resume`), a resumed
        run whose configuration differs, a mesh without a "data" axis or whose device count does not
        divide `micro_batch_size`, or `final_metrics` returning something other than a mapping of new names
        to real numbers.
    """
    t_start = time.perf_counter()
    suite = eval_suite if eval_suite is not None else EvalSuite({}, {})
    run_path = Path(run_dir) if run_dir is not None else None
    run, state, ref_params = prepare_run(
        config, lm, lm_params, train_data, suite, run_path=run_path, resume=resume, mesh=mesh,
        answer_ids=answer_ids, model_info=model_info, data_info=data_info, progress=progress,
    )  # fmt: skip
    traces_before = dict(run.step_fn.traces)
    open_run_dir(run, state, resume)
    t_pre = time.perf_counter()
    precompute(run, ref_params)
    del ref_params
    t_pre = time.perf_counter() - t_pre

    from tqdm.auto import tqdm

    total = run.total_steps
    bar = tqdm(total=total, initial=min(state.step, total), desc="train", disable=not progress, leave=True)
    try:
        _steps(run, state, callbacks, bar)
    except KeyboardInterrupt:
        _checkpoint(run, state)
        bar.close()
        raise
    bar.close()
    result = _result(run, state, final_metrics, _timing(run, state, t_start, t_pre, traces_before))
    if run_path is not None:
        result.save(run_path / "summary.json")
    return result

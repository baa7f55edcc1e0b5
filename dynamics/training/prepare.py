"""Everything a training run does before its first step: check the inputs, build the reward model and the
compiled step, restore a checkpoint (resume) and precompute what never changes (the frozen blocks' output, the
IM-RM's ln π_ref of every sequence, docs/math.md §6).

A run is two objects: `Run`, what stays fixed (the cached arrays are filled in once, by `precompute`), and
`RunState`, what a checkpoint restores plus this process's counters. The loop (`dynamics.training.loop`) is small
functions of these two.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dynamics.errors import ConfigError, DataError
from dynamics.masks import partition, trainable_mask
from dynamics.models import LM, Params
from dynamics.outputs import write_json_atomic
from dynamics.packing import MIN_SAVING
from dynamics.rewards import ImplicitRM, RewardModel
from dynamics.sharding import AXIS, data_devices
from dynamics.text import PreferenceBatch
from dynamics.training.batching import PairSet, eval_chunk
from dynamics.training.build import build_reward_model
from dynamics.training.checkpoint import load_checkpoint, truncate_log, unflatten_tree
from dynamics.training.config import OptimizerSpec, TrainConfig
from dynamics.training.engine import CompiledStep, compile_step
from dynamics.training.evaluation import EvalSuite
from dynamics.training.hidden import frozen_prefix
from dynamics.training.packed_eval import PackedEval, build_packed_eval
from dynamics.training.record import check_checkpoint_config, check_resume, run_record
from dynamics.training.reuse import digest, reused
from dynamics.training.rows import Rows
from dynamics.training.scoring import add_lower_cache, add_packed_lower_cache, packed_logprobs, sequence_logprobs

__all__ = ["Run", "RunState", "open_run_dir", "precompute", "prepare_run", "stage_bar"]


@dataclasses.dataclass
class Run:
    """What stays fixed during a run (the cached arrays are filled in once, by `precompute`).

    Attributes:
      config: the options.
      suite: what to evaluate.
      rm: the reward model (untied when the mask trains the unembedding alone).
      step_fn: the compiled functions (`compile_step`).
      frozen: the frozen parameters, without π_ref, placed on the mesh.
      pairs: the training pairs (with the frozen-block cache and ln π_ref once precomputed).
      eval_sets: the rows of each evaluation sequence set.
      record: the content of config.json (`run_record`).
      mesh: the device mesh, or None.
      run_path: the run directory, or None (nothing is written).
      progress: show progress bars.
      steps_per_epoch: ⌈n / batch_size⌉.
      total_steps: the steps of the whole run (epochs, or max_steps).
      lp_dtype: the dtype of the training step's log-probs (float32, or float64 in a float64 run): that of the
        ln π_ref cache.
      ref_eval: ln π_ref of each evaluation set's rows (IM-RM), float64 [n].
      packed_eval: the evaluation sets on shared-prefix packed rows (`TrainConfig.pack_eval`), or None: then
        evaluation scores `eval_sets` set by set.
    """

    config: TrainConfig
    suite: EvalSuite
    rm: RewardModel
    step_fn: CompiledStep
    frozen: Params
    pairs: PairSet
    eval_sets: dict[str, Rows]
    record: dict[str, Any]
    mesh: Any
    run_path: Path | None
    progress: bool
    steps_per_epoch: int
    total_steps: int
    lp_dtype: np.dtype
    ref_eval: dict[str, np.ndarray | None] = dataclasses.field(default_factory=dict)
    packed_eval: PackedEval | None = None

    @property
    def log_path(self) -> Path | None:
        """metrics.jsonl of the run directory (None without one)."""
        return self.run_path / "metrics.jsonl" if self.run_path is not None else None

    def place(self, tree: Any) -> Any:
        """Parameters (and optimizer state) as they live during the run: on the mesh by param_sharding, if any."""
        if self.mesh is None:
            return tree
        from dynamics.sharding import shard_params

        return shard_params(tree, self.mesh, self.config.param_sharding)


@dataclasses.dataclass
class RunState:
    """What a checkpoint restores (parameters, optimizer state, position, log), and this process's counters.

    Attributes:
      train_tree: the trainable parameters.
      opt_state: the optimizer state.
      step: optimizer steps done.
      epoch: the current epoch.
      step_in_epoch: steps done in it.
      last_eval_step: the step of the last evaluation (−1: none).
      last_ckpt_step: the step of the last checkpoint (−1: none).
      history: the lines of metrics.jsonl.
      resumed_from: the checkpoint step this process started from, or None.
      last: the statistics of the last step ("loss", "accuracy", "rows", "grad_norm").
      plan: the batch plan of epoch `plan_epoch`.
      plan_epoch: the epoch `plan` belongs to (−1: none yet).
      timing: this process's seconds ("steps", "eval"), steps ("n_steps"), packed micro-batches and passes.
      last_rewards: the rewards of every evaluation sequence set at the last evaluation ({set: [n] float64}).
    """

    train_tree: Params
    opt_state: Any
    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    last_eval_step: int = -1
    last_ckpt_step: int = -1
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    resumed_from: int | None = None
    last: dict[str, Any] = dataclasses.field(default_factory=dict)
    plan: list[list[np.ndarray]] = dataclasses.field(default_factory=list)
    plan_epoch: int = -1
    last_rewards: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    timing: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"steps": 0.0, "eval": 0.0, "n_steps": 0, "packed": 0, "passes": 0}
    )


def _train_sets(data: PreferenceBatch, kind: str) -> dict[str, Rows]:
    chosen, rejected = Rows.from_batch(data.chosen), Rows.from_batch(data.rejected)
    if chosen.n_rows == 0:
        raise DataError("the training set has no rows")
    if rejected.tokens.shape != chosen.tokens.shape:
        raise DataError(
            f"training chosen and rejected arrays differ in shape: {chosen.tokens.shape} vs {rejected.tokens.shape}"
        )
    needs_response = kind != "exgrm"
    if needs_response != (chosen.response_mask is not None):
        what = "PairBatch (with response_mask)" if needs_response else "ExgrmBatch"
        raise DataError(f"reward {kind!r} trains on {what} sequences")
    return {"chosen": chosen, "rejected": rejected}


def _check_inputs(config: TrainConfig, suite: EvalSuite, run_path: Path | None, resume: bool, mesh: Any) -> None:
    """Raises DataError / ConfigError for an evaluation suite, run directory or mesh that cannot work."""
    suite.validate()
    for name, batch in suite.sequences.items():
        if (config.reward == "exgrm") == (Rows.from_batch(batch).response_mask is not None):
            raise DataError(f"evaluation set {name!r}: wrong sequence type for reward {config.reward!r}")
    if resume and run_path is None:
        raise ConfigError("resume=True needs a run_dir")
    if run_path is not None and not resume and (run_path / "config.json").exists():
        raise ConfigError(f"{run_path} already holds a run (config.json); pass resume=True or use another directory")
    if mesh is not None:
        if AXIS not in mesh.axis_names:
            raise ConfigError(f"the mesh needs a {AXIS!r} axis (dynamics.sharding.make_mesh); it has {mesh.axis_names}")
        n = data_devices(mesh)
        if config.micro_batch_size % n:
            raise ConfigError(
                f"micro_batch_size={config.micro_batch_size} cannot be split over the mesh's {n} devices: use a "
                f"multiple of {n} (each device takes micro_batch_size / devices pairs)"
            )


def _cache_start(config: TrainConfig, rm: RewardModel, params: Params, mask: Any, sets: Sequence[Rows]) -> int:
    """The frozen prefix whose output is cached (`frozen_prefix`), or 0 when off or over `cache_max_gb`."""
    if not config.cache_frozen_blocks:
        return 0
    start = frozen_prefix(params, mask, rm.lm.config.n_layers)
    itemsize = np.dtype(params["lm"]["final_norm"]["scale"].dtype).itemsize
    cache_bytes = sum(rows.tokens.size * rm.lm.config.d_model * itemsize for rows in sets)
    return 0 if cache_bytes > config.cache_max_gb * 2**30 else start


def prepare_run(
    config: TrainConfig,
    lm: LM,
    lm_params: Params,
    train_data: PreferenceBatch,
    suite: EvalSuite,
    *,
    run_path: Path | None,
    resume: bool,
    mesh: Any,
    answer_ids: tuple[int, int] | None,
    model_info: Mapping[str, Any] | None,
    data_info: Mapping[str, Any] | None,
    progress: bool,
) -> tuple[Run, RunState, Params | None]:
    """The run's fixed parts, its initial state (before any checkpoint is restored) and π_ref's parameters."""
    train_sets = _train_sets(train_data, config.reward)
    _check_inputs(config, suite, run_path, resume, mesh)
    import optax  # noqa: F401  (fail early if missing)

    rm, params, spec = build_reward_model(config, lm, lm_params, answer_ids=answer_ids)
    mask = trainable_mask(rm, params, spec)
    train_tree, frozen = partition(params, mask)
    eval_sets = {name: Rows.from_batch(batch) for name, batch in suite.sequences.items()}
    start = _cache_start(config, rm, params, mask, [*train_sets.values(), *eval_sets.values()])
    n = train_sets["chosen"].n_rows
    steps_per_epoch = math.ceil(n / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    mesh_info = {
        "devices": data_devices(mesh),
        "param_sharding": None if mesh is None else config.param_sharding,
        "eval_chunk": eval_chunk(config, data_devices(mesh)),
    }
    record = run_record(
        config, rm, lm, params, mask, spec, train_sets, suite, model_info=model_info, data_info=data_info,
        steps_per_epoch=steps_per_epoch, mesh_info=mesh_info,
    )  # fmt: skip
    # the training step subtracts the ln π_ref cache from log-probs it computes in this dtype (float32, or float64
    # in a float64 run): a float32 cache would round ln π_ref by ~1e-6 nats in a float64 run
    lp_dtype = np.dtype(jnp.promote_types(params["lm"]["final_norm"]["scale"].dtype, jnp.float32))
    run = Run(
        config, suite, rm, compile_step(rm, start, OptimizerSpec.from_config(config), config.objective_spec),
        # the step never reads π_ref (its log-probs are cached): it stays out of the traced trees
        {k: v for k, v in frozen.items() if k != "ref"},
        PairSet(train_sets["chosen"], train_sets["rejected"]), eval_sets, record, mesh, run_path, progress,
        steps_per_epoch, total_steps, lp_dtype,
    )  # fmt: skip
    run.frozen = run.place(run.frozen)
    run.packed_eval = _packed_eval(config, rm, eval_sets, mesh)
    # a private copy: the update donates (reuses) these buffers, and π_ref, the caller's params and `frozen` may
    # share them (the IM-RM's reference is the initial model, the same arrays)
    train_tree = run.place(jax.tree.map(jnp.copy, {k: v for k, v in train_tree.items() if k != "ref"}))
    state = RunState(train_tree, run.place(run.step_fn.tx.init(train_tree)))
    ref_params = params.get("ref") if isinstance(rm, ImplicitRM) and not rm.reference_free else None
    return run, state, ref_params


def _packed_eval(config: TrainConfig, rm: RewardModel, sets: Mapping[str, Rows], mesh: Any) -> PackedEval | None:
    """The evaluation sets on shared-prefix packed rows, when `pack_eval` is on, there is no mesh and packing cuts
    the positions by at least 10 % (`dynamics.packing.MIN_SAVING`)."""
    if not config.pack_eval or mesh is not None or not sets:
        return None
    packed = build_packed_eval(sets, eval_chunk(config), config.bucket, response_positions=isinstance(rm, ImplicitRM))
    plain = sum(rows.tokens.size for rows in sets.values())
    return packed if packed.positions() <= (1.0 - MIN_SAVING) * plain else None


def open_run_dir(run: Run, state: RunState, resume: bool) -> None:
    """Restores the latest checkpoint (resume) or clears a stale log, then writes config.json."""
    run_path = run.run_path
    if run_path is None:
        return
    if resume:
        check_resume(run_path, run.record)
    loaded = load_checkpoint(run_path) if resume else None
    if loaded is not None:
        arrays, meta = loaded
        where = f"{run_path}/checkpoints/step_{meta['step']:08d}"
        check_checkpoint_config(meta, run.config, run.record, where)
        restored = unflatten_tree({"params": state.train_tree, "opt_state": state.opt_state}, arrays, where)
        state.train_tree, state.opt_state = run.place(restored["params"]), run.place(restored["opt_state"])
        state.step, state.epoch, state.step_in_epoch = meta["step"], meta["epoch"], meta["step_in_epoch"]
        state.last_eval_step, state.last_ckpt_step = meta["last_eval_step"], meta["step"]
        state.history = truncate_log(run.log_path, meta["log_lines"])
        state.resumed_from = state.step
    elif run.log_path.exists():
        run.log_path.unlink()
    if (run_path / "summary.json").exists() and loaded is None:
        (run_path / "summary.json").unlink()
    write_json_atomic(run_path / "config.json", run.record)


def stage_bar(progress: bool, desc: str, total: int, leave: bool = True) -> Any:
    """A tqdm bar on stderr over the sequences of a stage before or between training steps (disabled without
    `progress`): caching the frozen blocks, π_ref's log-probs, an evaluation."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="seq", disable=not progress, leave=leave)


def _lower_params(lm_params: Params, start: int) -> Params:
    """The parameters the frozen blocks' pass reads: the input embedding and blocks 0 … start − 1."""
    keep = {"embed", *(f"layers_{i}" for i in range(start))}
    return {k: v for k, v in lm_params.items() if k in keep}


def _rows_digest(rows: Rows) -> str:
    """The digest of every field of `rows` but the cache `x` (tokens, masks, packing: all that shapes the pass)."""
    return digest(*(getattr(rows, f.name) for f in dataclasses.fields(rows) if f.name != "x"))


def precompute(run: Run, ref_params: Params | None) -> None:
    """Fills in the frozen blocks' output (when cached) and the IM-RM's ln π_ref of every training and eval row."""
    config, step_fn, mesh = run.config, run.step_fn, run.mesh
    chunk = eval_chunk(config, data_devices(mesh))
    limit = config.cache_max_gb * 2**30
    # what the output depends on besides the rows: the program (blocks, bucket, chunk, devices) and the parameters
    # (tying the unembedding changes no block: an EX-RM and an IM-RM that unties it share their frozen blocks)
    program = (step_fn.start, config.bucket, chunk, data_devices(mesh), dataclasses.replace(run.rm.lm.config,
               tie_embeddings=None))  # fmt: skip
    if step_fn.start > 0:  # blocks below `start` never change: run them once per row (once per process, `reused`)
        n_rows = 2 * run.pairs.n_rows + sum(rows.n_rows for rows in run.eval_sets.values())
        bar = stage_bar(run.progress, f"caching frozen blocks 0-{step_fn.start - 1}", n_rows)
        frozen = digest(_lower_params(run.frozen["lm"], step_fn.start))

        def cache(rows):
            key = ("lower", frozen, program, _rows_digest(rows))
            x = reused(key, lambda: add_lower_cache(step_fn, run.frozen["lm"], rows, chunk, config.bucket, mesh,
                                                    bar).x, limit, bar, rows.n_rows)  # fmt: skip
            return rows.replace(x=x)

        run.pairs = dataclasses.replace(run.pairs, chosen=cache(run.pairs.chosen), rejected=cache(run.pairs.rejected))
        if run.packed_eval is not None:
            run.packed_eval = _cache_packed(run, ("lower", frozen, program), limit, bar)
        else:
            run.eval_sets = {name: cache(rows) for name, rows in run.eval_sets.items()}
        bar.close()
    if not isinstance(run.rm, ImplicitRM):
        return
    # on a mesh π_ref is placed as π_θ is, so that both go through the same program (r = 0 at the start)
    ref_on = run.place(ref_params) if ref_params is not None else None
    n_ref = 2 * run.pairs.n_rows + sum(rows.n_rows for rows in run.eval_sets.values())
    bar = stage_bar(run.progress, "reference log-probs ln π_ref", n_ref)
    ref = digest(ref_params) if ref_params is not None else None

    def ref_logprobs(rows):
        key = ("ref", ref, program, _rows_digest(rows))
        compute = lambda: sequence_logprobs(step_fn, ref_on, rows, config, mesh, bar)  # noqa: E731
        return compute() if ref is None else reused(key, compute, limit, bar, rows.n_rows)

    ref_c, ref_r = (ref_logprobs(s).astype(run.lp_dtype) for s in (run.pairs.chosen, run.pairs.rejected))
    run.pairs = dataclasses.replace(run.pairs, ref_chosen=ref_c, ref_rejected=ref_r)
    if run.packed_eval is None:
        run.ref_eval = {name: ref_logprobs(s) for name, s in run.eval_sets.items()}
    else:
        run.ref_eval = _packed_ref(run, ref_on, ("ref", ref, program), limit, bar)
    bar.close()


def _packed_digest(packed: PackedEval, fields: Sequence[str] | None = None) -> str:
    """The digest of the packed rows: every field but the cache `x`, or only `fields` (what one pass reads)."""
    if fields is None:
        return digest(packed.names, packed.index, *(_rows_digest(chunk) for chunk in packed.chunks))
    return digest(*(getattr(chunk, f) for chunk in packed.chunks for f in fields))


# what the frozen blocks' pass over packed rows reads: an EX-RM (no response nodes) and an IM-RM share it
_LOWER_FIELDS = ("pack_tokens", "pack_mask", "pack_positions", "pack_attn", "pack_segment")


def _cache_packed(run: Run, key: tuple, limit: float, bar: Any) -> PackedEval:
    """The packed evaluation rows with the frozen blocks' output (once per process, `reused`)."""
    packed = run.packed_eval

    def compute():
        done = add_packed_lower_cache(run.step_fn, run.frozen["lm"], packed, bar)
        return np.stack([chunk.x for chunk in done.chunks])

    x = reused((*key, _packed_digest(packed, _LOWER_FIELDS)), compute, limit, bar, packed.n_rows)
    return dataclasses.replace(packed, chunks=tuple(c.replace(x=x[i]) for i, c in enumerate(packed.chunks)))


def _packed_ref(run: Run, ref_on: Params | None, key: tuple, limit: float, bar: Any) -> dict[str, np.ndarray]:
    """ln π_ref of every evaluation sequence from the packed rows (once per process, `reused`)."""
    packed = run.packed_eval
    if ref_on is None:
        return packed_logprobs(run.step_fn, None, packed, bar)

    def compute():
        lp = packed_logprobs(run.step_fn, ref_on, packed, bar)
        return np.concatenate([lp[name] for name in packed.names])

    merged = reused((*key, _packed_digest(packed)), compute, limit, bar, packed.n_rows)
    o = packed.offsets
    return {name: merged[o[k] : o[k + 1]] for k, name in enumerate(packed.names)}

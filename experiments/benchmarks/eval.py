"""Benchmark of evaluation on prefix trees (`dynamics.training.packed_eval`) against scoring set by set.

The suite is the controlled Persona design of the persona plan's `controlled` preset (agreeableness, every
opening × every answer word, the paper's evaluation sets too) on the first `--prompts` training and test prompts,
with the default model's last 8 blocks trainable, so that blocks 0–21 are frozen and cached as in the study. One
process, the same compiled reward model, one side after the other:

  (a) plain: the frozen blocks' output of every set (`add_lower_cache`), then the reward of every set
      (`score_set`), each set in one pass of its 2 × `--prompts` rows (so that no pass is padded with repeated
      rows: the study's sets of 80 rows run as 32 + 32 + 32 of which 16 are repeats);
  (b) packed: the sets packed into prefix trees of up to 32 sequences (`build_packed_eval`, timed), their frozen
      blocks' output (`add_packed_lower_cache`), then the rewards (`score_packed`).

Each reward pass runs once to compile and is then timed `--repeats` times (the minimum is kept); the frozen-block
passes run once (their first call compiles, on both sides). The IM-RM side scores ln π_θ with ln π_ref = 0 (the
reference pass is the same computation). Prints the positions each side runs, the times, the ratios (a)/(b) and the
largest difference between the two sides' rewards. No JAX import at module level.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any

__all__ = ["DESCRIPTION", "add_arguments", "bench_eval", "run"]

DESCRIPTION = "evaluation on shared-prefix trees vs set by set (the controlled Persona sets, frozen-block cache)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `rmdyn bench eval`."""
    parser.add_argument("--prompts", type=int, default=4, help="training and test prompts each (default 4)")
    parser.add_argument("--reward", choices=("ex", "im"), default="im", help="reward type (default im)")
    parser.add_argument("--repeats", type=int, default=2, help="timed repetitions, the minimum is kept (default 2)")
    parser.add_argument("--model", default=None, metavar="PATH", help="model (default SmolLM2-135M-Instruct)")
    parser.add_argument("--out", default=None, help="write bench_eval.json here")


def _suite(prompts: int, model: str | None) -> tuple[Any, Any]:
    """(the loaded model, the controlled Persona suite on `prompts` training and test prompts)."""
    from dynamics.loading import load
    from experiments.plans.grammar import load_plan
    from experiments.studies.persona.data import persona_texts
    from experiments.studies.persona.runner import encode_run

    overrides = [f"n_test={prompts}", f"controlled_train_prompts={prompts}"]
    values = dict(load_plan("persona", "controlled", overrides).values)
    loaded = load(model)
    return loaded, encode_run(values, persona_texts(values), loaded).evals


def _best(fn, repeats: int) -> tuple[float, Any]:
    fn()  # compile
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench_eval(prompts: int = 4, reward: str = "im", repeats: int = 2, model: str | None = None) -> dict[str, Any]:
    """Times of both sides (module docstring), their positions and the largest reward difference."""
    import numpy as np

    from dynamics.masks import trainable_mask
    from dynamics.training import (
        OptimizerSpec,
        Rows,
        TrainConfig,
        add_lower_cache,
        add_packed_lower_cache,
        build_packed_eval,
        build_reward_model,
        compile_step,
        frozen_prefix,
        score_packed,
        score_set,
    )

    loaded, suite = _suite(prompts, model)
    config = TrainConfig(reward=reward, params="last:8")
    rm, params, spec = build_reward_model(config, loaded.lm, loaded.params)
    start = frozen_prefix(params, trainable_mask(rm, params, spec), rm.lm.config.n_layers)
    step = compile_step(rm, start, OptimizerSpec.from_config(config), None)
    sets = {name: Rows.from_batch(batch) for name, batch in suite.sequences.items()}
    bucket, lm_params = config.bucket, params["lm"]
    zero = {name: np.zeros(rows.n_rows) for name, rows in sets.items()}

    def one_pass(rows):  # the set's rows in one pass
        return dataclasses.replace(config, eval_batch_size=rows.n_rows)

    t0 = time.perf_counter()
    cached = {name: add_lower_cache(step, lm_params, rows, rows.n_rows, bucket) for name, rows in sets.items()}
    lower_plain = time.perf_counter() - t0

    def plain_rewards():
        return {name: score_set(step, params, rows, zero[name], one_pass(rows)) for name, rows in cached.items()}

    plain_s, plain = _best(plain_rewards, repeats)

    t0 = time.perf_counter()
    packed = build_packed_eval(sets, 32, bucket, response_positions=reward == "im")
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    packed = add_packed_lower_cache(step, lm_params, packed)
    lower_packed = time.perf_counter() - t0
    packed_s, ours = _best(lambda: score_packed(step, params, packed, zero), repeats)

    diff = max(float(np.max(np.abs(ours[n] - plain[n]))) for n in sets)
    scale = max(float(np.max(np.abs(plain[n]))) for n in sets)
    return {
        "reward": reward,
        "prompts": prompts,
        "sequences": sum(rows.n_rows for rows in sets.values()),
        "positions_plain": int(sum(rows.tokens.size for rows in sets.values())),
        "positions_packed": packed.positions(),
        "frozen_blocks_s": {"plain": lower_plain, "packed": lower_packed},
        "reward_pass_s": {"plain": plain_s, "packed": packed_s},
        "build_s": build_s,
        "speedup": {"frozen_blocks": lower_plain / lower_packed, "reward_pass": plain_s / packed_s},
        "max_abs_difference": diff,
        "max_abs_reward": scale,
    }


def run(args: argparse.Namespace) -> int:
    """`rmdyn bench eval`: prints the table (and writes bench_eval.json with --out)."""
    from dynamics.errors import ConfigError
    from dynamics.outputs import write_json_atomic
    from experiments.cli.preflight import check_model_source, check_output_dir

    if min(args.prompts, args.repeats) < 1 or args.prompts > 40:
        raise ConfigError(f"--prompts must be in 1…40 and --repeats ≥ 1, got {args.prompts} and {args.repeats}")
    check_model_source(args.model)
    if args.out:
        check_output_dir(args.out, "--out", files=["bench_eval.json"])
    r = bench_eval(args.prompts, args.reward, args.repeats, args.model)
    print(f"{r['sequences']} sequences ({r['reward']}-rm), positions: plain {r['positions_plain']}, "
          f"packed {r['positions_packed']} ({r['positions_plain'] / r['positions_packed']:.2f}x fewer)")  # fmt: skip
    for what, key in (("frozen blocks 0-21", "frozen_blocks"), ("reward pass", "reward_pass")):
        t = r[f"{key}_s"]
        print(f"{what}: plain {t['plain']:.2f} s, packed {t['packed']:.2f} s, speed-up {r['speedup'][key]:.2f}x")
    print(f"packing the suite: {r['build_s']:.2f} s; largest |reward difference| {r['max_abs_difference']:.2e} "
          f"(largest |reward| {r['max_abs_reward']:.2e})")  # fmt: skip
    if args.out:
        from pathlib import Path

        Path(args.out).mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(args.out) / "bench_eval.json", r)
    return 0

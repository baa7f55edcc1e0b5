"""dynamics.training: BT / EX-GRM training with optax, checked against independent computations.

A tiny random decoder (V = 64, D = 16, 3 blocks) and hand-built PairBatch arrays keep every test fast; jitted
functions are shared between the runs of this process, so most runs after the first compile nothing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from dynamics.errors import ConfigError, DataError
from dynamics.masks import partition, trainable_mask
from dynamics.models import LM, DecoderConfig
from dynamics.rewards import ImplicitRM, bt_loss
from dynamics.text import ExgrmBatch, PairBatch, PreferenceBatch
from dynamics.training import (
    EvalSuite,
    OptimizerSpec,
    Rows,
    TrainConfig,
    batch_plan,
    bucket_length,
    compile_step,
    epoch_order,
    evaluate_rewards,
    frozen_prefix,
    lower_hidden,
    score_set,
    sequence_logprobs,
    take_rows,
    train,
    upper_hidden,
)

V, T_PAD = 64, 16


def tiny_lm(tied: bool = True) -> tuple[LM, dict]:
    config = DecoderConfig(
        family="llama",
        vocab_size=V,
        d_model=16,
        n_layers=3,
        n_heads=2,
        n_kv_heads=1,
        head_dim=8,
        d_ff=32,
        tie_embeddings=tied,
    )
    lm = LM(config)
    return lm, lm.init(jax.random.PRNGKey(0))


def preference_data(n: int, seed: int) -> PreferenceBatch:
    """n triples sharing a prompt of 4–7 tokens, responses of 2–7 tokens, right-padded to T_PAD."""
    rng = np.random.default_rng(seed)
    sides = []
    prompts = [rng.integers(3, V, rng.integers(4, 8)) for _ in range(n)]
    for _ in range(2):
        tokens = np.zeros((n, T_PAD), np.int32)
        attention = np.zeros((n, T_PAD), np.int32)
        response = np.zeros((n, T_PAD), np.int32)
        for i, prompt in enumerate(prompts):
            resp = rng.integers(3, V, rng.integers(2, 8))
            ids = np.concatenate([prompt, resp])
            tokens[i, : len(ids)] = ids
            attention[i, : len(ids)] = 1
            response[i, len(prompt) : len(ids)] = 1
        sides.append(PairBatch(tokens, attention, response))
    return PreferenceBatch(*sides)


def exgrm_data(pairs: PreferenceBatch) -> PreferenceBatch:
    return PreferenceBatch(
        ExgrmBatch(pairs.chosen.tokens, pairs.chosen.attention_mask),
        ExgrmBatch(pairs.rejected.tokens, pairs.rejected.attention_mask),
    )


@pytest.fixture(scope="module")
def tiny():
    lm, params = tiny_lm()
    train_set, test_set = preference_data(20, 1), preference_data(8, 2)
    suite = EvalSuite.from_preferences({"train": train_set, "test": test_set})
    return lm, params, train_set, suite


def run(tiny, **options):
    lm, params, train_set, suite = tiny
    options = {"lr": 1e-2, "batch_size": 8, "micro_batch_size": 4, "bucket": 4, **options}
    extra = {k: options.pop(k) for k in ("run_dir", "resume", "callbacks", "answer_ids") if k in options}
    data = options.pop("data", train_set)
    suite = options.pop("suite", suite)
    return train(TrainConfig(**options), lm, params, data, suite, progress=False, **extra)


def evals(result):
    return [h for h in result.history if h["event"] == "eval"]


def max_moved(initial_lm_params, result) -> float:
    """max |θ_final − θ_initial| over the decoder leaves the result shares with the initial parameters (the EX-RM
    head, and an lm_head that untying adds, have no initial counterpart here)."""
    start = dict(jax.tree_util.tree_flatten_with_path(initial_lm_params)[0])
    moved = 0.0
    for path, leaf in jax.tree_util.tree_flatten_with_path(result.params["lm"])[0]:
        if path in start:
            moved = max(moved, float(np.max(np.abs(np.asarray(leaf) - np.asarray(start[path])))))
    return moved


# --------------------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------------------


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
    a, b = epoch_order(3, 1, 50), epoch_order(3, 1, 50)
    assert np.array_equal(a, b) and sorted(a.tolist()) == list(range(50))
    assert not np.array_equal(epoch_order(3, 1, 50), epoch_order(3, 2, 50))
    assert not np.array_equal(epoch_order(3, 1, 50), epoch_order(4, 1, 50))


def test_batch_plan_and_buckets():
    plan = batch_plan(np.arange(20), 8, 4)
    assert [[len(m) for m in step] for step in plan] == [[4, 4], [4, 4], [4]]
    assert np.array_equal(np.concatenate([np.concatenate(s) for s in plan]), np.arange(20))
    assert [bucket_length(n, 16, 80) for n in (1, 16, 17, 79, 80)] == [16, 16, 32, 80, 80]
    data = preference_data(6, 0)
    sets = [Rows(side.tokens, side.attention_mask) for side in (data.chosen, data.rejected)]
    chosen, rejected = take_rows(sets, np.array([4, 1]), 4)
    longest = max(data.chosen.attention_mask[[4, 1]].sum(1).max(), data.rejected.attention_mask[[4, 1]].sum(1).max())
    assert chosen.tokens.shape == rejected.tokens.shape == (2, -(-longest // 4) * 4)
    assert np.array_equal(chosen.tokens, data.chosen.tokens[[4, 1], : chosen.tokens.shape[1]])


def test_config_checks():
    with pytest.raises(ConfigError, match="must divide batch_size"):
        TrainConfig(batch_size=32, micro_batch_size=5)
    with pytest.raises(ConfigError, match="reward must be one of"):
        TrainConfig(reward="dpo")
    with pytest.raises(ConfigError, match="valid keys"):
        TrainConfig.from_dict({"lr": 1e-3, "learning_rate": 1})
    assert TrainConfig.from_dict(TrainConfig(lr=3e-5).to_dict()) == TrainConfig(lr=3e-5)
    # The paper's protocol is the default (docs/math.md §6).
    c = TrainConfig()
    assert (c.optimizer, c.lr, c.b1, c.b2, c.eps, c.weight_decay, c.beta, c.batch_size) == (
        "adam",
        1e-6,
        0.9,
        0.999,
        1e-8,
        0.0,
        0.01,
        32,
    )


def test_evaluate_rewards_averages_the_members():
    suite = EvalSuite({}, {"a": ("x", "y"), "b": ("x", "z")}, {"avg": ("a", "b")})
    rewards = {"x": np.array([1.0, 0.0]), "y": np.array([0.0, 0.0]), "z": np.array([2.0, 1.0])}
    out = evaluate_rewards(rewards, suite)
    assert out["a/rewards/accuracies"] == 0.75 and out["b/rewards/accuracies"] == 0.0
    assert out["avg/rewards/accuracies"] == 0.375
    assert out["a/loss"] == pytest.approx(np.mean(np.logaddexp(0, -np.array([1.0, 0.0]))))


# --------------------------------------------------------------------------------------------------------
# The fast path against dynamics.rewards (the reference)
# --------------------------------------------------------------------------------------------------------


def test_split_forward_equals_the_decoder():
    lm, params = tiny_lm()
    data = preference_data(5, 3).chosen
    full = lm.forward(params, data.tokens, data.attention_mask)
    for k in (0, 2, 3):
        x = jax.jit(lower_hidden, static_argnums=(0, 4))(lm, params, data.tokens, data.attention_mask, k)
        h = jax.jit(upper_hidden, static_argnums=(0, 4))(lm, params, x, data.attention_mask, k)
        np.testing.assert_allclose(np.asarray(h), np.asarray(full), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("kind", "spec"), [("ex", "last:1"), ("ex-mean", "all"), ("im", "last:1"), ("im", "all"), ("exgrm", "last:1")]
)
def test_fast_rewards_match_the_reference(tiny, kind, spec):
    from dynamics.training import add_lower_cache, build_reward_model

    lm, params, _, _ = tiny
    config = TrainConfig(reward=kind, params=spec, eval_batch_size=3, bucket=4)
    rm, p, spec = build_reward_model(config, lm, params, answer_ids=(5, 6))
    mask = trainable_mask(rm, p, spec)
    start = frozen_prefix(p, mask, lm.config.n_layers)
    assert start == (0 if spec == "all" else 2)
    compiled = compile_step(rm, start, OptimizerSpec.from_config(config))
    data = preference_data(7, 4).rejected
    rows = Rows.from_batch(data if kind != "exgrm" else ExgrmBatch(data.tokens, data.attention_mask))
    if start:
        rows = add_lower_cache(compiled, partition(p, mask)[1]["lm"], rows, 3, 4)
    if isinstance(rm, ImplicitRM):
        fast = sequence_logprobs(compiled, p["lm"], rows, config)
        reference = rm.policy_logprob(p, data)
    else:
        fast = score_set(compiled, p, rows, None, config)
        reference = rm.reward(p, data if kind != "exgrm" else ExgrmBatch(data.tokens, data.attention_mask))
    np.testing.assert_allclose(fast, np.asarray(reference), rtol=2e-5, atol=2e-6)


# --------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ex", "im", pytest.param("exgrm", marks=pytest.mark.slow)])
def test_loss_decreases(tiny, kind):
    lm, params, train_set, suite = tiny
    if kind == "exgrm":
        train_set = exgrm_data(train_set)
        sequences = {k: ExgrmBatch(v.tokens, v.attention_mask) for k, v in suite.sequences.items()}
        suite = EvalSuite(sequences, suite.comparisons)
    result = run(
        (lm, params, train_set, suite),
        reward=kind,
        params="last:2",
        epochs=4,
        answer_ids=(5, 6),
        data=train_set,
        suite=suite,
    )
    steps = [h for h in result.history if h["event"] == "train"]
    assert len(steps) == 4 * 3 and result.steps == 12
    first, last = evals(result)[0], evals(result)[-1]
    assert last["train/loss"] < first["train/loss"]
    if kind != "exgrm":  # the BT loss of the training set is the training objective
        assert last["train/loss"] < first["train/loss"] - 0.01
        assert last["train/rewards/accuracies"] > 0.5
    # Evaluations: start, each epoch end; every eval row has the TRL names.
    assert [h["step"] for h in evals(result)] == [0, 3, 6, 9, 12]
    assert {"test/rewards/accuracies", "test/rewards/margins", "test/loss"} <= set(last)
    assert result.timing["traces"]["apply"] <= 1


def bt_step_by_hand(rm, params, mask, data: PreferenceBatch, ref_c, ref_r, lr):
    """One SGD step on the batch-mean BT loss, computed with dynamics.rewards (an independent computation)."""
    train, frozen = partition(params, mask)

    def loss(t):
        p = jax.tree.map(lambda a, b: b if a is None else a, t, frozen, is_leaf=lambda x: x is None)
        if isinstance(rm, ImplicitRM):
            return bt_loss(rm.reward(p, data.chosen, ref_c), rm.reward(p, data.rejected, ref_r))
        return bt_loss(rm.reward(p, data.chosen), rm.reward(p, data.rejected))

    grads = jax.grad(loss)(train)
    return jax.tree.map(lambda p, g: p - lr * g, train, grads)


@pytest.mark.parametrize("kind", ["ex", "im"])
def test_accumulated_step_equals_the_full_batch_step(tiny, kind):
    lm, params, train_set, _ = tiny
    common = dict(reward=kind, optimizer="sgd", lr=0.5, epochs=1, max_steps=1, batch_size=8, params="last:1")
    full = run(tiny, micro_batch_size=8, suite=EvalSuite({}, {}), **common)
    accumulated = run(tiny, micro_batch_size=2, suite=EvalSuite({}, {}), **common)
    # The same rows, by hand: SGD on the batch-mean BT loss of dynamics.rewards.
    config = TrainConfig(reward=kind, params="last:1")
    from dynamics.training import build_reward_model

    rm, p, spec = build_reward_model(config, lm, params)
    mask = trainable_mask(rm, p, spec)
    rows = batch_plan(epoch_order(0, 0, 20), 8, 8)[0][0]
    batch = train_set.select(rows)
    ref_c = ref_r = None
    if isinstance(rm, ImplicitRM):
        ref_c, ref_r = rm.reference_logprob(p, batch.chosen), rm.reference_logprob(p, batch.rejected)
    by_hand = bt_step_by_hand(rm, p, mask, batch, ref_c, ref_r, 0.5)
    by_hand = {k: v for k, v in by_hand.items() if k != "ref"}
    mask = {k: v for k, v in mask.items() if k != "ref"}
    for path, a, b, c in zip(
        jax.tree_util.tree_flatten_with_path(by_hand)[0],
        jax.tree.leaves(by_hand),
        jax.tree.leaves(partition(full.params, mask)[0]),
        jax.tree.leaves(partition(accumulated.params, mask)[0]),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(c), np.asarray(b), rtol=1e-5, atol=1e-7, err_msg=str(path[0]))
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6, err_msg=str(path[0]))
    assert full.history[0]["loss"] == pytest.approx(accumulated.history[0]["loss"], rel=1e-6)
    # the step moved the trainable leaves by far more than the comparison's tolerance (atol 1e-6 + rtol 1e-4·|θ|)
    initial = partition({k: v for k, v in p.items() if k != "ref"}, mask)[0]
    ratios = [
        float(np.max(np.abs(np.asarray(b) - np.asarray(a)) / (1e-6 + 1e-4 * np.abs(np.asarray(a)))))
        for a, b in zip(jax.tree.leaves(initial), jax.tree.leaves(partition(full.params, mask)[0]), strict=True)
    ]
    assert max(ratios) > 100, ratios


@pytest.mark.parametrize(
    ("kind", "spec"), [("ex", "head"), ("im", "last:2"), pytest.param("im", "unembed", marks=pytest.mark.slow)]
)
def test_masks_freeze_what_they_should(tiny, kind, spec):
    lm, params, _, _ = tiny
    result = run(tiny, reward=kind, params=spec, epochs=1, suite=EvalSuite({}, {}))
    config = TrainConfig(reward=kind, params=spec)
    from dynamics.training import build_reward_model

    rm, initial, spec = build_reward_model(config, lm, params)
    mask = trainable_mask(rm, initial, spec)
    drop_ref = lambda tree: {k: v for k, v in tree.items() if k != "ref"}  # π_ref is not part of the result
    flat_mask = jax.tree.leaves(drop_ref(mask))
    before = jax.tree_util.tree_flatten_with_path(drop_ref(initial))[0]
    after = jax.tree.leaves(result.params)
    assert len(before) == len(after) == len(flat_mask)
    changed = 0
    for (path, a), b, m in zip(before, after, flat_mask, strict=True):
        same = np.array_equal(np.asarray(a), np.asarray(b))
        if not m:
            assert same, f"frozen {jax.tree_util.keystr(path)} changed"
        changed += not same
    assert changed == sum(flat_mask)  # every trainable leaf moved


def test_im_rm_at_initialization_ties_everywhere(tiny):
    result = run(tiny, reward="im", params="all", max_steps=1)
    start = evals(result)[0]
    assert start["step"] == 0
    for name in ("train", "test"):
        assert start[f"{name}/rewards/accuracies"] == 0.5
        assert start[f"{name}/rewards/ties"] == 1.0
        assert start[f"{name}/rewards/chosen"] == 0.0 and start[f"{name}/rewards/rejected"] == 0.0
    # ... and also with the frozen-block cache (last:2) and the reference-free variant's log-probs.
    cached = run(tiny, reward="im", params="last:2", max_steps=1)
    assert evals(cached)[0]["test/rewards/ties"] == 1.0 and cached.timing["frozen_blocks_cached"] == 1


# --------------------------------------------------------------------------------------------------------
# Run directory, checkpoints and resuming
# --------------------------------------------------------------------------------------------------------


def read_log(run_dir: Path) -> list[str]:
    return (run_dir / "metrics.jsonl").read_text().splitlines()


class Interrupt:
    """A callback that raises KeyboardInterrupt after `at` steps (as Ctrl-C would)."""

    def __init__(self, at: int):
        self.at = at

    def __call__(self, info):
        if info.step == self.at:
            raise KeyboardInterrupt


@pytest.mark.parametrize(("kind", "at", "every"), [("im", 4, 0), ("ex", 2, 2)])
def test_interrupted_run_resumes_to_the_same_result(tiny, tmp_path, kind, at, every):
    options = dict(reward=kind, params="last:2", epochs=3, checkpoint_every_steps=every, eval_every_steps=2)
    whole = run(tiny, run_dir=tmp_path / "whole", **options)
    with pytest.raises(KeyboardInterrupt):
        run(tiny, run_dir=tmp_path / "cut", callbacks=[Interrupt(at)], **options)
    latest = json.loads((tmp_path / "cut/checkpoints/latest.json").read_text())
    assert latest["step"] == at  # saved at the interrupted step boundary
    assert not (tmp_path / "cut/summary.json").exists()
    with pytest.raises(ConfigError, match="already holds a run"):
        run(tiny, run_dir=tmp_path / "cut", **options)
    with pytest.raises(ConfigError, match="train.lr"):
        run(tiny, run_dir=tmp_path / "cut", resume=True, **{**options, "lr": 0.5})
    resumed = run(tiny, run_dir=tmp_path / "cut", resume=True, **options)
    assert resumed.resumed_from_step == at
    assert read_log(tmp_path / "cut") == read_log(tmp_path / "whole")  # every metric, bit for bit
    summary = json.loads((tmp_path / "cut/summary.json").read_text())
    assert summary["final_eval"] == json.loads((tmp_path / "whole/summary.json").read_text())["final_eval"]
    for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(resumed.params), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert max_moved(tiny[1], whole) > 1e-3  # bitwise equal, and not because neither run moved
    config = json.loads((tmp_path / "cut/config.json").read_text())
    assert {"train", "model", "mask", "data", "reward_model", "initial_params_sha256", "versions"} <= set(config)
    meta = json.loads((tmp_path / "cut/checkpoints" / latest_name(tmp_path / "cut") / "meta.json").read_text())
    assert meta["step"] == 9 and meta["data_order"] == epoch_order(0, 2, 20).tolist()
    # A finished run resumed again changes nothing.
    again = run(tiny, run_dir=tmp_path / "cut", resume=True, **options)
    assert again.steps == 9 and read_log(tmp_path / "cut") == read_log(tmp_path / "whole")


def latest_name(run_dir: Path) -> str:
    return json.loads((run_dir / "checkpoints/latest.json").read_text())["checkpoint"]


_CHILD = """
import sys, time
sys.path.insert(0, {tests!r})
import jax
from test_train import tiny_lm, preference_data, TrainConfig, EvalSuite, train
lm, params = tiny_lm()
data, test = preference_data(20, 1), preference_data(8, 2)
suite = EvalSuite.from_preferences({{"train": data, "test": test}})
config = TrainConfig(**{options!r})
train(config, lm, params, data, suite, run_dir={run_dir!r}, progress=False, callbacks=[lambda i: time.sleep(0.3)])
"""


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_same_result(tiny, tmp_path):
    options = dict(
        reward="im",
        params="last:2",
        epochs=4,
        lr=1e-2,
        batch_size=8,
        micro_batch_size=4,
        bucket=4,
        checkpoint_every_steps=1,
        eval_every_steps=2,
    )
    whole = run(tiny, run_dir=tmp_path / "whole", **options)
    script = _CHILD.format(tests=str(Path(__file__).parent), options=options, run_dir=str(tmp_path / "cut"))
    child = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "JAX_PLATFORMS": "cpu"})
    log = tmp_path / "cut/metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and child.poll() is None:
        if log.exists() and sum('"train"' in line for line in log.read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    assert child.poll() is None, "the child finished before it could be killed"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert not (tmp_path / "cut/summary.json").exists()
    resumed = run(tiny, run_dir=tmp_path / "cut", resume=True, **options)
    assert 0 < resumed.resumed_from_step < 12
    assert read_log(tmp_path / "cut") == read_log(tmp_path / "whole")
    for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(resumed.params), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert max_moved(tiny[1], whole) > 1e-3  # bitwise equal, and not because neither run moved


# --------------------------------------------------------------------------------------------------------
# Bad input fails before training
# --------------------------------------------------------------------------------------------------------


def test_empty_evaluation_set_fails_before_training(tiny, tmp_path):
    lm, params, train_set, _ = tiny
    empty = preference_data(3, 9).select(np.arange(0))
    suite = EvalSuite.from_preferences({"train": train_set, "held-out": empty})
    calls = []
    with pytest.raises(DataError, match="'held-out/chosen' has no rows"):
        train(TrainConfig(), lm, params, train_set, suite, run_dir=tmp_path / "r", callbacks=[calls.append])
    assert calls == [] and not (tmp_path / "r").exists()
    with pytest.raises(DataError, match="training set has no rows"):
        train(TrainConfig(), lm, params, train_set.select(np.arange(0)), None, progress=False)
    bad = EvalSuite({"a": train_set.chosen}, {"c": ("a", "missing")})
    with pytest.raises(DataError, match="unknown set 'missing'"):
        train(TrainConfig(), lm, params, train_set, bad, progress=False)


def test_final_metrics_hook_adds_to_the_final_evaluation(tiny, tmp_path):
    """`final_metrics` sees the final parameters once; its metrics land in final_eval and summary.json, also when a
    finished run is resumed; a non-float or non-finite value is a clear error."""
    lm, params, train_set, suite = tiny
    config = TrainConfig(lr=1e-2, batch_size=8, micro_batch_size=4, bucket=4, epochs=1)
    seen = []

    def hook(final_params):
        seen.append(final_params)
        return {"extra/norm": np.float32(2.5), "extra/count": 3}

    result = train(config, lm, params, train_set, suite, run_dir=tmp_path / "r", final_metrics=hook, progress=False)
    assert len(seen) == 1 and seen[0] is result.params
    assert result.final_eval["extra/norm"] == 2.5 and result.final_eval["extra/count"] == 3.0
    assert "train/rewards/accuracies" in result.final_eval
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["final_eval"]["extra/norm"] == 2.5 and summary["final_eval"]["extra/count"] == 3.0
    again = train(
        config, lm, params, train_set, suite, run_dir=tmp_path / "r", resume=True, final_metrics=hook, progress=False
    )
    assert len(seen) == 2 and again.final_eval == result.final_eval
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["final_eval"]["extra/norm"] == 2.5
    with pytest.raises(DataError, match="extra/bad.*not finite"):
        train(config, lm, params, train_set, suite, final_metrics=lambda p: {"extra/bad": float("nan")}, progress=False)
    with pytest.raises(ConfigError, match="extra/bad.*not a real number"):
        train(config, lm, params, train_set, suite, final_metrics=lambda p: {"extra/bad": "0.5"}, progress=False)
    with pytest.raises(ConfigError, match="already has"):
        train(config, lm, params, train_set, suite, final_metrics=lambda p: {"train/loss": 1.0}, progress=False)


def test_ctrl_c_is_held_back_inside_a_state_update(default_sigint):
    from dynamics.training import deferred_interrupt

    done = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupt():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            done.append(True)  # the block finishes before the interrupt is raised
    assert done == [True]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def varied_length_data(n: int, seed: int, T: int = 64) -> PreferenceBatch:
    """n triples with prompts of 3–40 tokens and responses of 2–20 tokens: dozens of distinct lengths."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, V, rng.integers(3, 41)) for _ in range(n)]
    sides = []
    for _ in range(2):
        tokens, attention, response = (np.zeros((n, T), np.int32) for _ in range(3))
        for i, prompt in enumerate(prompts):
            ids = np.concatenate([prompt, rng.integers(3, V, rng.integers(2, 21))])
            tokens[i, : len(ids)], attention[i, : len(ids)], response[i, len(prompt) : len(ids)] = ids, 1, 1
        sides.append(PairBatch(tokens, attention, response))
    return PreferenceBatch(*sides)


def test_varied_lengths_compile_a_handful_of_times():
    """Issue 7: lengths are bucketed, so a data set of ~40 distinct lengths compiles once per shape bucket.

    With bucket 16, T ∈ {16, 32, 48, 64} and the response length R ∈ {16, 32}: at most 8 shapes, each traced by
    the first and the accumulating micro-step (≤ 16 traces), however many distinct lengths the data has. Without
    bucketing (bucket 1) more shapes appear. A second run on the same data traces nothing.
    """
    lm, params = tiny_lm()
    data = varied_length_data(32, 11)
    lengths = np.concatenate([data.chosen.attention_mask.sum(1), data.rejected.attention_mask.sum(1)])
    assert len(np.unique(lengths)) >= 25
    suite = EvalSuite.from_preferences({"train": data})
    options = {"reward": "im", "params": "last:1", "lr": 1e-3, "epochs": 2, "batch_size": 8, "micro_batch_size": 4}

    def traces(**extra):
        result = train(TrainConfig(**options, **extra), lm, params, data, suite, progress=False)
        return result.timing["traces"]

    bucketed = traces(bucket=16)
    assert 1 <= bucketed["micro_step"] <= 16, bucketed
    assert bucketed["apply"] <= 1
    again = traces(bucket=16)
    assert again["micro_step"] == 0 and again["apply"] == 0 and again["logprob"] == 0, again
    unbucketed = traces(bucket=1)
    assert unbucketed["micro_step"] > bucketed["micro_step"], (unbucketed, bucketed)

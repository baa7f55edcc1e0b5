"""TrainConfig.pass_positions: a micro-batch run as several forward/backward passes gives the same step.

`split_passes` is checked by hand and on random sizes; training with micro-batches cut into passes is checked
against the same micro-batches run in one pass, in float64, for EX-RM and IM-RM, packed and not, with the
frozen-block cache, and with a short last micro-batch. (The 8-device mesh case is in tests/test_sharding.py.)
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from dynamics.errors import ConfigError
from dynamics.training import CPU_PASS_POSITIONS, EvalSuite, TrainConfig, pass_limit, split_passes, train
from tests.test_packing import _lm, _pairs


def test_split_passes_by_hand():
    rows = np.arange(10, 18)
    # 8 pairs of 192 packed positions against the 1024 limit: two passes of 4
    assert [list(p) for p in split_passes(rows, 8 * 192, 1024)] == [list(range(10, 14)), list(range(14, 18))]
    assert [list(p) for p in split_passes(rows, 8 * 192, 0)] == [list(rows)]  # no limit
    assert [list(p) for p in split_passes(rows, 1024, 1024)] == [list(rows)]  # fits
    # ⌈1000 / 300⌉ = 4 passes of 10 pairs: near-equal sizes 3, 3, 2, 2
    sizes = [len(p) for p in split_passes(np.arange(10), 1000, 300)]
    assert sizes == [3, 3, 2, 2]
    # on 2 devices every pass holds a multiple of 2 pairs
    assert [len(p) for p in split_passes(np.arange(8), 800, 100, unit=2)] == [2, 2, 2, 2]
    assert [len(p) for p in split_passes(np.arange(6), 600, 250, unit=2)] == [2, 2, 2]
    # a short last micro-batch that the devices do not divide runs whole
    assert [len(p) for p in split_passes(np.arange(3), 600, 100, unit=2)] == [3]
    # one pair over the limit cannot be cut
    assert [len(p) for p in split_passes(np.arange(1), 5000, 100)] == [1]


@pytest.mark.parametrize("seed", range(20))
def test_split_passes_covers_the_rows_in_order(seed):
    rng = np.random.default_rng(seed)
    unit = int(rng.integers(1, 4))
    n = unit * int(rng.integers(1, 12))
    per_pair = int(rng.integers(16, 300))
    limit = int(rng.integers(1, 3000))
    rows = rng.permutation(100)[:n]
    passes = split_passes(rows, n * per_pair, limit, unit)
    np.testing.assert_array_equal(np.concatenate(passes), rows)
    assert all(len(p) % unit == 0 and len(p) > 0 for p in passes)
    assert max(len(p) for p in passes) - min(len(p) for p in passes) <= unit  # near-equal: ≤ 2 shapes
    if n * per_pair > limit:  # the fewest passes that fit, when units allow it
        need = -(-n * per_pair // limit)
        assert len(passes) == min(need, n // unit)
        if need <= n // unit:
            assert all(len(p) * per_pair <= limit + unit * per_pair for p in passes)
    else:
        assert len(passes) == 1


def test_pass_limit_defaults_by_backend():
    assert pass_limit(TrainConfig(), backend="cpu") == CPU_PASS_POSITIONS == 1024
    assert pass_limit(TrainConfig(), backend="gpu") == 0
    assert pass_limit(TrainConfig(pass_positions=0), backend="cpu") == 0
    assert pass_limit(TrainConfig(pass_positions=300), backend="gpu") == 300
    for bad in (-1, True, 2.5, "1024"):
        with pytest.raises(ConfigError, match="pass_positions"):
            TrainConfig(pass_positions=bad)


@pytest.mark.parametrize(
    ("reward", "params", "pack"),
    [
        ("im", "all", True),
        ("im", "all", False),
        ("ex", "all", True),
        ("ex", "last:1", True),
        ("im-noref", "last:2", False),
    ],
)
def test_training_in_passes_ends_at_the_same_parameters(x64, reward, params, pack):
    """Micro-batches of 4 pairs cut into passes of 1–2 pairs (pass_positions = 40) against one pass each:
    the same losses, evaluation and final parameters (float64, 1e-10). 5 pairs and batches of 4: every epoch
    ends with a short micro-batch of 1 pair (one pass). "last:1" runs the frozen lower blocks from the cache."""
    lm, params0 = _lm("llama")
    data = _pairs("right", seed=2)
    suite = EvalSuite.from_preferences({"train": data})
    common = dict(reward=reward, params=params, lr=1e-2, epochs=2, batch_size=4, micro_batch_size=4, bucket=4,
                  eval_at_start=False, pack_pairs=pack, head_init_std=0.3)  # fmt: skip
    whole = train(TrainConfig(**common, pass_positions=0), lm, params0, data, suite, progress=False)
    cut = train(TrainConfig(**common, pass_positions=40), lm, params0, data, suite, progress=False)
    assert whole.timing["passes"] == 4  # 2 epochs × (4 + 1 pairs): one pass per micro-batch
    assert cut.timing["passes"] >= 6, cut.timing  # each micro-batch of 4 pairs ran as ≥ 2 passes
    assert cut.timing["pass_positions"] == 40 and whole.timing["pass_positions"] == 0
    if params == "last:1":
        assert cut.timing["frozen_blocks_cached"] == whole.timing["frozen_blocks_cached"] > 0
    losses = [[h["loss"] for h in r.history if h["event"] == "train"] for r in (whole, cut)]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-10)
    for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(cut.params), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-10, atol=1e-12)
    assert cut.final_eval == pytest.approx(whole.final_eval, rel=1e-9)
    # and the step did move the parameters: the comparison is not between two copies of the start
    start = dict(jax.tree_util.tree_flatten_with_path(params0)[0])
    moved = max(float(np.max(np.abs(np.asarray(a) - np.asarray(start[path]))))
                for path, a in jax.tree_util.tree_flatten_with_path(whole.params["lm"])[0]
                if path in start)  # ("last:K" adds an untied lm_head)  # fmt: skip
    assert moved > 1e-6

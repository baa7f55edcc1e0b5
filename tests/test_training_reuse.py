"""Runs of one process reuse the frozen blocks' output and π_ref's log-probs (dynamics.training.reuse): a second
run on the same model and data computes neither again, and ends exactly where a run that computed them ends; a run
on other data or other frozen weights computes its own."""

from __future__ import annotations

import jax
import numpy as np
from test_attribution_run import _world

from dynamics.training import EvalSuite, TrainConfig, reuse, train


def _run(lm, params, data, evalset, seed, reward="im"):
    options = {"reward": reward, "params": "last:1", "optimizer": "adam", "lr": 1e-3, "epochs": 2, "batch_size": 4,
               "micro_batch_size": 4, "bucket": 16, "pack_pairs": False, "seed": seed}  # fmt: skip
    suite = EvalSuite.from_preferences({"eval": evalset})
    return train(TrainConfig(**options), lm, params, data, suite, run_dir=None, progress=False)


def test_a_second_run_reuses_and_matches_a_fresh_one(x64):
    from dynamics.text import PreferenceBatch

    lm, params, data, evalset = _world(seed=11)
    evalset = PreferenceBatch(evalset.chosen, evalset.rejected)
    reuse.clear()
    first = _run(lm, params, data, evalset, seed=1)
    kept = reuse.stats()
    assert kept["misses"] == 8 and kept["hits"] == 0  # 4 row sets (pairs ±, eval ±) × (frozen blocks, ln π_ref)
    second = _run(lm, params, data, evalset, seed=2)
    assert reuse.stats()["hits"] == 8 and reuse.stats()["misses"] == 8
    assert second.timing["traces"]["lower"] == 0  # the frozen blocks never ran again
    reuse.clear()
    fresh = _run(lm, params, data, evalset, seed=2)
    assert reuse.stats()["misses"] == 8
    assert fresh.final_eval == second.final_eval  # bitwise: the kept arrays are the ones a fresh run computes
    np.testing.assert_array_equal(fresh.final_rewards["eval/chosen"], second.final_rewards["eval/chosen"])
    assert first.history[0]["eval/rewards/margins"] == 0.0 == second.history[0]["eval/rewards/margins"]  # r = 0 at θ_0
    other = jax.tree.map(lambda a: a * 1.01, params)
    _run(lm, other, data, evalset, seed=2)
    assert reuse.stats()["misses"] == 16  # other frozen weights: computed again
    reuse.clear()


def test_an_ex_rm_shares_the_frozen_blocks_of_an_im_rm(x64):
    """The frozen-block key covers the embedding and the lower blocks only: an EX-RM run after an IM-RM run on the
    same model and data computes no frozen block (and needs no ln π_ref)."""
    from dynamics.text import PreferenceBatch

    lm, params, data, evalset = _world(seed=12)
    evalset = PreferenceBatch(evalset.chosen, evalset.rejected)
    reuse.clear()
    _run(lm, params, data, evalset, seed=1, reward="im")
    before = reuse.stats()
    ex = _run(lm, params, data, evalset, seed=1, reward="ex")
    assert reuse.stats()["hits"] == before["hits"] + 4 and reuse.stats()["misses"] == before["misses"]
    assert ex.timing["traces"]["lower"] == 0
    reuse.clear()

"""Attribution along a real run of the trainer (docs/math.md §10.3), on tiny random models in float64.

- SGD, all parameters, a checkpoint every step: the predicted change of every eval margin correlates with the
  actual one (Pearson ≥ 0.99), and the error is O(η²) per step (halving η quarters it);
- Adam: the update direction comes from the saved μ, ν (Pearson ≥ 0.99);
- EX-RM with the head alone trained is linear in its parameters: the along-run prediction is exact, and the
  linearised trajectory of §10.4 (kernels at θ_0, the trainer's batch order) equals the run at every checkpoint;
- a run of another reward type, other training data or with checkpoints deleted is refused by name.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_delta import _config, _pairs

from dynamics.attribution.along_run import attribute_run, load_run_model
from dynamics.attribution.evalset import EvalSet
from dynamics.attribution.trajectory import linearised_kernels, linearised_trajectory, training_batches
from dynamics.errors import ConfigError
from dynamics.models import LM, cast_params
from dynamics.text import PreferenceBatch
from dynamics.training import TrainConfig, train


def _world(n_train: int = 8, n_eval: int = 6, seed: int = 4):
    lm = LM(_config())
    params = cast_params(lm.init(jax.random.PRNGKey(seed)), jnp.float64)
    rng = np.random.default_rng(seed)
    data = PreferenceBatch(_pairs(rng, n_train, 9, 4), _pairs(rng, n_train, 9, 4))
    evalset = EvalSet(_pairs(rng, n_eval, 10, 3), _pairs(rng, n_eval, 10, 3))
    return lm, params, data, evalset


def _train(tmp_path, name, lm, lm_params, data, **options):
    options = {
        "reward": "ex", "params": "all", "optimizer": "sgd", "lr": 1e-4, "epochs": 2, "batch_size": 4,
        "micro_batch_size": 4, "bucket": 16, "pack_pairs": False, "head_init_std": 0.3, "checkpoint_every_steps": 1,
        "keep_checkpoints": 1000, "eval_at_start": False, "seed": 3, **options,
    }  # fmt: skip
    run_dir = tmp_path / name
    train(TrainConfig(**options), lm, lm_params, data, None, run_dir=run_dir, progress=False)
    return run_dir


def test_sgd_run_prediction_is_first_order(x64, tmp_path):
    lm, params, data, evalset = _world()
    errors = []
    for lr in (2e-4, 1e-4):
        run_dir = _train(tmp_path, f"sgd{lr}", lm, params, data, lr=lr)
        res = attribute_run(run_dir, lm, params, data, evalset, reward="ex", block=4)
        assert res.contribution.shape == (6, 8) and res.checkpoint_steps.tolist() == list(range(5))
        assert res.meta["complete"] and res.meta["optimizer"] == "sgd"
        np.testing.assert_array_equal(res.other, 0.0)
        np.testing.assert_allclose(res.interval_predicted.sum(axis=0), res.predicted_change, rtol=1e-12)
        np.testing.assert_allclose(np.diff(res.eval_value, axis=0).sum(axis=0), res.actual_change, atol=1e-12)
        assert np.abs(res.actual_change).max() > 1e-3
        assert res.pearson >= 0.99, res.pearson
        errors.append(np.abs(res.predicted_change - res.actual_change).max())
    assert 3.0 < errors[0] / errors[1] < 5.0, errors  # O(η²) per step: halving η quarters the error
    d = res.to_dict()
    assert d["pearson"] == pytest.approx(res.pearson) and len(d["predicted_change"]) == 6


def test_adam_run_prediction(x64, tmp_path):
    lm, params, data, evalset = _world(seed=5)
    run_dir = _train(tmp_path, "adam", lm, params, data, reward="im", beta=1.0, optimizer="adam", lr=1e-4)
    res = attribute_run(run_dir, lm, params, data, evalset, block=4)
    assert res.meta["reward"] == "im" and res.eval_value[0].tolist() == [0.0] * 6  # π = π_ref at the start
    assert np.abs(res.other).max() > 0  # Adam's momentum carries part of the change after step 1
    assert np.abs(res.actual_change).max() > 1e-3
    assert res.pearson >= 0.99, res.pearson
    assert np.abs(res.predicted_change - res.actual_change).max() < 0.05 * np.abs(res.actual_change).max()


def test_linear_model_is_exact_and_follows_the_linearised_trajectory(x64, tmp_path):
    """EX-RM, head only: q and every margin are linear in u, so both predictions are exact for a large η."""
    lm, params, data, evalset = _world(seed=6)
    run_dir = _train(tmp_path, "head", lm, params, data, params="head", lr=0.5, epochs=3)
    res = attribute_run(run_dir, lm, params, data, evalset, block=4)
    scale = np.abs(res.actual_change).max()
    assert scale > 0.1
    np.testing.assert_allclose(res.predicted_change, res.actual_change, rtol=0, atol=1e-11 * scale)
    # §10.4: kernels at θ_0 and the trainer's own batch order reproduce the run checkpoint by checkpoint
    run = load_run_model(run_dir, lm, params, data)
    k = linearised_kernels(run.rm, run.params, data, evalset, params_spec="head", block=4)
    batches = training_batches(run.config, data.batch_size)
    lin = linearised_trajectory(k.train_kernel, k.eval_kernel, k.train_margin, k.eval_value, lr=0.5, batches=batches)
    np.testing.assert_allclose(lin.eval_value[res.checkpoint_steps], res.eval_value, rtol=0, atol=1e-11 * scale)


def test_run_of_another_kind_or_data_is_refused(x64, tmp_path):
    lm, params, data, evalset = _world()
    run_dir = _train(tmp_path, "ex", lm, params, data, epochs=1, keep_checkpoints=1)
    with pytest.raises(ConfigError, match=rf"run directory {run_dir} was trained with reward ex, not im"):
        attribute_run(run_dir, lm, params, data, evalset, reward="im")
    other = PreferenceBatch(data.rejected, data.chosen)
    with pytest.raises(ConfigError, match="training pairs differ"):
        attribute_run(run_dir, lm, params, other, evalset)
    with pytest.raises(ConfigError, match="initial parameters differ"):
        attribute_run(run_dir, lm, jax.tree.map(lambda a: a * 1.01, params), data, evalset)
    with pytest.raises(ConfigError, match=r"lacks the checkpoints of steps \[1\].*keep_checkpoints=1"):
        attribute_run(run_dir, lm, params, data, evalset)
    with pytest.raises(ConfigError, match="config.json: no such file"):
        attribute_run(tmp_path / "nothing", lm, params, data, evalset)

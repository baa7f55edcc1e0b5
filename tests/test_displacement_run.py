"""Likelihood displacement along a real run (dynamics.displacement_run, docs/math.md §12.1), on tiny random models
in float64.

- the actual change is ln π of the run's final checkpoint minus ln π at θ_0, computed here with
  `response_logprob` from the checkpoint's own file;
- the prediction (one JVP per interval through the run's optax optimizer) equals the along-run attribution's
  (per-sequence gradients and explicit inner products, `attribute_run`) over β, for SGD and Adam: two independent
  implementations of the same linearisation;
- it is first order: halving η quarters the error of an SGD run with a checkpoint every step;
- SimPO: the change is |y| Δr / β of its length-normalised reward, i.e. again ln π's own change;
- an EX-RM run, other training data, missing checkpoints and a bad chunk size are refused by name.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_attribution_run import _train, _world

from dynamics.attribution.along_run import attribute_run
from dynamics.attribution.evalset import EvalSet
from dynamics.displacement import concat_pairs
from dynamics.displacement_run import displacement_along_run
from dynamics.errors import ConfigError
from dynamics.rewards import response_logprob
from dynamics.text import PreferenceBatch


def _final_lm_params(run_dir, lm, params, data):
    from dynamics.attribution.along_run import load_run_model

    run = load_run_model(run_dir, lm, params, data)
    last = max(run.checkpoints)
    return run.params_at(run.state(last)[0])["lm"]


def _logprob_change(lm, before, after, batch):
    return np.asarray(response_logprob(lm, after, batch) - response_logprob(lm, before, batch))


def test_actual_is_the_checkpoints_change_and_prediction_matches_attribution(x64, tmp_path):
    lm, params, data, evalset = _world(seed=7)
    for optimizer, lr in (("sgd", 3e-4), ("adam", 1e-4)):
        run_dir = _train(tmp_path, optimizer, lm, params, data, reward="im", beta=0.5, optimizer=optimizer, lr=lr)
        res = displacement_along_run(run_dir, lm, params, data, eval_responses=evalset.chosen, chunk_size=3)
        assert res.path_steps.tolist() == list(range(5)) and res.meta["complete"]
        final = _final_lm_params(run_dir, lm, params, data)
        for batch, got in ((data.chosen, res.actual_chosen), (data.rejected, res.actual_rejected),
                           (evalset.chosen, res.actual_eval)):  # fmt: skip
            np.testing.assert_allclose(got, _logprob_change(lm, params, final, batch), rtol=1e-9, atol=1e-12)
        # the same linearisation by per-sequence gradients: attribute_run on the responses as eval items, over β
        responses = EvalSet(concat_pairs([data.chosen, data.rejected, evalset.chosen]))
        ref = attribute_run(run_dir, lm, params, data, responses, block=4)
        ours = np.concatenate([res.chosen, res.rejected, res.eval])
        np.testing.assert_allclose(ours, ref.predicted_change / 0.5, rtol=1e-7, atol=1e-12)
        np.testing.assert_allclose(res.path_predicted[1:] - res.path_predicted[:-1],
                                   ref.interval_predicted / 0.5, rtol=1e-7, atol=1e-12)  # fmt: skip
        np.testing.assert_allclose(res.path_actual, (ref.eval_value - ref.eval_value[0]) / 0.5, atol=1e-12)
        assert np.abs(res.actual_chosen).max() > 1e-3
        assert np.corrcoef(ours, np.concatenate([res.actual_chosen, res.actual_rejected, res.actual_eval]))[0, 1] > 0.99


def test_prediction_is_first_order_along_an_sgd_run(x64, tmp_path):
    lm, params, data, _ = _world(seed=8)
    errors = []
    for lr in (4e-4, 2e-4):
        run_dir = _train(tmp_path, f"sgd{lr}", lm, params, data, reward="im", beta=1.0, lr=lr)
        res = displacement_along_run(run_dir, lm, params, data)
        errors.append(
            max(np.abs(res.chosen - res.actual_chosen).max(), np.abs(res.rejected - res.actual_rejected).max())
        )
        assert res.eval is None and res.summary()["sign_agreement_chosen"] == 1.0
    assert 3.0 < errors[0] / errors[1] < 5.0, errors  # O(η²) per step


def test_simpo_run_gives_the_log_likelihood_change(x64, tmp_path):
    lm, params, data, _ = _world(seed=9)
    run_dir = _train(tmp_path, "simpo", lm, params, data, reward="im", beta=2.0, objective="simpo", gamma=0.5,
                     lr=1e-3)  # fmt: skip
    res = displacement_along_run(run_dir, lm, params, data)
    final = _final_lm_params(run_dir, lm, params, data)
    np.testing.assert_allclose(res.actual_chosen, _logprob_change(lm, params, final, data.chosen), rtol=1e-9)
    assert np.abs(res.chosen - res.actual_chosen).max() < 0.05 * np.abs(res.actual_chosen).max()


def test_bad_runs_are_refused(x64, tmp_path):
    lm, params, data, _ = _world()
    ex = _train(tmp_path, "ex", lm, params, data, epochs=1)
    with pytest.raises(ConfigError, match=rf"run directory {ex} was trained with reward ex, not im"):
        displacement_along_run(ex, lm, params, data)
    im = _train(tmp_path, "im", lm, params, data, reward="im", epochs=1, keep_checkpoints=1)
    with pytest.raises(ConfigError, match=r"lacks the checkpoints of steps \[1\]"):
        displacement_along_run(im, lm, params, data)
    with pytest.raises(ConfigError, match="training pairs differ"):
        displacement_along_run(im, lm, params, PreferenceBatch(data.rejected, data.chosen))
    with pytest.raises(ConfigError, match="chunk_size must be ≥ 1"):
        displacement_along_run(im, lm, params, data, chunk_size=0)
    res = displacement_along_run(im, lm, params, data, require_all=False)
    assert res.path_steps.tolist() == [0, 2] and res.meta["longest_interval"] == 2


def test_the_command_along_a_run(tmp_path, capsys):
    """`rmdyn displacement --run DIR`: the run's own settings, the actual change read from its last checkpoint
    (recomputed here from the checkpoint file), the path figure; a one-step flag or an EX-RM run refused."""
    import json

    from _tiny_hf import tiny_hf_dir

    from dynamics.datasets import load_preferences
    from dynamics.loading import load
    from experiments import cli
    from experiments.studies import one_step

    tiny = tiny_hf_dir(tmp_path / "tiny")
    loaded = load(str(tiny))
    rows = [("Is the sky blue?", "Yes, it is.", "No."), ("Is 2+2=4?", "Yes.", "No, it is 5."),
            ("Do cats bark?", "No, they meow.", "Yes, loudly."), ("Is ice cold?", "Yes.", "No, hot.")]  # fmt: skip
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in rows))
    data = one_step.encode_triples(loaded, load_preferences(path))
    run_dir = _train(tmp_path, "run", loaded.lm, loaded.params, data, reward="im", beta=0.5, lr=3e-2, batch_size=2,
                     micro_batch_size=2, bucket=64)  # fmt: skip
    out = tmp_path / "out"
    argv = ["displacement", "--model", tiny, "--train", path, "--run", run_dir, "--out", out]
    assert cli.main([str(a) for a in argv]) == 0
    printed = capsys.readouterr().out
    assert f"along the run {run_dir}" in printed and "sign agreement y+" in printed
    saved = json.loads((out / "displacement.json").read_text())
    res = saved["result"]
    assert (
        saved["options"]["run"] == "../run" and saved["options"]["beta"] == 0.5 and res["path_steps"] == [0, 1, 2, 3, 4]
    )
    final = _final_lm_params(run_dir, loaded.lm, loaded.params, data)
    expected = _logprob_change(loaded.lm, loaded.params, final, data.chosen)
    np.testing.assert_allclose(res["actual_chosen"], expected, rtol=1e-4, atol=1e-5)
    assert np.abs(expected).max() > 0.05  # the run moved the log-likelihoods
    figure = json.loads((out / "displacement_scatter.json").read_text())
    assert figure["path_mean"]["actual_chosen"][-1] == pytest.approx(float(np.mean(res["actual_chosen"])))
    for extra, message in ((["--lr", "1e-3"], "drop --lr"), (["--no-check"], "drop --no-check")):
        assert cli.main([str(a) for a in argv + extra]) == 2
        assert message in capsys.readouterr().err
    ex = _train(tmp_path, "ex", loaded.lm, loaded.params, data, epochs=1, batch_size=2, micro_batch_size=2, bucket=64)
    assert cli.main([str(a) for a in argv[:-4] + ["--run", ex, "--out", out]]) == 2
    assert "was trained with reward ex, not im" in capsys.readouterr().err

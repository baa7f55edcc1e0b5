"""Likelihood displacement (dynamics.displacement, docs/math.md §12): the predicted Δ ln π of each training
response against a real SGD step computed by hand, CHES against numpy, and the joining of padded batches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_delta import _pairs, _rm, _setup

from dynamics.batches import PairBatch, PreferenceBatch
from dynamics.displacement import check_displacement, ches_scores, concat_pairs, likelihood_displacement
from dynamics.errors import ConfigError, DataError
from dynamics.masks import combine, partition, prepare, trainable_mask
from dynamics.objectives import make_objective
from dynamics.rewards import bt_loss, response_logprob


def _setup_n(n):
    lm, params, train, unseen = _setup(n_train=n, seed=3)
    rm, p = _rm("im", lm, params)
    return lm, rm, p, train, unseen


def test_actual_change_is_a_real_sgd_step_and_the_prediction_is_first_order(x64):
    lm, rm, p, train, unseen = _setup_n(3)
    lr = 1e-4
    res = check_displacement(rm, p, train, eval_responses=unseen, params_spec="all", lr=lr)
    # the real step by hand: SGD on the batch-mean DPO loss, then ln π of every response
    rm2, p2, spec = prepare(rm, p, "all")
    tr, frozen = partition(p2, trainable_mask(rm2, p2, spec))
    loss = lambda t: bt_loss(
        rm2.reward(combine(t, frozen), train.chosen), rm2.reward(combine(t, frozen), train.rejected)
    )  # noqa: E731,E501
    new = jax.tree.map(lambda a, g: a - lr * g, tr, jax.grad(loss)(tr))
    for batch, got in (
        (train.chosen, res.actual_chosen),
        (train.rejected, res.actual_rejected),
        (unseen, res.actual_eval),
    ):  # noqa: E501
        before = response_logprob(lm, combine(tr, frozen)["lm"], batch)
        after = response_logprob(lm, combine(new, frozen)["lm"], batch)
        np.testing.assert_allclose(got, np.asarray(after - before), rtol=1e-9, atol=1e-13)
    # first order: the prediction carries the change up to O(η²)
    for pred, act in (
        (res.chosen, res.actual_chosen),
        (res.rejected, res.actual_rejected),
        (res.eval, res.actual_eval),
    ):  # noqa: E501
        assert np.abs(pred - act).max() <= 1e-2 * np.abs(act).max()
    s = res.summary()
    assert s["sign_agreement_chosen"] == 1.0 and s["n_pairs"] == 3
    assert res.eval.shape == (unseen.batch_size,)
    # the prediction alone agrees with check_displacement's
    alone = likelihood_displacement(rm, p, train, eval_responses=unseen, lr=lr)
    np.testing.assert_allclose(alone.chosen, res.chosen, rtol=1e-10)


def test_simpo_changes_are_length_times_reward_change_over_beta(x64):
    lm, rm, p, train, _ = _setup_n(2)
    obj = make_objective("simpo", rm, gamma=0.2)
    res = check_displacement(rm, p, train, lr=1e-4, objective=obj)
    assert res.meta["objective"]["name"] == "simpo"
    # the actual Δ ln π is the change of the summed log-likelihood, whatever the reward's normalisation
    assert np.abs(res.chosen - res.actual_chosen).max() <= 1e-2 * np.abs(res.actual_chosen).max()


def test_ches_against_numpy(x64):
    lm, rm, p, train, _ = _setup_n(3)
    ches, ln_ches = ches_scores(lm, p["lm"], train)

    def summed(b: PairBatch):
        h = np.asarray(lm.forward(p["lm"], jnp.asarray(b.tokens), jnp.asarray(b.attention_mask)))
        resp = np.asarray(b.response_mask)
        # token k at position t is predicted by the state at t − 1
        return np.stack([h[i, :-1][resp[i, 1:] == 1].sum(0) for i in range(len(resp))]), resp.sum(1)

    hp, np_ = summed(train.chosen)
    hm, nm = summed(train.rejected)
    expected = (hp * hm).sum(1) - (hp * hp).sum(1)
    np.testing.assert_allclose(ches, expected, rtol=1e-10)
    np.testing.assert_allclose(ln_ches, (hp * hm).sum(1) / (np_ * nm) - (hp * hp).sum(1) / np_**2, rtol=1e-10)


def test_concat_pairs_pads_on_the_batches_side():
    rng = np.random.default_rng(0)
    a, b = _pairs(rng, 2, 6, 2), _pairs(rng, 3, 9, 3)
    joined = concat_pairs([a, b])
    assert joined.tokens.shape == (5, 9)
    np.testing.assert_array_equal(joined.tokens[:2, :6], a.tokens)
    assert not joined.attention_mask[:2, 6:].any()
    left = concat_pairs([_pairs(rng, 2, 6, 2, side="left"), _pairs(rng, 2, 8, 2, side="left")])
    assert not left.attention_mask[:2, :2].any() and left.attention_mask[:, -1].all()
    right_padded = PairBatch(np.ones((1, 4), np.int32), np.array([[1, 1, 1, 0]]), np.array([[0, 1, 1, 0]]))
    left_padded = PairBatch(np.ones((1, 4), np.int32), np.array([[0, 1, 1, 1]]), np.array([[0, 0, 1, 1]]))
    with pytest.raises(DataError, match="padded on the left with sequences padded on the right"):
        concat_pairs([right_padded, left_padded])


def test_an_ex_rm_is_refused(x64):
    lm, params, train, _ = _setup(n_train=1)
    rm, p = _rm("ex", lm, params)
    with pytest.raises(ConfigError, match="needs an IM-RM"):
        likelihood_displacement(rm, p, PreferenceBatch(train.chosen, train.rejected))


def test_the_command_on_a_policy_with_its_reference(tmp_path, capsys):
    """`rmdyn displacement --model POLICY --ref REF --train --eval`: the table, the JSON and the figure, and the
    prediction against the real step it ran."""
    import json

    from _tiny_hf import tiny_hf_dir

    from experiments import cli

    policy, ref = tiny_hf_dir(tmp_path / "policy", seed=1), tiny_hf_dir(tmp_path / "ref", seed=0)
    train = tmp_path / "train.jsonl"
    rows = [("Is the sky blue?", "Yes, it is.", "No."), ("Is 2+2=4?", "Yes.", "No, it is 5."),
            ("Do cats bark?", "No, they meow.", "Yes, loudly.")]  # fmt: skip
    train.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in rows))
    ev = tmp_path / "eval.jsonl"
    ev.write_text(json.dumps({"prompt": "Is grass green?", "response": "Yes, mostly."}) + "\n")
    out = tmp_path / "out"
    argv = ["displacement", "--model", policy, "--ref", ref, "--train", train, "--eval", ev, "--lr", "1e-6",
            "--beta", "0.5", "--out", out]  # fmt: skip
    assert cli.main([str(a) for a in argv]) == 0
    printed = capsys.readouterr().out
    assert "chosen log-likelihood predicted to fall on" in printed and "sign agreement y+" in printed
    data = json.loads((out / "displacement.json").read_text())
    res = data["result"]
    assert data["model"]["reference"] is not None and data["options"]["check"]
    pred, act = np.asarray(res["chosen"]), np.asarray(res["actual_chosen"])
    assert pred.shape == (3,) and len(res["eval"]) == 1
    assert np.abs(pred - act).max() <= 0.05 * np.abs(act).max()  # first order at a small η (float32)
    assert res["summary"]["predicted_chosen_falls"] == pytest.approx(np.mean(pred < 0))
    assert (out / "displacement_scatter.png").stat().st_size > 10_000
    assert json.loads((out / "displacement_scatter.json").read_text())["chosen"] == res["chosen"]

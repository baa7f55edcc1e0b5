"""The DPO family of objectives (dynamics.objectives, docs/math.md §11): losses against TRL's parametrisation,
weights against autodiff, Δr with each objective against the closed form and against real steps, in float64."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_delta import _rm, _setup

from dynamics.attribution import EvalSet, contribution_matrix
from dynamics.delta import delta_reward
from dynamics.errors import ConfigError
from dynamics.objectives import OBJECTIVES, Objective, make_objective, reward_model
from dynamics.rewards import ExplicitRM, ImplicitRM, token_logprobs
from dynamics.step_check import check_step

SETTINGS = {"dpo": {}, "cdpo": {"smoothing": 0.1}, "ipo": {}, "hinge": {}, "simpo": {"gamma": 0.3}}


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def _trl_losses(name: str, beta: float, h: np.ndarray, eps: float = 0.0, gamma: float = 0.0) -> np.ndarray:
    """The losses as TRL writes them, in its log-ratio margin h ("logits"; SimPO: the difference of average
    log-probabilities), with β outside: an independent parametrisation of the same functions."""
    if name == "dpo":
        return -_log_sigmoid(beta * h)
    if name == "cdpo":
        return -_log_sigmoid(beta * h) * (1 - eps) - _log_sigmoid(-beta * h) * eps
    if name == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if name == "hinge":
        return np.maximum(0.0, 1 - beta * h)
    return -_log_sigmoid(beta * (h - gamma / beta))


@pytest.mark.parametrize("name", OBJECTIVES)
def test_losses_equal_trls_parametrisation(x64, name):
    beta = 0.3
    rng = np.random.default_rng(0)
    h = rng.normal(0, 4, 64)  # log-ratio margins; r = β h
    h = h[np.abs(beta * h - 1) > 1e-3]  # away from the hinge's kink
    rc = rng.normal(0, 1, h.size)
    rr = rc - beta * h
    obj = Objective(name, beta=beta, **SETTINGS[name])
    ours = np.asarray(obj.losses(jnp.asarray(rc), jnp.asarray(rr)))
    np.testing.assert_allclose(ours, _trl_losses(name, beta, h, 0.1, 0.3), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", OBJECTIVES)
def test_weight_is_minus_the_derivative_of_the_loss(x64, name):
    obj = Objective(name, beta=0.7, **SETTINGS[name])
    m = jnp.asarray(np.random.default_rng(1).normal(0, 3, 50))
    m = m[jnp.abs(m - 1) > 1e-3]
    rr = jnp.zeros_like(m)
    autodiff = -jax.vmap(jax.grad(lambda x: obj.losses(x[None], jnp.zeros(1))[0]))(m)
    np.testing.assert_allclose(np.asarray(obj.weight(m, rr)), np.asarray(autodiff), rtol=1e-12, atol=1e-14)
    if name == "dpo":  # the Bradley-Terry weight σ(r− − r+)
        np.testing.assert_allclose(np.asarray(obj.weight(m, rr)), 1 / (1 + np.exp(np.asarray(m))), rtol=1e-12)


def test_simpo_reward_is_the_length_normalised_policy_logprob(x64):
    lm, params, train, unseen = _setup()
    rm = reward_model(ImplicitRM(lm, beta=2.0), Objective("simpo"))
    assert rm.reference_free and rm.length_normalised
    r = np.asarray(rm.reward(rm.init(params), unseen))
    lp = np.asarray(token_logprobs(lm, params, jnp.asarray(unseen.tokens), jnp.asarray(unseen.attention_mask)))
    mask = np.asarray(unseen.response_mask)
    np.testing.assert_allclose(r, 2.0 * (lp * mask).sum(1) / mask.sum(1), rtol=1e-12)
    ex = ExplicitRM(lm)
    assert reward_model(ex, Objective("simpo")) is ex


@pytest.mark.parametrize("name", ["cdpo", "ipo", "hinge", "simpo"])
@pytest.mark.parametrize("kind", ["ex", "im"])
def test_closed_form_weight_equals_autodiff_of_the_loss(x64, kind, name):
    """ntk differentiates the objective's loss; closed_form uses its weight w_i: the two Δr agree."""
    lm, params, train, unseen = _setup(n_train=2)
    rm, p = _rm(kind, lm, params)
    obj = make_objective(name, rm, **SETTINGS[name])
    a = delta_reward(rm, p, train, unseen, params_spec="output", lr=0.1, objective=obj, chunk_size=2)
    assert a.meta["objective"]["name"] == name
    if kind == "im" and name == "simpo":
        with pytest.raises(ConfigError, match="length-normalised"):
            delta_reward(rm, p, train, unseen, params_spec="output", lr=0.1, method="closed_form", objective=obj)
        np.testing.assert_allclose(a.delta, 0.1 * a.kernel_margin, rtol=1e-10, atol=1e-14)
        return
    b = delta_reward(rm, p, train, unseen, params_spec="output", lr=0.1, method="closed_form", objective=obj)
    assert np.abs(a.delta).max() > 1e-6
    np.testing.assert_allclose(a.delta, b.delta, rtol=1e-8, atol=1e-10 * np.abs(a.delta).max())
    dpo = delta_reward(rm, p, train, unseen, params_spec="output", lr=0.1, chunk_size=2)
    assert not np.allclose(a.delta, dpo.delta, rtol=1e-3)  # the objective changes the prediction


@pytest.mark.parametrize("name", OBJECTIVES)
@pytest.mark.parametrize("kind", ["ex", "im"])
def test_residual_is_second_order_for_every_objective(x64, kind, name):
    """Prediction vs a real SGD step on the objective's loss: residual slope ≈ 2 over three decades of η."""
    lm, params, train, unseen = _setup(n_train=2)
    rm, p = _rm(kind, lm, params)
    obj = make_objective(name, rm, **SETTINGS[name])
    res = check_step(rm, p, train, unseen, lrs=np.logspace(-5, -2, 7), params_spec="all", objective=obj)
    s = res.residual_slope()
    assert s["decades"] >= 3
    assert 1.8 <= s["slope_of_max"] <= 2.2, s
    assert 1.8 <= s["median_pair_slope"] <= 2.2, s
    assert np.abs(res.predicted[0]).max() > 100 * np.abs(res.residual[0]).max()


def test_contribution_rows_average_to_delta_with_an_objective(x64):
    lm, params, train, unseen = _setup(n_train=3)
    rm, p = _rm("im", lm, params)
    obj = make_objective("ipo", rm)
    d = delta_reward(rm, p, train, unseen, params_spec="last:1", lr=0.1, objective=obj)
    c = contribution_matrix(rm, p, train, EvalSet(unseen), params_spec="last:1", lr=0.1, block=3, objective=obj)
    np.testing.assert_allclose(c.weight, d.bt_weight, rtol=1e-12)
    np.testing.assert_allclose(c.contribution.mean(axis=1), d.delta, rtol=1e-8, atol=1e-12)
    assert c.meta["objective"]["name"] == "ipo"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"name": "orpo"}, "unknown objective 'orpo'"),
        ({"name": "simpo", "gamma": -0.5}, "γ must be ≥ 0"),
        ({"name": "cdpo", "smoothing": 0.5}, r"ε must be in \[0, 0.5\)"),
        ({"name": "dpo", "gamma": 1.0}, "only simpo"),
        ({"name": "ipo", "smoothing": 0.1}, "only cdpo"),
        ({"name": "ipo", "beta": 0.0}, "β must be > 0"),
    ],
)
def test_bad_objectives_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Objective(**kwargs)


@pytest.mark.parametrize(
    ("kind", "name"),
    [
        ("ex", "ipo"),
        pytest.param("im", "cdpo", marks=pytest.mark.slow),
        ("im", "simpo"),
        pytest.param("ex", "hinge", marks=pytest.mark.slow),
    ],
)
def test_the_trainer_takes_one_step_on_the_objective(kind, name):
    """The trainer's fast path (packed pairs, gathered log-probs, accumulation) against one SGD step on the
    objective's loss of `rm.reward`, and its step-0 loss metric against the objective of those rewards."""
    from test_train import preference_data, tiny_lm

    from dynamics.masks import partition, trainable_mask
    from dynamics.training import EvalSuite, TrainConfig, build_reward_model, train

    lm, params = tiny_lm()
    data = preference_data(8, 1)
    extra = SETTINGS[name]
    options = dict(reward=kind, params="last:1", objective=name, gamma=extra.get("gamma", 0.0),
                   label_smoothing=extra.get("smoothing", 0.0), beta=0.5)  # fmt: skip
    config = TrainConfig(optimizer="sgd", lr=0.5, epochs=1, max_steps=1, batch_size=8, micro_batch_size=4, bucket=4,
                         **options)  # fmt: skip
    result = train(config, lm, params, data, EvalSuite.from_preferences({"train": data}), progress=False)
    rm, p, spec = build_reward_model(config, lm, params)
    assert (name == "simpo") == bool(getattr(rm, "length_normalised", False))
    obj = config.objective_spec
    assert obj.beta == (0.5 if kind == "im" else 1.0)
    mask = trainable_mask(rm, p, spec)
    tr, frozen = partition(p, mask)

    def loss(t):
        q = jax.tree.map(lambda a, b: b if a is None else a, t, frozen, is_leaf=lambda x: x is None)
        return obj.loss(rm.reward(q, data.chosen), rm.reward(q, data.rejected))

    start = [h for h in result.history if h["event"] == "eval"][0]
    assert start["train/loss"] == pytest.approx(float(loss(tr)), rel=1e-5)
    grads = jax.grad(loss)(tr)
    by_hand = jax.tree.map(lambda a, g: a - 0.5 * g, tr, grads)
    mask = {k: v for k, v in mask.items() if k != "ref"}
    after = partition(result.params, mask)[0]
    moved = 0.0
    for a, b, c in zip(jax.tree.leaves(by_hand), jax.tree.leaves(after), jax.tree.leaves(tr), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
        moved = max(moved, float(np.abs(np.asarray(a) - np.asarray(c)).max()))
    assert moved > 1e-3


def test_a_bad_objective_in_the_training_config():
    from dynamics.training import TrainConfig

    with pytest.raises(ConfigError, match="γ must be ≥ 0"):
        TrainConfig(objective="simpo", gamma=-1.0)
    with pytest.raises(ConfigError, match="reward 'exgrm' trains its cross-entropy"):
        TrainConfig(reward="exgrm", objective="ipo")

"""The linearised multi-step trajectory (docs/math.md §10.4) against real SGD on tiny random models (float64).

- a model linear in its trained parameters (EX-RM, head only) follows the linearised recursion exactly, at any η;
- a real network (all parameters) follows it to first order: the error over a fixed number of steps ∝ η²;
- the batches are the trainer's (`training_batches`), and `parting_step` finds where two trajectories part.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from test_delta import _pairs, _rm, _setup

from dynamics.attribution.evalset import EvalSet
from dynamics.attribution.trajectory import (
    bt_weights,
    linearised_kernels,
    linearised_trajectory,
    parting_step,
    training_batches,
)
from dynamics.chunking import strip
from dynamics.delta import reward_jit
from dynamics.errors import ConfigError, DataError
from dynamics.masks import combine, partition, prepare, trainable_mask
from dynamics.rewards import bt_loss
from dynamics.text import PreferenceBatch
from dynamics.training import TrainConfig, batch_plan, epoch_order


def _data(n_train: int, seed: int = 3):
    lm, params, _, _ = _setup()
    rng = np.random.default_rng(seed)
    train = PreferenceBatch(_pairs(rng, n_train, 9, 4), _pairs(rng, n_train, 9, 4))
    evalset = EvalSet(_pairs(rng, 4, 10, 3), _pairs(rng, 4, 10, 3))
    return lm, params, train, evalset


def _real_sgd(rm, params, spec, train, evalset, lrs, batches):
    """Plain SGD on the batch-mean BT loss, written out here, at each η of `lrs`: a list of (margins [S+1, N],
    eval margins [S+1, M]), one per η (the gradient compiled once)."""
    rm, params, spec = prepare(rm, params, spec)
    tree0, frozen = partition(params, trainable_mask(rm, params, spec))
    train, evalset = strip(train), EvalSet(strip(evalset.chosen), strip(evalset.rejected))

    def margins(p, pairs):
        return reward_jit(rm, p, pairs.chosen) - reward_jit(rm, p, pairs.rejected)

    def loss(t, pairs):
        p = combine(t, frozen)
        return bt_loss(rm.reward(p, pairs.chosen), rm.reward(p, pairs.rejected))

    grad = jax.jit(jax.grad(loss))
    out = []
    for lr in lrs:
        tree, ms, qs = tree0, [], []
        for step in range(len(batches) + 1):
            p = combine(tree, frozen)
            ms.append(np.asarray(margins(p, train)))
            qs.append(np.asarray(margins(p, evalset)))
            if step < len(batches):
                g = grad(tree, train.select(batches[step]))
                tree = jax.tree.map(lambda a, b, lr=lr: a - lr * b, tree, g)
        out.append((np.stack(ms), np.stack(qs)))
    return out


def test_training_batches_are_the_trainers():
    config = TrainConfig(batch_size=4, micro_batch_size=2, epochs=3, seed=7, max_steps=7)
    got = training_batches(config, 10)
    assert len(got) == 7  # ⌈10/4⌉ = 3 steps per epoch, cut at 7
    for s, b in enumerate(got):
        epoch, k = divmod(s, 3)
        want = np.concatenate(batch_plan(epoch_order(7, epoch, 10), 4, 2)[k])
        np.testing.assert_array_equal(b, want)
    assert [len(b) for b in got] == [4, 4, 2] * 2 + [4]


def test_bt_weights_are_stable():
    m = np.array([-1000.0, -3.0, 0.0, 2.0, 1000.0])
    want = [1.0, 1 / (1 + np.exp(-3.0)), 0.5, 1 / (1 + np.exp(2.0)), np.exp(-1000.0)]  # e^−1000 underflows to 0
    np.testing.assert_allclose(bt_weights(m), want, rtol=1e-15, atol=0)


def test_linear_model_follows_the_recursion_exactly(x64):
    """EX-RM with only the head u trained: r = ⟨u, h⟩ is linear in u, so real SGD is the recursion, at any η."""
    lm, params, train, evalset = _data(6)
    rm, p = _rm("ex", lm, params)
    batches = training_batches(TrainConfig(batch_size=4, micro_batch_size=4, epochs=3, seed=1), 6)
    k = linearised_kernels(rm, p, train, evalset, params_spec="head", block=4)
    assert k.train_kernel.shape == (6, 6) and k.eval_kernel.shape == (4, 6)
    np.testing.assert_allclose(k.train_kernel, k.train_kernel.T, rtol=1e-12)
    lrs = (0.05, 3.0)
    for lr, (real_m, real_q) in zip(lrs, _real_sgd(rm, p, "head", train, evalset, lrs, batches), strict=True):
        lin = linearised_trajectory(k.train_kernel, k.eval_kernel, k.train_margin, k.eval_value, lr=lr, batches=batches)
        assert lin.train_margin.shape == (len(batches) + 1, 6)
        moved = np.abs(real_q[-1] - real_q[0]).max()
        assert moved > (1e-3 if lr < 1 else 0.1)  # not a trivial match
        np.testing.assert_allclose(lin.train_margin, real_m, rtol=0, atol=1e-12 * max(1.0, moved))
        np.testing.assert_allclose(lin.eval_value, real_q, rtol=0, atol=1e-12 * max(1.0, moved))
        assert parting_step(lin.eval_value, real_q, 1e-10) is None


@pytest.mark.parametrize("kind", ["ex", "im"])
def test_network_follows_it_to_first_order(x64, kind):
    """All parameters of a 2-block decoder: over the same 4 steps, |linearised − real| shrinks ∝ η²."""
    lm, params, train, evalset = _data(6)
    rm, p = _rm(kind, lm, params)
    batches = training_batches(TrainConfig(batch_size=3, micro_batch_size=3, epochs=2, seed=2), 6)
    k = linearised_kernels(rm, p, train, evalset, params_spec="all", block=4)
    errors, changes = [], []
    lrs = (2e-5, 1e-5)  # the kernel's scale is ~1e4 here (std 0.3 head, tied embeddings)
    for lr, (real_m, real_q) in zip(lrs, _real_sgd(rm, p, "all", train, evalset, lrs, batches), strict=True):
        lin = linearised_trajectory(k.train_kernel, k.eval_kernel, k.train_margin, k.eval_value, lr=lr, batches=batches)
        np.testing.assert_allclose(lin.eval_value[0], real_q[0], rtol=1e-12, atol=1e-12)
        errors.append(max(np.abs(lin.eval_value - real_q).max(), np.abs(lin.train_margin - real_m).max()))
        changes.append(np.abs(real_q[-1] - real_q[0]).max())
    assert errors[1] < 0.05 * changes[1]  # first order carries the change
    ratio = errors[0] / errors[1]
    assert 3.0 < ratio < 5.0, (errors, ratio)  # halving η quarters the error: O(η²)


def test_parting_step():
    actual = np.array([[0.0, 0.0], [1.0, 0.5], [2.0, 1.0], [3.0, 1.5]])
    pred = actual + np.array([[0.0, 0.0], [0.01, 0.0], [0.0, -0.2], [0.5, 0.0]])
    assert parting_step(pred, actual, 0.1) == 2
    assert parting_step(pred, actual, 0.3) == 3
    assert parting_step(pred, actual, 1.0) is None
    # relative: error / largest actual change so far (1, 2, 3 at steps 1-3): 0.01, 0.1, 0.167
    assert parting_step(pred, actual, 0.05, relative=True) == 2
    assert parting_step(pred, actual, 0.15, relative=True) == 3
    assert parting_step(pred[:, 0], actual[:, 0], 0.4) == 3  # one item
    assert parting_step(actual + 1e-3, actual, 0.0, relative=True) == 0  # x/0 = ∞ at step 0
    with pytest.raises(DataError, match="same shape"):
        parting_step(pred[:2], actual, 0.1)
    with pytest.raises(ConfigError, match="tol"):
        parting_step(pred, actual, -1.0)


def test_bad_inputs():
    k, e, m, q = np.eye(3), np.ones((2, 3)), np.zeros(3), np.zeros(2)
    with pytest.raises(DataError, match=r"\[N, N\]"):
        linearised_trajectory(np.eye(2), e, m, q, lr=0.1, batches=[])
    with pytest.raises(DataError, match=r"\[M, N\]"):
        linearised_trajectory(k, np.ones((3, 3)), m, q, lr=0.1, batches=[])
    with pytest.raises(DataError, match="outside 0..2"):
        linearised_trajectory(k, e, m, q, lr=0.1, batches=[np.array([0, 3])])
    with pytest.raises(DataError, match="non-empty"):
        linearised_trajectory(k, e, m, q, lr=0.1, batches=[np.array([], np.int64)])
    with pytest.raises(ConfigError, match="learning rate"):
        linearised_trajectory(k, e, m, q, lr=0.0, batches=[])
    t = linearised_trajectory(k, e, m, q, lr=0.5, batches=[np.array([0, 1])])
    # one step from m = 0: w = ½, Δm = η/2 · (½ + ½) on rows 0, 1 of the identity kernel
    np.testing.assert_allclose(t.train_margin[1], [0.125, 0.125, 0.0])
    np.testing.assert_allclose(t.eval_value[1], [0.25, 0.25])
    assert t.to_dict()["train_loss"][0] == pytest.approx(np.log(2))

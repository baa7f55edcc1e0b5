"""Δr: closed form (Eqs. (4), (5)) against the eNTK (autodiff), and both against real optimizer steps.

Tiny random models in float64 (`x64` fixture); multi-token responses; unseen batches with padding on both
sides; one and two training triples.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynamics.delta import delta_reward
from dynamics.errors import ConfigError, DataError
from dynamics.models import LM, DecoderConfig, cast_params
from dynamics.rewards import ExplicitRM, ImplicitRM
from dynamics.step_check import check_step
from dynamics.text import PairBatch, PreferenceBatch

V = 40


def _config(family: str = "llama", tied: bool = True) -> DecoderConfig:
    if family == "gpt_neox":
        return DecoderConfig(
            family="gpt_neox", vocab_size=V, d_model=16, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=4, d_ff=24,
            rotary_dim=2, tie_embeddings=False,
        )  # fmt: skip
    return DecoderConfig(
        family=family, vocab_size=V, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=4, d_ff=24,
        tie_embeddings=tied,
    )  # fmt: skip


def _pairs(rng, n: int, T: int, prompt_len: int, side: str = "right") -> PairBatch:
    """Random sequences: a prompt of `prompt_len` tokens, a response of ≥ 2 tokens, then up to 2 pad tokens."""
    tok = np.zeros((n, T), np.int32)
    att = np.zeros((n, T), np.int32)
    resp = np.zeros((n, T), np.int32)
    for i in range(n):
        L = T - int(rng.integers(0, 3))
        off = 0 if side == "right" else T - L
        tok[i, off : off + L] = rng.integers(0, V, L)
        att[i, off : off + L] = 1
        resp[i, off + prompt_len : off + L] = 1
    return PairBatch(tok, att, resp)


def _setup(family="llama", tied=True, n_train=1, seed=0, side="right"):
    lm = LM(_config(family, tied))
    params = cast_params(lm.init(jax.random.PRNGKey(seed)), jnp.float64)
    rng = np.random.default_rng(seed)
    train = PreferenceBatch(_pairs(rng, n_train, 9, 4), _pairs(rng, n_train, 9, 4))
    unseen = _pairs(rng, 5, 10, 3, side=side)
    return lm, params, train, unseen


def _rm(kind, lm, params):
    if kind == "ex":
        rm = ExplicitRM(lm)
        return rm, rm.init(params, seed=1, std=0.3)
    if kind == "ex-mean":
        rm = ExplicitRM(lm, pooling="mean")
        return rm, rm.init(params, seed=1, std=0.3)
    rm = ImplicitRM(lm, beta=0.5)
    # π_ref ≠ π so that the training triple has a non-trivial BT weight
    ref = jax.tree.map(lambda a: a * 1.05, params)
    return rm, rm.init(params, ref)


@pytest.mark.parametrize("kind", ["ex", "ex-mean", "im"])
@pytest.mark.parametrize(
    "family,tied,n_train,side", [("llama", True, 2, "left"), ("gpt_neox", False, 1, "right")], ids=["llama", "neox"]
)
def test_closed_form_equals_ntk(x64, kind, family, tied, n_train, side):
    lm, params, train, unseen = _setup(family, tied, n_train, side=side)
    rm, p = _rm(kind, lm, params)
    spec = "output"
    a = delta_reward(rm, p, train, unseen, params_spec=spec, lr=0.1, method="ntk", chunk_size=2)
    b = delta_reward(rm, p, train, unseen, params_spec=spec, lr=0.1, method="closed_form", chunk_size=3)
    scale = np.abs(a.delta).max()
    assert scale > 1e-6
    assert np.abs(a.delta - b.delta).max() <= 1e-8 * scale
    for ka, kb in [(a.kernel_chosen, b.kernel_chosen), (a.kernel_rejected, b.kernel_rejected)]:
        assert ka.shape == (5, n_train)
        assert np.abs(ka - kb).max() <= 1e-8 * np.abs(kb).max()
    np.testing.assert_allclose(a.reward_before, b.reward_before, rtol=1e-12, atol=1e-12)
    # the ntk Δr (one JVP along the update) equals the sum of its kernel terms
    np.testing.assert_allclose(a.delta, 0.1 * a.kernel_margin, rtol=1e-10, atol=1e-14)


def test_ex_head_prediction_is_exact(x64):
    lm, params, train, unseen = _setup(n_train=2)
    rm, p = _rm("ex", lm, params)
    res = check_step(rm, p, train, unseen, lrs=[1e-3, 0.1, 10.0], params_spec="head")
    assert np.abs(res.actual).max() > 1e-3
    assert np.abs(res.residual).max() <= 1e-10


def test_ex_closed_form_is_eq4_by_hand(x64):
    """Eq. (4) computed independently: η σ(r− − r+) ⟨h_u, h+ − h−⟩ from raw hidden states."""
    lm, params, train, unseen = _setup()
    rm, p = _rm("ex", lm, params)
    res = delta_reward(rm, p, train, unseen, params_spec="head", lr=0.3, method="closed_form")

    def last_h(b):
        h = np.asarray(lm.forward(params, jnp.asarray(b.tokens), jnp.asarray(b.attention_mask)))
        m = np.asarray(b.attention_mask)
        idx = m.shape[1] - 1 - np.argmax(m[:, ::-1], axis=1)
        return h[np.arange(len(idx)), idx]

    u = np.asarray(p["head"]["u"])
    hp, hm, hu = last_h(train.chosen)[0], last_h(train.rejected)[0], last_h(unseen)
    g = 1 / (1 + np.exp(-(u @ hm - u @ hp)))
    np.testing.assert_allclose(res.delta, 0.3 * g * (hu @ (hp - hm)), rtol=1e-12)


@pytest.mark.parametrize(
    "kind,spec,optimizer",
    [
        ("im", "unembed", "sgd"),
        ("im", "last:1", "sgd"),
        ("im", "all", "sgd"),
        ("im", "all", "adam"),
        ("ex", "all", "sgd"),
        ("ex", "last:1", "adam"),
    ],
)
def test_residual_is_second_order(x64, kind, spec, optimizer):
    """|actual − predicted| ∝ η² over three decades of η (docs/math.md §3's O(η²))."""
    lm, params, train, unseen = _setup(n_train=2)
    rm, p = _rm(kind, lm, params)
    res = check_step(rm, p, train, unseen, lrs=np.logspace(-5, -2, 7), params_spec=spec, optimizer=optimizer)
    s = res.residual_slope()
    assert s["decades"] >= 3
    assert 1.8 <= s["slope_of_max"] <= 2.2, s
    assert 1.8 <= s["median_pair_slope"] <= 2.2, s
    # and the prediction is not trivially zero: at the smallest η it carries almost all of the change
    assert np.abs(res.predicted[0]).max() > 100 * np.abs(res.residual[0]).max()


def test_tied_model_is_untied_for_unembed(x64):
    lm, params, train, unseen = _setup(tied=True)
    rm, p = _rm("im", lm, params)
    res = delta_reward(rm, p, train, unseen, params_spec="unembed", lr=0.1)
    assert res.meta["untied"] is True
    assert res.meta["n_trained"] == V * 16


def test_bad_inputs(x64):
    lm, params, train, unseen = _setup()
    rm, p = _rm("im", lm, params)
    with pytest.raises(ConfigError, match="learning rate must be"):
        delta_reward(rm, p, train, unseen, lr=0.0)
    with pytest.raises(ConfigError, match="learning rate must be"):
        delta_reward(rm, p, train, unseen, lr=-1e-3)
    with pytest.raises(ConfigError, match="selects no parameter"):
        delta_reward(rm, p, train, unseen, params_spec="re:no_such_leaf", lr=0.1)
    with pytest.raises(ConfigError, match="closed_form covers Assumption 1 only.*unembed"):
        delta_reward(rm, p, train, unseen, params_spec="last:1", lr=0.1, method="closed_form")
    with pytest.raises(ConfigError, match="Adam"):
        delta_reward(rm, p, train, unseen, params_spec="unembed", lr=0.1, method="closed_form", optimizer="adam")
    with pytest.raises(ConfigError, match="no head"):
        delta_reward(rm, p, train, unseen, params_spec="head", lr=0.1)
    ex, pe = _rm("ex", lm, params)
    with pytest.raises(ConfigError, match="does not read the unembedding"):
        delta_reward(ex, pe, train, unseen, params_spec="unembed", lr=0.1)
    empty = unseen.replace(response_mask=np.where(np.arange(5)[:, None] == 3, 0, np.asarray(unseen.response_mask)))
    with pytest.raises(DataError, match="row 3 has an empty response"):
        delta_reward(rm, p, train, empty, lr=0.1)
    with pytest.raises(ConfigError, match="last:K|between 1 and"):
        delta_reward(rm, p, train, unseen, params_spec="last:0", lr=0.1)


def test_no_silent_recompilation(x64):
    """Each hot jitted entry point is traced once per shape: repeated calls (new arrays, same shapes) trace nothing."""
    from dynamics.delta import TRACE_COUNTS

    lm, params, train, unseen = _setup(n_train=2, seed=5)
    rm, p = _rm("im", lm, params)
    for spec, method in [("all", "ntk"), ("unembed", "closed_form")]:
        delta_reward(rm, p, train, unseen, params_spec=spec, lr=0.1, method=method, chunk_size=2)
        first = dict(TRACE_COUNTS)
        assert first.get("jvp_rewards" if method == "ntk" else "reward", 0) >= 1
        # other values, same shapes: including a different unseen set and other parameter values
        rng = np.random.default_rng(9)
        unseen2 = _pairs(rng, 5, 10, 3)
        p2 = jax.tree.map(lambda a: a * 1.01, p)
        delta_reward(rm, p2, train, unseen2, params_spec=spec, lr=0.2, method=method, chunk_size=2)
        assert dict(TRACE_COUNTS) == first, (spec, first, dict(TRACE_COUNTS))


def test_im_rewards_at_initialisation_are_exact_ties():
    """π_θ = π_ref: rewards before the step are exactly 0 (structural), and the BT weight exactly ½."""
    lm = LM(_config())
    params = lm.init(jax.random.PRNGKey(0))  # float32, as users run it
    rng = np.random.default_rng(0)
    train = PreferenceBatch(_pairs(rng, 1, 9, 4), _pairs(rng, 1, 9, 4))
    unseen = _pairs(rng, 5, 10, 3)
    rm = ImplicitRM(lm, beta=0.5)
    res = delta_reward(rm, rm.init(params), train, unseen, params_spec="all", lr=0.1)
    # exact by design (structural: π_θ and π_ref are the same arrays) ...
    assert np.all(res.reward_before == 0.0) and np.all(res.bt_weight == 0.5)
    # ... and the right values: β (ln π_θ − ln π_ref) and σ(r− − r+) computed independently, in float64, from a
    # separate copy of the weights (no shortcut applies), agree to float32 rounding
    from jax.flatten_util import ravel_pytree

    from dynamics.chunking import strip
    from dynamics.rewards import response_logprob

    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        p64 = cast_params(params, jnp.float64)
        ref64 = jax.tree.map(lambda a: jnp.array(a, copy=True), p64)

        @jax.jit
        def r64(p, q, batch):
            return 0.5 * (response_logprob(lm, p, batch) - response_logprob(lm, q, batch))

        before = np.asarray(r64(p64, ref64, strip(unseen)))
        r_plus, r_minus = (np.asarray(r64(p64, ref64, strip(b))) for b in (train.chosen, train.rejected))
        g = 1 / (1 + np.exp(-(r_minus - r_plus)))
    finally:
        jax.config.update("jax_enable_x64", previous)
    np.testing.assert_allclose(res.reward_before, before, rtol=0, atol=1e-6)
    np.testing.assert_allclose(res.bt_weight, g, rtol=0, atol=1e-6)
    # Δr = η g ⟨∇r(u), ∇r(y+) − ∇r(y−)⟩ from materialized gradients of β ln π (π_ref is constant)
    flat, unravel = ravel_pytree(params)

    def rewards(theta, batch):
        return 0.5 * response_logprob(lm, unravel(theta), batch)

    chosen, rejected, unseen_ = strip(train.chosen), strip(train.rejected), strip(unseen)
    direction = jax.jit(jax.grad(lambda t: rewards(t, chosen)[0] - rewards(t, rejected)[0]))(flat)
    _, along = jax.jit(lambda t, d: jax.jvp(lambda x: rewards(x, unseen_), (t,), (d,)))(flat, direction)  # ⟨∇r(u), d⟩
    expected = 0.1 * 0.5 * np.asarray(along, np.float64)
    assert np.abs(expected).max() > 1e-4
    np.testing.assert_allclose(res.delta, expected, rtol=2e-3, atol=1e-3 * np.abs(expected).max())


@pytest.mark.parametrize("optimizer", ["sgd", pytest.param("adam", marks=pytest.mark.slow)])
def test_a_batch_larger_than_a_chunk_accumulates_its_gradient(x64, optimizer):
    """B = 11 > TRAIN_CHUNK: the step's gradient is summed over chunks of pairs (dynamics.pair_gradient); the
    update equals the whole-batch one, and the prediction against real steps stays first order."""
    from dynamics.chunking import strip
    from dynamics.delta import unit_update
    from dynamics.masks import partition, prepare, trainable_mask
    from dynamics.pair_gradient import TRAIN_CHUNK, first_update, loss_gradient

    lm, params, train, unseen = _setup(n_train=11, seed=2)
    assert train.batch_size > TRAIN_CHUNK
    rm, p = _rm("im", lm, params)
    rm2, p2, spec = prepare(rm, p, "last:1")
    tr, frozen = partition(p2, trainable_mask(rm2, p2, spec))
    whole = unit_update(rm2, tr, frozen, strip(train), optimizer)
    chunked = first_update(loss_gradient(rm2, tr, frozen, train, chunk=4), optimizer, tr)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(chunked), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-10, atol=1e-14)
    res = check_step(rm, p, train, unseen, lrs=np.logspace(-5, -2, 7), params_spec="last:1", optimizer=optimizer)
    s = res.residual_slope()
    assert 1.8 <= s["slope_of_max"] <= 2.2, s

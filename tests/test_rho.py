"""ρ_{k,l}: the vocabulary-chunked computation against full vocabulary vectors, its range and sign, and the
double sums of Eq. (5) against the closed-form Δr of `dynamics.delta`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamics.delta import delta_reward
from dynamics.kernels import rho_from_distributions, rho_terms
from dynamics.models import LM, DecoderConfig, cast_params, default_model_path
from dynamics.rewards import ImplicitRM
from dynamics.rho import closing_token_count, rho_analysis
from dynamics.text import encode_pairs, encode_preferences
from dynamics.tokenizer import load_tokenizer


def _reference_terms(h_u, a, h_v, b, W, cap):
    """Full softmax vectors, in numpy float64."""

    def probs(h):
        z = np.asarray(h, np.float64) @ np.asarray(W, np.float64).T
        if cap is not None:
            z = np.tanh(z / cap) * cap
        z = z - z.max(-1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(-1, keepdims=True)

    p, q = probs(h_u), probs(h_v)
    V = p.shape[1]
    eu, ev = np.eye(V)[a] - p, np.eye(V)[b] - q
    return eu @ ev.T, p, q


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    V=st.integers(3, 50),
    K=st.integers(1, 6),
    L=st.integers(1, 6),
    chunk=st.integers(1, 64),
    scale=st.sampled_from([0.1, 1.0, 5.0]),
    cap=st.sampled_from([None, 2.0]),
)
def test_chunked_rho_equals_full_vocabulary(seed, V, K, L, chunk, scale, cap):
    with jax.enable_x64(True):
        _check_chunked_rho(seed, V, K, L, chunk, scale, cap)


def _check_chunked_rho(seed, V, K, L, chunk, scale, cap):
    rng = np.random.default_rng(seed)
    D = 5
    W = rng.normal(size=(V, D)) * scale
    h_u, h_v = rng.normal(size=(K, D)), rng.normal(size=(L, D))
    a, b = rng.integers(0, V, K), rng.integers(0, V, L)
    a[0] = b[0]  # at least one matching pair
    terms = rho_terms(jnp.asarray(h_u), jnp.asarray(a), jnp.asarray(h_v), jnp.asarray(b), jnp.asarray(W),
                      chunk=chunk, softcap=cap)  # fmt: skip
    ref, p, q = _reference_terms(h_u, a, h_v, b, W, cap)
    rho = np.asarray(terms.rho)
    np.testing.assert_allclose(rho, ref, atol=1e-12)
    np.testing.assert_allclose(np.asarray(terms.cross_train), q[:, a].T, atol=1e-12)
    np.testing.assert_allclose(np.asarray(terms.cross_unseen), p[:, b], atol=1e-12)
    np.testing.assert_allclose(np.asarray(terms.inner), p @ q.T, atol=1e-12)
    assert np.all(np.abs(rho) <= 2 + 1e-12)
    match = a[:, None] == b[None, :]
    assert np.all(rho[match] >= -1e-12)


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), V=st.integers(2, 30), concentration=st.sampled_from([0.05, 0.5, 5.0]))
def test_rho_range_and_sign_on_random_distributions(seed, V, concentration):
    """Properties of docs/math.md §3.2 on Dirichlet-random distributions (no model involved)."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(V, concentration), size=4)
    q = rng.dirichlet(np.full(V, concentration), size=3)
    a, b = rng.integers(0, V, 4), rng.integers(0, V, 3)
    rho = np.asarray(rho_from_distributions(jnp.asarray(a), jnp.asarray(p, jnp.float32),
                                            jnp.asarray(b), jnp.asarray(q, jnp.float32)), np.float64)  # fmt: skip
    tol = 1e-5
    assert np.all(rho <= 2 + tol) and np.all(rho >= -2 - tol)
    pa, qb = p[np.arange(4), a][:, None], q[np.arange(3), b][None, :]
    assert np.all(np.abs(rho) <= 2 * (1 - pa) * (1 - qb) + tol)  # the tighter bound of docs/math.md §3.2
    match = a[:, None] == b[None, :]
    assert np.all(rho[match] >= ((1 - pa) * (1 - qb))[match] - tol)  # matching tokens: ρ ≥ (1−p_t)(1−q_t) ≥ 0
    # uniform p = q, different tokens: ρ = −1/|V|
    u = np.full((1, V), 1 / V)
    r = rho_from_distributions(jnp.asarray([0]), jnp.asarray(u), jnp.asarray([1]), jnp.asarray(u))
    np.testing.assert_allclose(np.asarray(r), -1 / V, rtol=1e-5)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(default_model_path())


TRIPLE = dict(
    prompt='Is the following statement something you would say?\n"I like people"',
    chosen="A truthful reply is yes",
    rejected="Considering the statement, I say no",
)
UNSEEN = ('Is the following statement something you would say?\n"I am kind"', "My response would be certainly")


def _tiny_im(tokenizer, dtype):
    lm = LM(DecoderConfig(family="llama", vocab_size=tokenizer.vocab_size, d_model=16, n_layers=2, n_heads=4,
                          n_kv_heads=2, head_dim=4, d_ff=24, tie_embeddings=True))  # fmt: skip
    params = cast_params(lm.init(jax.random.PRNGKey(0)), dtype)
    params = jax.tree.map(lambda x: x * 20 if x.ndim == 2 else x, params)  # peaked next-token distributions
    rm = ImplicitRM(lm, beta=0.5)
    ref = jax.tree.map(lambda x: x * 1.02, params)
    return rm, rm.init(params, ref)


def test_double_sums_reproduce_closed_form_delta(x64, tokenizer):
    rm, params = _tiny_im(tokenizer, jnp.float64)
    res = rho_analysis(rm, params, **TRIPLE, unseen_prompt=UNSEEN[0], unseen_response=UNSEEN[1],
                       tokenizer=tokenizer, lr=0.1, chunk=5000)  # fmt: skip
    L = rm.lm.config.max_position
    from dynamics.datasets import PreferenceRow

    train = encode_preferences(tokenizer, [PreferenceRow(**TRIPLE, id=0, source="t", line=1)], max_length=L)
    unseen = encode_pairs(tokenizer, [UNSEEN[0]], [UNSEEN[1]], max_length=L)
    for method in ("closed_form", "ntk"):
        d = delta_reward(rm, params, train, unseen, params_spec="unembed", lr=0.1, method=method)
        np.testing.assert_allclose(res.delta_reward, d.delta[0], rtol=1e-9)
        np.testing.assert_allclose(res.kernel_chosen, d.kernel_chosen[0, 0], rtol=1e-9)
        np.testing.assert_allclose(res.kernel_rejected, d.kernel_rejected[0, 0], rtol=1e-9)
    # axes: the unseen tokens and the training tokens, including the template's closing tokens
    assert res.unseen_tokens[-2:] == ["<|im_end|>", "\n"]
    assert res.chosen.train_tokens[-3:] == [" yes", "<|im_end|>", "\n"]
    assert res.chosen.rho.shape == (len(res.unseen_tokens), len(res.chosen.train_tokens))
    assert res.rejected.rho.shape == (len(res.unseen_tokens), len(res.rejected.train_tokens))


def test_excluding_closing_tokens(tokenizer):
    assert closing_token_count(tokenizer) == 2
    rm, params = _tiny_im(tokenizer, jnp.float32)
    full = rho_analysis(rm, params, **TRIPLE, unseen_prompt=UNSEEN[0], unseen_response=UNSEEN[1],
                        tokenizer=tokenizer)  # fmt: skip
    content = rho_analysis(rm, params, **TRIPLE, unseen_prompt=UNSEEN[0], unseen_response=UNSEEN[1],
                           tokenizer=tokenizer, exclude_closing=True)  # fmt: skip
    assert content.unseen_tokens == full.unseen_tokens[:-2]
    assert content.chosen.train_tokens == full.chosen.train_tokens[:-2]
    np.testing.assert_allclose(content.chosen.rho, full.chosen.rho[:-2, :-2], rtol=1e-5, atol=1e-6)
    # the closing tokens match each other: ρ ≥ 0 on that 2×2 corner's diagonal
    assert np.all(np.diag(full.chosen.rho[-2:, -2:]) >= 0)
    d = content.to_dict()
    assert d["closing_tokens_excluded"] is True and len(d["chosen"]["rho"]) == len(content.unseen_tokens)

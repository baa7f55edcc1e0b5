"""Numerics the rest of the suite only checked against the code's own output, now against independent computations.

- Adam's first real step (dynamics.step_check) and AdamW training (dynamics.training) against numpy, on the EX-RM head,
  whose BT gradient has the closed form −(1/B) Σ_i σ(r_i− − r_i+) (h_i+ − h_i−);
- the IM-RM's cached ln π_ref against numpy log-softmax of the reference model's logits (float64, ≤ 1e-12);
- the reference-free IM-RM's Δr against materialized autodiff gradients and a finite real step;
- checkpoints: damaged files and checkpoints of another configuration are RmdynErrors, `keep_checkpoints` keeps
  exactly that many, an EX-GRM run resumes to the uninterrupted run's parameters;
- `seed` (data order) and `head_seed` (head initialization) against their documented definitions.

Tiny random decoders (V = 40, D = 16, 2 blocks) in float64 (`x64` fixture) unless stated.
"""

from __future__ import annotations

import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynamics.chunking import strip
from dynamics.delta import delta_reward
from dynamics.errors import ConfigError, RmdynError
from dynamics.masks import partition, prepare, trainable_mask
from dynamics.models import LM, DecoderConfig, cast_params, resize_vocab, untie
from dynamics.rewards import ExplicitRM, ImplicitRM
from dynamics.step_check import real_step_jit
from dynamics.text import ExgrmBatch, PairBatch, PreferenceBatch
from dynamics.training import EvalSuite, TrainConfig, train

V, D, T = 40, 16, 12
EPS = 1e-8  # optax's and torch's Adam ε, added to √v̂ (outside the square root)


@functools.cache
def _lm() -> tuple[LM, dict]:
    """The one tiny decoder of this file, float64 (initializing a new configuration costs seconds: the other
    models below are derived from this one)."""
    config = DecoderConfig(
        family="llama", vocab_size=V, d_model=D, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=24,
        tie_embeddings=True,
    )  # fmt: skip
    lm = LM(config)
    return lm, cast_params(lm.init(jax.random.PRNGKey(0)), jnp.float64)


def _pairs(rng: np.random.Generator, n: int, prompts: list[np.ndarray]) -> PairBatch:
    """Right-padded rows: prompt i, then a response of 2–5 tokens."""
    tok, att, resp = (np.zeros((n, T), np.int32) for _ in range(3))
    for i in range(n):
        ids = np.concatenate([prompts[i], rng.integers(3, V, int(rng.integers(2, 6)))])
        tok[i, : len(ids)], att[i, : len(ids)], resp[i, len(prompts[i]) : len(ids)] = ids, 1, 1
    return PairBatch(tok, att, resp)


def _data(n: int, seed: int) -> PreferenceBatch:
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, V, int(rng.integers(3, 6))) for _ in range(n)]
    return PreferenceBatch(_pairs(rng, n, prompts), _pairs(rng, n, prompts))


@functools.cache
def _jitted(lm: LM, name: str):
    return jax.jit(getattr(lm, name))


def _last_hidden(lm: LM, params, batch) -> np.ndarray:
    """h at each row's last real token (right padding), float64 numpy."""
    h = np.asarray(_jitted(lm, "forward")(params, jnp.asarray(batch.tokens), jnp.asarray(batch.attention_mask)))
    last = np.asarray(batch.attention_mask).sum(1) - 1
    return h[np.arange(len(last)), last]


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _head_grad(u: np.ndarray, hp: np.ndarray, hm: np.ndarray) -> np.ndarray:
    """∇_u of −mean ln σ(⟨u, h+⟩ − ⟨u, h−⟩): −(1/B) Σ_i σ(r_i− − r_i+) (h_i+ − h_i−)."""
    g = _sigmoid(hm @ u - hp @ u)
    return -(g[:, None] * (hp - hm)).mean(0)


def _head_init(head_seed: int, std: float) -> np.ndarray:
    """The documented EX-RM head initialization: u = std · N(0, I), drawn and scaled in float32 from
    PRNGKey(head_seed) (the same head in every dtype), then cast."""
    normal = np.asarray(jax.random.normal(jax.random.PRNGKey(head_seed), (D,), jnp.float32))
    return (np.float32(std) * normal).astype(np.float64)


def _response_logprob_numpy(lm: LM, params, batch: PairBatch) -> np.ndarray:
    """ln π(y|x) = Σ_k ln softmax(logits at t − 1)[y_t] over response positions t, in numpy float64."""
    logits = np.asarray(_jitted(lm, "logits")(params, jnp.asarray(batch.tokens), jnp.asarray(batch.attention_mask)))
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    tokens, resp = np.asarray(batch.tokens), np.asarray(batch.response_mask)
    out = np.zeros(tokens.shape[0])
    for b in range(tokens.shape[0]):
        for t in range(1, tokens.shape[1]):
            if resp[b, t]:
                out[b] += logp[b, t - 1, tokens[b, t]]
    return out


# ----------------------------------------------------------------------------------------------------------
# Adam: the real first step of dynamics.step_check, and AdamW training
# ----------------------------------------------------------------------------------------------------------


def test_adam_first_real_step_is_the_hand_computed_one(x64):
    """Δu = −η ĝ/(|ĝ| + ε) (m̂ = g, v̂ = g² after bias correction, ε outside the root), ĝ from the closed form."""
    lm, params = _lm()
    data = _data(3, 0)
    rm = ExplicitRM(lm)
    p = rm.init(params, seed=1, std=0.3)
    rm, p, spec = prepare(rm, p, "head")
    train_tree, frozen = partition(p, trainable_mask(rm, p, spec))
    u = np.asarray(p["head"]["u"], np.float64)
    hp, hm = _last_hidden(lm, params, data.chosen), _last_hidden(lm, params, data.rejected)
    grad = _head_grad(u, hp, hm)
    lr = 1e-3
    expected = u - lr * grad / (np.abs(grad) + EPS)
    new = real_step_jit(rm, train_tree, frozen, strip(data), jnp.asarray(lr, jnp.float64), "adam")
    step = np.asarray(new["head"]["u"]) - u
    np.testing.assert_allclose(np.asarray(new["head"]["u"]), expected, rtol=0, atol=1e-14)
    # not vacuous: every coordinate moved by ≈ η ≫ the tolerance, and ε's placement is resolved by the tolerance
    assert np.abs(step).min() > 0.5 * lr
    inside_root = u - lr * grad / np.sqrt(grad**2 + EPS)  # ε under the square root (a different optimizer)
    no_eps = u - lr * np.sign(grad)
    assert np.abs(inside_root - expected).max() > 1e4 * 1e-14
    assert np.abs(no_eps - expected).max() > 1e2 * 1e-14


def _adam_by_hand(u0, grad_fn, lr, steps, b1=0.9, b2=0.999, eps=EPS, wd=0.0):
    """AdamW (decoupled decay, as optax.adamw and torch.optim.AdamW) with bias correction, in numpy."""
    u, m, v = u0.copy(), np.zeros_like(u0), np.zeros_like(u0)
    for t in range(1, steps + 1):
        g = grad_fn(u)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        u = u - lr * (m_hat / (np.sqrt(v_hat) + eps) + wd * u)
    return u


def test_adamw_training_is_the_hand_computed_trajectory(x64):
    """Two full-batch AdamW steps (weight decay 0.1) on the head alone equal numpy's AdamW on the closed-form
    gradient, started from the documented head initialization."""
    lm, params = _lm()
    data = _data(6, 2)
    hp, hm = _last_hidden(lm, params, data.chosen), _last_hidden(lm, params, data.rejected)
    u0 = _head_init(3, 0.3)
    lr, wd = 0.05, 0.1
    config = TrainConfig(reward="ex", params="head", optimizer="adamw", lr=lr, weight_decay=wd, epochs=2,
                         batch_size=6, micro_batch_size=6, head_seed=3, head_init_std=0.3, bucket=T,
                         eval_at_start=False)  # fmt: skip
    result = train(config, lm, params, data, None, progress=False)
    assert result.steps == 2
    got = np.asarray(result.params["head"]["u"])
    expected = _adam_by_hand(u0, lambda u: _head_grad(u, hp, hm), lr, 2, wd=wd)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    assert np.abs(got - u0).max() > 1e-2  # it moved, by far more than the tolerance
    without_decay = _adam_by_hand(u0, lambda u: _head_grad(u, hp, hm), lr, 2, wd=0.0)
    assert np.abs(without_decay - expected).max() > 1e-4  # the decay is resolved by the comparison
    # the frozen decoder did not move
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(result.params["lm"]), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------------------------------------
# The IM-RM's cached ln π_ref
# ----------------------------------------------------------------------------------------------------------


class _Captured(Exception):
    pass


def test_reference_logprob_cache_keeps_float64(x64, monkeypatch):
    """The cache the training step subtracts is ln π_ref of every training row in the run's float64 (≤ 1e-12).

    "last:1": the cache is computed on the frozen blocks' cached output. The first step's `accumulate_gradients`
    receives the cache and stops the run (nothing else needs compiling)."""
    from dynamics.training import engine

    lm, params = _lm()
    data = _data(6, 3)
    seen = []

    def spy(compiled, train_tree, frozen, micro_batches, pairs, *rest, **kw):
        seen.append({"chosen": np.array(pairs.ref_chosen), "rejected": np.array(pairs.ref_rejected)})
        raise _Captured

    monkeypatch.setattr(engine, "accumulate_gradients", spy)
    config = TrainConfig(reward="im", params="last:1", lr=1e-2, max_steps=1, batch_size=6, micro_batch_size=6)
    with pytest.raises(_Captured):
        train(config, lm, params, data, None, progress=False)
    assert len(seen) == 1
    for side in ("chosen", "rejected"):
        cache = seen[0][side]
        expected = _response_logprob_numpy(lm, params, getattr(data, side))
        assert cache.dtype == np.float64
        np.testing.assert_allclose(cache, expected, rtol=0, atol=1e-12)
        # a float32 cache would be off by far more than the tolerance
        assert np.abs(expected.astype(np.float32).astype(np.float64) - expected).max() > 1e-9


# ----------------------------------------------------------------------------------------------------------
# The reference-free IM-RM's Δr
# ----------------------------------------------------------------------------------------------------------


def _noref_reward(lm: LM, beta: float, params, batch: PairBatch):
    """β ln π(y|x), written out here (log-softmax of the full logits, summed over the response mask)."""
    tokens = jnp.asarray(batch.tokens)
    logits = lm.logits(params, tokens, jnp.asarray(batch.attention_mask))[:, :-1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return beta * jnp.sum(picked * jnp.asarray(batch.response_mask)[:, 1:].astype(picked.dtype), axis=-1)


def test_reference_free_im_delta_against_autodiff_and_areal_step_jit(x64):
    """Δr(u) = η ⟨∇r(u), −∇L⟩ with r = β ln π (no π_ref), the untied unembedding W trained, from the materialized
    gradients of the test's own reward (eNTK and the Eq. (5) closed form); and r after a real SGD step W − η∇L
    differs from the prediction by O(η²)."""
    beta = 0.5
    lm, params = untie(*_lm())
    data, unseen = _data(2, 5), _data(4, 6).chosen
    rm = ImplicitRM(lm, beta=beta, reference_free=True)
    p = rm.init(params)
    assert set(p) == {"lm"}

    def r(w, batch):  # the reward as a function of W alone
        return _noref_reward(lm, beta, {**params, "lm_head": {"w": w}}, batch)

    def loss(w):
        return -jnp.mean(jax.nn.log_sigmoid(r(w, data.chosen) - r(w, data.rejected)))

    w0 = params["lm_head"]["w"]
    grad_loss = np.asarray(jax.grad(loss)(w0))
    jac = np.asarray(jax.jacrev(r)(w0, unseen)).reshape(4, -1)  # ∇_W r(u) of each unseen pair
    lr = 1e-3
    expected = lr * jac @ -grad_loss.reshape(-1)
    assert np.abs(expected).max() > 1e-6
    rp, rn, ru = (np.asarray(r(w0, b)) for b in (data.chosen, data.rejected, unseen))
    for method in ("ntk", "closed_form"):
        res = delta_reward(rm, p, data, unseen, params_spec="unembed", lr=lr, method=method, chunk_size=2)
        np.testing.assert_allclose(res.delta, expected, rtol=1e-9, atol=1e-15, err_msg=method)
        # the rewards and BT weights are those of β ln π, not of a π = π_ref tie
        np.testing.assert_allclose(res.train_chosen_reward, rp, rtol=1e-12)
        np.testing.assert_allclose(res.train_rejected_reward, rn, rtol=1e-12)
        np.testing.assert_allclose(res.bt_weight, _sigmoid(rn - rp), rtol=1e-12)
        np.testing.assert_allclose(res.reward_before, ru, rtol=1e-12)
    assert np.abs(res.bt_weight - 0.5).max() > 0.05
    residuals = []  # a finite real step: the residual is second order in η
    for eta in (1e-3, 1e-4):
        actual = np.asarray(r(w0 - eta * grad_loss, unseen)) - ru
        residuals.append(np.abs(actual - expected * eta / lr).max())
        assert np.abs(actual).max() > 30 * residuals[-1]
    assert 30 < residuals[0] / residuals[1] < 300, residuals  # ∝ η²: a factor 100 for a factor 10 in η


# ----------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------


def _run(lm, lm_params, data, run_dir=None, resume=False, callbacks=(), **options):
    """A short run; bucket = T and no packing, so that every micro-batch has one shape (one compilation)."""
    options = {"reward": "ex", "params": "head", "lr": 0.1, "optimizer": "sgd", "epochs": 1, "batch_size": 2,
               "micro_batch_size": 2, "bucket": T, "pack_pairs": False, "head_init_std": 0.3,
               "checkpoint_every_steps": 1, **options}  # fmt: skip
    answer_ids = (5, 6) if options["reward"] == "exgrm" else None
    suite = EvalSuite.from_preferences({"train": data})
    return train(TrainConfig(**options), lm, lm_params, data, suite, run_dir=run_dir, resume=resume,
                 callbacks=list(callbacks), answer_ids=answer_ids, progress=False)  # fmt: skip


class _Stop:
    def __init__(self, at: int):
        self.at = at

    def __call__(self, info):
        if info.step == self.at:
            raise KeyboardInterrupt


def _cut_run(tmp_path, name="cut", at=2, **options):
    lm, params = _lm()
    data = _data(8, 7)
    with pytest.raises(KeyboardInterrupt):
        _run(lm, params, data, tmp_path / name, callbacks=[_Stop(at)], **options)
    return lm, params, data, tmp_path / name


def test_damaged_checkpoint_files_are_named_errors(x64, tmp_path):
    lm, params, data, cut = _cut_run(tmp_path)
    ckpt = cut / "checkpoints" / "step_00000002"
    pristine = tmp_path / "pristine"
    shutil.copytree(cut, pristine)

    def damaged(path, content: bytes, match: str):
        shutil.rmtree(cut)
        shutil.copytree(pristine, cut)
        path.write_bytes(content)
        with pytest.raises(RmdynError, match=match) as err:
            _run(lm, params, data, cut, resume=True)
        assert "damaged" in str(err.value)

    damaged(ckpt / "state.safetensors", b"\x00\x01 not a safetensors file", r"step_00000002/state\.safetensors")
    state = (pristine / "checkpoints/step_00000002/state.safetensors").read_bytes()
    damaged(ckpt / "state.safetensors", state[: len(state) // 2], r"state\.safetensors: unreadable")  # truncated
    damaged(ckpt / "meta.json", b'{"format": 1, "step": ', r"step_00000002/meta\.json: unreadable")
    damaged(cut / "checkpoints/latest.json", b"[1, 2", r"latest\.json: cannot read")
    damaged(cut / "checkpoints/latest.json", b'{"checkpoint": "../../etc"}', r"latest\.json: cannot read")
    damaged(cut / "checkpoints/latest.json", b'{"checkpoint": "step_00000009"}', r"step_00000009/meta\.json")
    # the pristine copy resumes
    shutil.rmtree(cut)
    shutil.copytree(pristine, cut)
    assert _run(lm, params, data, cut, resume=True).resumed_from_step == 2


def test_checkpoint_of_another_configuration_is_refused(x64, tmp_path):
    lm, params, data, cut = _cut_run(tmp_path)
    cases = [
        ({"reward": "im", "params": "all"}, None, r"reward_model.*train\.params.*train\.reward"),
        ({"params": "last:1"}, None, r"cannot resume: mask, train\.params"),
        ({}, (lm, jax.tree.map(lambda a: a * 1.01, params)), r"cannot resume: initial_params_sha256"),  # same shapes
        ({}, resize_vocab(lm, params, V + 2), r"cannot resume: model"),
        ({"head_seed": 4}, None, r"initial_params_sha256.*train\.head_seed"),
    ]
    for options, model, match in cases:
        lm2, params2 = model if model is not None else (lm, params)
        with pytest.raises(RmdynError, match=match):
            _run(lm2, params2, data, cut, resume=True, **options)
    # a checkpoint copied into a directory without (or with another) config.json: its own record is checked
    stray = tmp_path / "stray"
    shutil.copytree(cut / "checkpoints", stray / "checkpoints")
    with pytest.raises(ConfigError, match=r"checkpoint was written with other options \(train\.lr"):
        _run(lm, params, data, stray, resume=True, lr=0.5)
    with pytest.raises(ConfigError, match=r"checkpoint belongs to a run with another model, mask, initial_params"):
        _run(*resize_vocab(lm, params, V + 2), data, stray, resume=True)
    with pytest.raises(ConfigError, match=r"checkpoint belongs to a run with another reward_model; use another"):
        _run(lm, params, data, stray, resume=True, reward="ex-mean")
    # nothing above touched the run: it still resumes
    assert _run(lm, params, data, cut, resume=True).resumed_from_step == 2


@pytest.mark.parametrize("keep", [1, 3])
def test_keep_checkpoints_keeps_exactly_that_many(x64, tmp_path, keep):
    lm, params = _lm()
    data = _data(10, 8)  # 5 steps of 2 rows, a checkpoint after each
    result = _run(lm, params, data, tmp_path / "r", keep_checkpoints=keep)
    assert result.steps == 5
    root = tmp_path / "r" / "checkpoints"
    kept = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert kept == [f"step_{s:08d}" for s in range(6 - keep, 6)]
    assert sorted(p.name for p in root.iterdir() if p.is_file()) == ["latest.json"]
    assert json.loads((root / "latest.json").read_text()) == {"checkpoint": "step_00000005", "step": 5}


def test_exgrm_interrupted_run_resumes_to_the_same_parameters(x64, tmp_path):
    lm, params = _lm()
    data = _data(6, 9)
    data = PreferenceBatch(*(ExgrmBatch(s.tokens, s.attention_mask) for s in (data.chosen, data.rejected)))
    options = dict(reward="exgrm", params="last:1", optimizer="adam", lr=1e-2, epochs=2, eval_every_steps=2)
    whole = _run(lm, params, data, tmp_path / "whole", **options)
    with pytest.raises(KeyboardInterrupt):
        _run(lm, params, data, tmp_path / "cut", callbacks=[_Stop(4)], **options)
    resumed = _run(lm, params, data, tmp_path / "cut", resume=True, **options)
    assert resumed.resumed_from_step == 4 and resumed.steps == whole.steps == 6
    moved = 0.0
    flat_start = dict(jax.tree_util.tree_flatten_with_path({"lm": params})[0])
    for (path, a), b in zip(
        jax.tree_util.tree_flatten_with_path(whole.params)[0], jax.tree.leaves(resumed.params), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a), err_msg=jax.tree_util.keystr(path))
        if path in flat_start:
            moved = max(moved, float(np.abs(np.asarray(a) - np.asarray(flat_start[path])).max()))
    assert moved > 1e-3  # the runs trained: the equality is not between two copies of the start
    log = lambda d: (d / "metrics.jsonl").read_text().splitlines()  # noqa: E731
    assert log(tmp_path / "cut") == log(tmp_path / "whole")


# ----------------------------------------------------------------------------------------------------------
# seed and head_seed
# ----------------------------------------------------------------------------------------------------------


def test_seed_sets_the_data_order_and_head_seed_the_head(x64):
    """One SGD step of 4 of 8 rows on the head: the rows are the first 4 of numpy's PCG64 permutation seeded with
    SeedSequence([seed, 0]), the head starts at head_init_std · N(0, I) from PRNGKey(head_seed)."""
    lm, params = _lm()
    data = _data(8, 10)
    hp, hm = _last_hidden(lm, params, data.chosen), _last_hidden(lm, params, data.rejected)
    lr = 0.1

    def one_step(seed, head_seed):
        result = _run(lm, params, data, None, max_steps=1, batch_size=4, lr=lr, seed=seed, head_seed=head_seed,
                      eval_at_start=False)  # fmt: skip
        return np.asarray(result.params["head"]["u"]), result.history[0]["loss"]

    def by_hand(seed, head_seed):
        rows = np.random.default_rng(np.random.SeedSequence([seed, 0])).permutation(8)[:4]
        u0 = _head_init(head_seed, 0.3)
        loss = float(np.mean(np.logaddexp(0.0, -(hp[rows] @ u0 - hm[rows] @ u0))))
        return u0 - lr * _head_grad(u0, hp[rows], hm[rows]), loss, rows

    results = {}
    for seed, head_seed in [(0, 0), (1, 0), (0, 7)]:
        u, loss = one_step(seed, head_seed)
        expected, expected_loss, rows = by_hand(seed, head_seed)
        np.testing.assert_allclose(u, expected, rtol=0, atol=1e-12)
        assert loss == pytest.approx(expected_loss, rel=1e-12)
        results[seed, head_seed] = (u, set(rows.tolist()))
    (u00, rows0), (u10, rows1), (u07, _) = results[0, 0], results[1, 0], results[0, 7]
    assert rows0 != rows1  # the two seeds draw different first batches ...
    assert np.abs(u00 - u10).max() > 1e-3  # ... and end at different heads, far beyond the tolerance
    assert np.abs(u00 - u07).max() > 1e-3  # another head_seed: another head
    again, _ = one_step(0, 0)
    np.testing.assert_array_equal(again, u00)  # equal seeds: identical results

"""dynamics.packing: a pair run as one packed row gives the hidden states, losses and gradients of two rows.

Checked against the unpacked computation (the two sequences through `LM.forward` separately) in float64, on
tiny random Llama and Gemma 2 decoders (sliding window and soft-caps), with right and left padding, prefixes that
run into the responses, a sequence that is a prefix of the other, and the frozen-block cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynamics.masks import partition, trainable_mask
from dynamics.models import LM, DecoderConfig
from dynamics.packing import SEGMENT_PAD, pack_pairs, packed_attention_mask, worth_packing
from dynamics.text import ExgrmBatch, PreferenceBatch
from dynamics.training import (
    OptimizerSpec,
    Rows,
    TrainConfig,
    add_lower_cache,
    build_reward_model,
    compile_step,
    frozen_prefix,
    hidden_states,
    response_index,
    train,
    with_packing,
)

V = 48


def _lm(family: str) -> tuple[LM, dict]:
    if family == "gemma2":
        config = DecoderConfig(
            family="gemma2", vocab_size=V, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=24,
            query_scale=24**-0.5, attn_logit_softcap=5.0, final_logit_softcap=3.0, sliding_window=3,
            layer_types=("sliding", "full"), tie_embeddings=True,
        )  # fmt: skip
    else:
        config = DecoderConfig(
            family="llama", vocab_size=V, d_model=16, n_layers=3, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32,
            tie_embeddings=True,
        )  # fmt: skip
    lm = LM(config)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), lm.init(jax.random.PRNGKey(3)))
    # non-trivial norm scales, so that every parameter matters
    key = jax.random.PRNGKey(4)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    leaves = [a + 0.05 * jax.random.normal(k, a.shape, a.dtype) for a, k in zip(leaves, keys, strict=True)]
    return lm, jax.tree.unflatten(tree, leaves)


def _pairs(padding: str, seed: int = 0, T: int = 14) -> PreferenceBatch:
    """Five pairs: ordinary, a common opening of the responses, identical sequences, a prefix of the other, and
    a pair with no common token at all."""
    rng = np.random.default_rng(seed)
    specs = []
    p = list(rng.integers(3, V, 5))
    specs.append((p, p + list(rng.integers(3, V, 4)), p + list(rng.integers(3, V, 6))))
    p, opening = list(rng.integers(3, V, 3)), list(rng.integers(3, V, 2))
    specs.append((p, p + opening + list(rng.integers(3, V, 3)), p + opening + list(rng.integers(3, V, 5))))
    p = list(rng.integers(3, V, 4))
    same = p + list(rng.integers(3, V, 3))
    specs.append((p, same, list(same)))
    p = list(rng.integers(3, V, 2))
    short = p + list(rng.integers(3, V, 2))
    specs.append((p, short, short + list(rng.integers(3, V, 4))))
    a, b = list(rng.integers(3, V, 5)), list(rng.integers(3, V, 6))
    b[0] = (a[0] + 1 - 3) % (V - 3) + 3  # different first tokens
    specs.append(([], a, b))
    sides = []
    for which in (1, 2):
        tokens = np.zeros((len(specs), T), np.int32)
        attention = np.zeros_like(tokens)
        response = np.zeros_like(tokens)
        for i, spec in enumerate(specs):
            seq, n_prompt = np.array(spec[which]), len(spec[0])
            at = slice(0, len(seq)) if padding == "right" else slice(T - len(seq), T)
            tokens[i, at] = seq
            attention[i, at] = 1
            response[i, at] = (np.arange(len(seq)) >= max(n_prompt, 1)).astype(np.int32)
        from dynamics.text import PairBatch

        sides.append(PairBatch(tokens, attention, response))
    return PreferenceBatch(*sides)


def test_pack_pairs_layout_by_hand():
    from dynamics.packing import SEGMENT_CHOSEN, SEGMENT_REJECTED, SEGMENT_SHARED

    chosen = {"tokens": np.array([[0, 5, 6, 7, 8]]), "attention_mask": np.array([[0, 1, 1, 1, 1]])}  # left pad
    rejected = {"tokens": np.array([[5, 6, 9, 0, 0]]), "attention_mask": np.array([[1, 1, 1, 0, 0]])}  # right
    out = pack_pairs(chosen, rejected, bucket=3)
    np.testing.assert_array_equal(out["pack_tokens"], [[5, 6, 7, 8, 9, 0]])
    np.testing.assert_array_equal(out["pack_mask"], [[1, 1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(out["pack_positions"], [[0, 1, 2, 3, 2, 0]])
    S, C, R = SEGMENT_SHARED, SEGMENT_CHOSEN, SEGMENT_REJECTED
    np.testing.assert_array_equal(out["pack_segment"], [[S, S, C, C, R, SEGMENT_PAD]])
    # chosen position 1..4 → packed 0..3; rejected 0, 1 → shared 0, 1; rejected 2 → packed 4
    np.testing.assert_array_equal(out["unpack_index"], [[0, 0, 1, 2, 3], [0, 1, 4, 0, 0]])
    # packed 0..3 come from chosen row 0 positions 1..4; packed 4 from rejected (row 1) position 2
    np.testing.assert_array_equal(out["pack_source"], [[1, 2, 3, 4, 5 + 2, 0]])
    mask = np.asarray(packed_attention_mask(jnp.asarray(out["pack_segment"])))[0]
    assert mask[4].tolist() == [True, True, False, False, True, False]  # the rejected tail skips the chosen one
    assert mask[3].tolist() == [True, True, True, True, False, False]
    assert not mask[:, 5].any()


def test_worth_packing_rule():
    assert worth_packing(192, 128, 128) and not worth_packing(240, 128, 128)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("padding", ["right", "left"])
def test_packed_hidden_states_equal_the_separate_sequences(x64, family, padding):
    lm, params = _lm(family)
    data = _pairs(padding)
    c, r = Rows.from_batch(data.chosen), Rows.from_batch(data.rejected)
    rows = with_packing(Rows.concat(c, r), pack_pairs(c.arrays(), r.arrays(), bucket=4))
    assert rows.pack_tokens.shape[1] < 2 * c.tokens.shape[1]
    packed = np.asarray(hidden_states(lm, params, jax.tree.map(jnp.asarray, rows), 0))
    both = Rows.concat(c, r)
    separate = np.asarray(lm.forward(params, both.tokens, both.attention_mask))
    real = both.attention_mask.astype(bool)
    np.testing.assert_allclose(packed[real], separate[real], rtol=1e-12, atol=1e-12)


def _micro_step_grads(kind: str, spec: str, family: str, padding: str, pack: bool):
    lm, params = _lm(family)
    config = TrainConfig(reward=kind, params=spec, bucket=4)
    rm, p, spec = build_reward_model(config, lm, params, answer_ids=(5, 6))
    mask = trainable_mask(rm, p, spec)
    start = frozen_prefix(p, mask, lm.config.n_layers)
    train_tree, frozen = partition(p, mask)
    train_tree = {k: v for k, v in train_tree.items() if k != "ref"}
    frozen = {k: v for k, v in frozen.items() if k != "ref"}
    compiled = compile_step(rm, start, OptimizerSpec.from_config(config))
    data = _pairs(padding, seed=1)
    if kind == "exgrm":
        data = PreferenceBatch(*(ExgrmBatch(s.tokens, s.attention_mask) for s in (data.chosen, data.rejected)))
    c, r = Rows.from_batch(data.chosen), Rows.from_batch(data.rejected)
    if start:
        c = add_lower_cache(compiled, frozen["lm"], c, 3, 4)
        r = add_lower_cache(compiled, frozen["lm"], r, 3, 4)
    both = Rows.concat(c, r)
    if kind.startswith("im"):
        both = response_index(both, 4)
    if pack:
        both = with_packing(both, pack_pairs(c.arrays(), r.arrays(), 4))
    b = c.tokens.shape[0]
    ref = {"im": np.linspace(-3.0, -1.0, 2 * b), "im-noref": np.zeros(2 * b)}.get(kind)  # as train() passes
    both = jax.tree.map(jnp.asarray, both)
    grads, loss, wins = compiled.first_micro_step(train_tree, frozen, both, ref)
    return grads, float(loss), float(wins), start


@pytest.mark.parametrize(
    ("kind", "spec", "family", "padding"),
    [
        ("im", "all", "llama", "right"),
        ("im", "last:1", "gemma2", "left"),
        ("ex", "all", "gemma2", "right"),
        ("ex", "last:2", "llama", "left"),
        ("ex-mean", "all", "llama", "left"),
        ("im-noref", "last:1", "llama", "right"),
        ("exgrm", "all", "llama", "right"),
    ],
)
def test_packed_micro_step_equals_the_unpacked_one(x64, kind, spec, family, padding):
    """Losses, accuracy and every gradient leaf agree to float64 rounding (independent: two separate rows)."""
    g_pack, loss_pack, wins_pack, start = _micro_step_grads(kind, spec, family, padding, pack=True)
    g_plain, loss_plain, wins_plain, _ = _micro_step_grads(kind, spec, family, padding, pack=False)
    assert (start > 0) == spec.startswith("last")  # the cached-residual path is among the cases
    assert loss_pack == pytest.approx(loss_plain, rel=1e-12)
    assert wins_pack == wins_plain
    leaves = jax.tree_util.tree_flatten_with_path(g_plain)[0]
    assert leaves
    for (path, a), b in zip(leaves, jax.tree.leaves(g_pack), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert np.max(np.abs(a - b)) <= 1e-10 * max(np.max(np.abs(a)), 1e-300), jax.tree_util.keystr(path)


def test_training_with_and_without_packing_ends_at_the_same_parameters(x64):
    lm, params = _lm("llama")
    data = _pairs("right", seed=2)
    from dynamics.training import EvalSuite

    suite = EvalSuite.from_preferences({"train": data})
    common = dict(reward="im", lr=1e-2, epochs=2, batch_size=5, micro_batch_size=5, bucket=4, eval_at_start=False)
    packed = train(TrainConfig(**common), lm, params, data, suite, progress=False)
    plain = train(TrainConfig(**common, pack_pairs=False), lm, params, data, suite, progress=False)
    assert packed.timing["packed_micro_batches"] == 2 and plain.timing["packed_micro_batches"] == 0
    for a, b in zip(jax.tree.leaves(packed.params), jax.tree.leaves(plain.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-12)
    assert packed.final_eval == pytest.approx(plain.final_eval, rel=1e-9)

"""dynamics.training.packed_eval: many sequences on one shared-prefix packed row give their own hidden states.

Checked in float64 against each sequence run alone through `LM.forward`, on tiny random Llama and Gemma 2
decoders (sliding window, soft-caps), with sets padded on either side, several prompts with many responses each,
a duplicate sequence (an empty tail), a sequence that is a prefix of another, and the frozen-block cache; and a
training run's evaluation with `pack_eval` on against the same run with it off (EX-RM and IM-RM, with and without
the cache), rewards equal to float rounding, r = 0 exactly at the start of an IM-RM.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from test_packing import V, _lm

from dynamics.errors import DataError
from dynamics.text import PairBatch, PreferenceBatch
from dynamics.training import EvalSuite, Rows, TrainConfig, hidden_states, train
from dynamics.training.hidden import packed_lower_hidden
from dynamics.training.packed_eval import build_packed_eval, pack_plan, split_values


def _sets(seed: int = 0) -> dict[str, Rows]:
    """Three row-aligned sets over 4 prompts (2–6 tokens): responses of 1–4 tokens; set "c" is left-padded; row 1
    of "b" duplicates row 1 of "a"; row 2 of "b" is row 2 of "a" plus one token (a prefix of the other)."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, V, int(rng.integers(2, 7))) for _ in range(4)]
    seqs = {name: [] for name in "abc"}
    for p in prompts:
        for name in "abc":
            seqs[name].append((p, rng.integers(0, V, int(rng.integers(1, 5)))))
    seqs["b"][1] = seqs["a"][1]
    seqs["b"][2] = (seqs["a"][2][0], np.concatenate([seqs["a"][2][1], [7]]))
    T = 12
    out = {}
    for name, rows in seqs.items():
        tok, att, resp = (np.zeros((4, T), np.int32) for _ in range(3))
        for r, (p, y) in enumerate(rows):
            q = np.concatenate([p, y])
            at = slice(0, len(q)) if name != "c" else slice(T - len(q), T)
            tok[r, at], att[r, at] = q, 1
            resp[r, at] = np.r_[np.zeros(len(p)), np.ones(len(y))]
        out[name] = Rows(tok, att, resp)
    return out


def test_pack_plan_limits_rows():
    seqs = [np.array(s) for s in ([1, 2, 3], [1, 2, 4], [1, 2, 4, 5], [9, 9], [9, 8])]
    assert pack_plan(seqs, max_seqs=5, max_len=100) == [[0, 1, 2, 3, 4]]
    assert pack_plan(seqs, max_seqs=2, max_len=100) == [[0, 1], [2, 3], [4]]
    # trie nodes: [1,2,3] 3, + [1,2,4] 1 more, + [1,2,4,5] 1 more = 5; + [9,9] 2 more = 7 > 5; [9,9] + [9,8] = 3
    assert pack_plan(seqs, max_seqs=5, max_len=5) == [[0, 1, 2], [3, 4]]
    assert pack_plan(seqs, max_seqs=5, max_len=4) == [[0, 1], [2], [3, 4]]  # 4 + 2 nodes > 4
    assert pack_plan([np.arange(9)], max_seqs=3, max_len=4) == [[0]]  # a longer single sequence keeps its row
    with pytest.raises(DataError, match="max_seqs"):
        pack_plan(seqs, max_seqs=0, max_len=10)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_packed_hidden_states_equal_each_sequence_alone(x64, family):
    lm, params = _lm(family)
    sets = _sets()
    packed = build_packed_eval(sets, max_seqs=5, bucket=4, response_positions=True, max_len=24)
    assert packed.n_rows == 12 and packed.names == ("a", "b", "c")
    plain = sum(r.tokens.size for r in sets.values())
    assert packed.positions() < plain
    alone = {name: np.asarray(lm.forward(params, rows.tokens, rows.attention_mask)) for name, rows in sets.items()}
    seen = np.zeros(12, bool)
    hidden = jax.jit(hidden_states, static_argnums=(0, 3))
    lower = jax.jit(packed_lower_hidden, static_argnums=(0, 3))
    for c, chunk in enumerate(packed.chunks):
        h = np.asarray(hidden(lm, params, chunk, 0))
        x = lower(lm, params, chunk, 1)  # the frozen-block cache of the packed row
        h_cached = np.asarray(hidden(lm, params, chunk.replace(x=x), 1))
        for k, merged in enumerate(packed.index[c]):
            if merged < 0:
                continue
            seen[merged] = True
            name = packed.names[int(np.searchsorted(packed.offsets, merged, side="right")) - 1]
            r = merged - packed.offsets[packed.names.index(name)]
            rows = sets[name]
            real = rows.attention_mask[r] > 0
            n = int(real.sum())
            np.testing.assert_array_equal(chunk.tokens[k, :n], rows.tokens[r][real])
            np.testing.assert_allclose(h[k, :n], alone[name][r][real], rtol=1e-10, atol=1e-10)
            np.testing.assert_allclose(h_cached[k, :n], alone[name][r][real], rtol=1e-10, atol=1e-10)
    assert seen.all()


def test_split_values_restores_each_set():
    sets = _sets(seed=1)
    packed = build_packed_eval(sets, max_seqs=3, bucket=4, response_positions=False)
    # each slot's value: its set's index × 100 + its row there, computed from the chunk's own tokens
    lookup = {}
    for k, name in enumerate(packed.names):
        for r in range(4):
            real = sets[name].attention_mask[r] > 0
            lookup.setdefault(tuple(sets[name].tokens[r][real]), []).append(100 * k + r)
    values = []
    for c, chunk in enumerate(packed.chunks):
        v = np.zeros(len(packed.index[c]))
        for s, merged in enumerate(packed.index[c]):
            if merged >= 0:
                k = int(np.searchsorted(packed.offsets, merged, side="right")) - 1
                v[s] = 100 * k + merged - packed.offsets[k]
                n = int(chunk.attention_mask[s].sum())
                assert v[s] in lookup[tuple(chunk.tokens[s, :n])]
        values.append(v)
    out = split_values(packed, values)
    for k, name in enumerate(packed.names):
        np.testing.assert_array_equal(out[name], 100 * k + np.arange(4))


def test_bad_sets_are_refused():
    sets = _sets()
    with pytest.raises(DataError, match="response_mask"):
        build_packed_eval({**sets, "d": Rows(sets["a"].tokens, sets["a"].attention_mask)}, 4, 4,
                          response_positions=False)  # fmt: skip
    hole = sets["a"].attention_mask.copy()
    hole[0, 1] = 0
    with pytest.raises(DataError, match="'a' row 0"):
        build_packed_eval({"a": sets["a"].replace(attention_mask=hole)}, 4, 4, response_positions=False)
    with pytest.raises(DataError, match="no evaluation sets"):
        build_packed_eval({}, 4, 4, response_positions=False)


def _batch(rows: Rows) -> PairBatch:
    return PairBatch(rows.tokens, rows.attention_mask, rows.response_mask)


@pytest.mark.parametrize(("reward", "trained"), [("im", "last:1"), ("ex", "last:1"), ("ex", "all")])
def test_training_evaluation_is_the_same_packed_or_not(x64, reward, trained):
    lm, params = _lm("llama")
    sets = _sets(seed=2)
    train_data = PreferenceBatch(_batch(sets["a"]), _batch(sets["c"]))
    suite = EvalSuite(
        {name: _batch(rows) for name, rows in sets.items()},
        {"ab": ("a", "b"), "ac": ("a", "c"), "cb": ("c", "b")},
    )
    from dynamics.training import reuse

    out = {}
    for pack in (True, False):
        reuse.clear()  # another test's run of this model may have kept its frozen blocks' output
        options = {"reward": reward, "params": trained, "optimizer": "adam", "lr": 1e-2, "epochs": 2,
                   "batch_size": 2, "micro_batch_size": 2, "bucket": 4, "eval_batch_size": 5, "pack_eval": pack,
                   "head_init_std": 0.3, "seed": 1}  # fmt: skip
        out[pack] = train(TrainConfig(**options), lm, params, train_data, suite, run_dir=None, progress=False)
    reuse.clear()
    packed, plain = out[True], out[False]
    traces = packed.timing["traces"]
    assert traces["lower_packed"] == (1 if trained == "last:1" else 0)
    assert traces["score" if reward == "ex" else "logprob"] == (1 if reward == "ex" else 2)  # one shape
    for name in sets:
        assert np.abs(plain.final_rewards[name]).max() > 1e-3
        np.testing.assert_allclose(packed.final_rewards[name], plain.final_rewards[name], rtol=1e-9, atol=1e-12)
    if reward == "im":
        assert packed.history[0]["ab/rewards/margins"] == 0.0  # r = 0 exactly at θ_0: ln π_ref on the same rows


def test_an_ex_rm_reuses_the_packed_frozen_blocks_of_an_im_rm(x64):
    """The packed rows of an EX-RM and an IM-RM differ only in the IM-RM's response nodes: the frozen blocks'
    output of the packed rows is computed once for both."""
    from dynamics.training import reuse

    lm, params = _lm("llama")
    sets = _sets(seed=3)
    train_data = PreferenceBatch(_batch(sets["a"]), _batch(sets["c"]))
    suite = EvalSuite({name: _batch(rows) for name, rows in sets.items()}, {"ab": ("a", "b")})
    reuse.clear()
    runs = {}
    for reward in ("im", "ex"):
        options = {"reward": reward, "params": "last:1", "epochs": 1, "batch_size": 2, "micro_batch_size": 2,
                   "bucket": 4, "eval_batch_size": 5}  # fmt: skip
        runs[reward] = train(TrainConfig(**options), lm, params, train_data, suite, run_dir=None, progress=False)
    assert runs["im"].timing["traces"]["lower_packed"] == 1
    assert runs["ex"].timing["traces"]["lower_packed"] == 0 and runs["ex"].timing["traces"]["lower"] == 0
    reuse.clear()

"""The contribution matrix C (docs/math.md §10.1), its token-pair view (§10.6) and overlap scores (§10.5), checked
against independent computations: the Δr engine (JVPs, `dynamics.delta`), plain `jax.grad` of the batch rewards,
and Python loops over tokens. Tiny random models in float64.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from test_delta import _pairs, _rm, _setup

from dynamics.attribution import EvalSet, contribution_matrix, load_eval_items
from dynamics.attribution.analysis import attribute
from dynamics.attribution.overlap import overlap_scores
from dynamics.delta import delta_reward
from dynamics.errors import ConfigError, DataError
from dynamics.masks import combine, partition, prepare, trainable_mask
from dynamics.text import PreferenceBatch


def _rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.mark.parametrize("kind", ["ex", "im"])
@pytest.mark.parametrize("spec", ["all", pytest.param("last:1", marks=pytest.mark.slow), "output"])
def test_exact_c_equals_delta_engine_kernel_terms(x64, kind, spec):
    """C_uj = η w_j (K(u,y_j+) − K(u,y_j−)) with K from the Δr engine's JVPs, and mean_j C_uj = Δr(u)."""
    lm, params, train, unseen = _setup("llama", True, 3, side="left")
    rm, p = _rm(kind, lm, params)
    d = delta_reward(rm, p, train, unseen, params_spec=spec, lr=0.1, decompose=True, chunk_size=2)
    c = contribution_matrix(rm, p, train, EvalSet(unseen), params_spec=spec, lr=0.1, block=2)
    expected = 0.1 * d.bt_weight[None, :] * (d.kernel_chosen - d.kernel_rejected)
    assert c.contribution.shape == (unseen.batch_size, 3)
    assert _rel(c.contribution, expected) <= 1e-8
    assert _rel(c.predicted_change, d.delta) <= 1e-8
    np.testing.assert_allclose(c.weight, d.bt_weight, rtol=1e-12)
    np.testing.assert_allclose(c.eval_value, d.reward_before, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("kind", [pytest.param("ex", marks=pytest.mark.slow), "im"])
def test_pair_margins_against_autodiff(x64, kind):
    """Eval pairs: A_ij = ⟨∇m_i, ∇m_j⟩ from jax.grad of the full rewards (reference included), raveled by hand."""
    lm, params, train, _ = _setup("gpt_neox", False, 2, seed=3)
    rm, p = _rm(kind, lm, params)
    rng = np.random.default_rng(5)
    ev = EvalSet(_pairs(rng, 3, 9, 3), _pairs(rng, 3, 9, 3))
    c = contribution_matrix(rm, p, train, ev, params_spec="last:1", lr=0.05, block=2)
    rm2, p2, spec = prepare(rm, p, "last:1")
    tr, fr = partition(p2, trainable_mask(rm2, p2, spec))

    @jax.jit
    def grad_margin(a, b, i):
        def m(t):
            q = combine(t, fr)
            return rm2.reward(q, a)[i] - rm2.reward(q, b)[i]

        return ravel_pytree(jax.grad(m)(tr))[0]

    E = jnp.stack([grad_margin(ev.chosen, ev.rejected, jnp.asarray(i)) for i in range(3)])
    T = jnp.stack([grad_margin(train.chosen, train.rejected, jnp.asarray(j)) for j in range(2)])
    inner = np.asarray(E @ T.T)
    assert _rel(c.inner, inner) <= 1e-10
    margins = np.asarray(rm2.reward(p2, ev.chosen) - rm2.reward(p2, ev.rejected))
    np.testing.assert_allclose(c.eval_value, margins, rtol=1e-10, atol=1e-14)
    # pairs are the difference of their two single responses
    ca = contribution_matrix(rm, p, train, EvalSet(ev.chosen), params_spec="last:1", lr=0.05, block=2)
    cb = contribution_matrix(rm, p, train, EvalSet(ev.rejected), params_spec="last:1", lr=0.05, block=2)
    assert _rel(c.contribution, ca.contribution - cb.contribution) <= 1e-10


def _token_overlap_loops(evalset, train) -> np.ndarray:
    """O_ij by Python loops over response tokens (signed over chosen/rejected)."""

    def resp(batch, r):
        t, m = np.asarray(batch.tokens[r]), np.asarray(batch.response_mask[r])
        return [int(x) for x, keep in zip(t[1:], m[1:], strict=True) if keep]

    sides_e = [(1, evalset.chosen)] + ([] if evalset.rejected is None else [(-1, evalset.rejected)])
    out = np.zeros((evalset.size, train.batch_size))
    for i in range(evalset.size):
        for j in range(train.batch_size):
            for sa, a in sides_e:
                for sb, b in [(1, train.chosen), (-1, train.rejected)]:
                    ta, tb = resp(a, i), resp(b, j)
                    out[i, j] += sa * sb * sum(x == y for x in ta for y in tb)
    return out


def test_token_view_reproduces_c_and_overlap_loops(x64):
    """With only the unembedding trained, the token-pair terms sum to C_ij (Eq. (5)), and their indicator part
    equals η w_j I_ij of the overlap scores; O equals a loop count of identical response tokens."""
    lm, params, train, _ = _setup("gpt_neox", False, 3, seed=2)
    rm, p = _rm("im", lm, params)
    rng = np.random.default_rng(9)
    ev = EvalSet(_pairs(rng, 2, 9, 3), _pairs(rng, 2, 9, 3))
    res = attribute(rm, p, train, ev, params_spec="unembed", lr=0.2, top=4, token_entries=6, block=2)
    C = res.contributions.contribution
    assert len(res.token_views) == 6
    for key, view in res.token_views.items():
        i, j = map(int, key.split(","))
        assert abs(view.total - C[i, j]) <= 1e-8 * np.abs(C).max()
        ind = 0.2 * res.contributions.weight[j] * res.scores.indicator[i, j]
        assert abs(view.indicator - ind) <= 1e-10 * max(1.0, abs(ind))
        values = [abs(t.value) for t in view.top]
        assert values == sorted(values, reverse=True) and len(values) == 4
    np.testing.assert_array_equal(res.scores.overlap, _token_overlap_loops(ev, train))
    assert set(res.statistics) >= {"spearman_overlap", "spearman_hidden", "spearman_indicator", "indicator_share"}
    assert res.statistics["indicator_share"] is not None
    # with the unembedding frozen, Eq. (5)'s indicator term is no part of C: no indicator statistics
    frozen_head = attribute(rm, p, train, ev, params_spec="re:layers_1/mlp", lr=0.2, token_entries=0, block=2)
    assert frozen_head.statistics["indicator_share"] is None and frozen_head.statistics["spearman_indicator"] is None


def test_hidden_score_is_the_head_closed_form(x64):
    """EX-RM with only the head trained: C_ij = η w_j H_ij exactly (Eq. (4))."""
    lm, params, train, _ = _setup("llama", True, 3, seed=4)
    rm, p = _rm("ex", lm, params)
    rng = np.random.default_rng(1)
    ev = EvalSet(_pairs(rng, 4, 8, 3), _pairs(rng, 4, 8, 3))
    c = contribution_matrix(rm, p, train, ev, params_spec="head", lr=0.3, block=4)
    s = overlap_scores(lm, p["lm"], train, ev)
    assert _rel(c.contribution, 0.3 * c.weight[None, :] * s.hidden) <= 1e-10


def test_rankings_and_json(x64, tmp_path):
    lm, params, train, unseen = _setup("llama", True, 3)
    rm, p = _rm("ex", lm, params)
    res = attribute(rm, p, train, EvalSet(unseen), params_spec="last:1", lr=0.1, top=2, block=3)
    C = res.contributions.contribution
    for i, r in enumerate(res.rankings):
        assert all(C[i, j] > 0 for j in r["up"]) and all(C[i, j] < 0 for j in r["down"])
        pos = sorted((j for j in range(3) if C[i, j] > 0), key=lambda j: -C[i, j])[:2]
        assert r["up"] == pos
    saved = json.loads(res.save(tmp_path / "a.json").read_text())
    np.testing.assert_allclose(saved["contributions"]["contribution"], C)
    assert res.token_views == {}


def test_bad_input(x64, tmp_path):
    lm, params, train, unseen = _setup("llama", True, 2)
    rm, p = _rm("im", lm, params)
    ev = EvalSet(unseen)
    with pytest.raises(DataError, match="N = 0"):
        contribution_matrix(rm, p, train.select([]), ev)
    with pytest.raises(DataError, match="M = 0"):
        contribution_matrix(rm, p, train, ev.select([]))
    empty = unseen.replace(response_mask=np.zeros_like(unseen.response_mask))
    with pytest.raises(DataError, match="row 0 has an empty response"):
        contribution_matrix(rm, p, train, EvalSet(empty))
    with pytest.raises(ConfigError, match="projection size"):
        contribution_matrix(rm, p, train, ev, mode="projected", project=0)
    with pytest.raises(ConfigError, match="selects no parameter"):
        contribution_matrix(rm, p, train, ev, params_spec="re:nothing_here")
    with pytest.raises(ConfigError, match="GiB budget"):
        contribution_matrix(rm, p, train, ev, memory_budget_gb=1e-6)
    bad = tmp_path / "eval.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    with pytest.raises(DataError, match=r"eval.jsonl line 2: .*'rejected'"):
        load_eval_items(bad)
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    with pytest.raises(DataError, match="line 2: line 1 made this a file of single responses"):
        load_eval_items(bad)
    bad.write_text('{"prompt": "a", "response": "  "}\n')
    with pytest.raises(DataError, match="line 1: field 'response' is empty"):
        load_eval_items(bad)
    good = tmp_path / "ok.jsonl"
    good.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    items = load_eval_items(good)
    assert items.kind == "pairs" and len(items) == 1 and items.describe()[0]["line"] == 1
    assert isinstance(train, PreferenceBatch)


def test_source_ranks_count_larger_entries():
    from dynamics.attribution.analysis import source_ranks

    C = np.array([[0.3, 0.1, -0.2], [0.5, 0.6, 0.7], [0.0, 0.0, 0.0]])
    s = source_ranks(C, [0, 0, None])
    assert s["ranks"] == [1, 3] and s["top1"] == 0.5 and s["mean_rank"] == 2.0 and s["chance_mean_rank"] == 2.0
    assert source_ranks(C, [None, None, None]) is None


def test_train_row_field(tmp_path):
    f = tmp_path / "e.jsonl"
    f.write_text(
        '{"prompt": "a", "chosen": "b", "rejected": "c", "train_row": 3}\n'
        '{"prompt": "a", "chosen": "b", "rejected": "c"}\n'
    )
    assert load_eval_items(f).train_rows == (3, None)
    f.write_text('{"prompt": "a", "response": "b", "train_row": -1}\n')
    with pytest.raises(DataError, match="line 1: field 'train_row' must be an integer ≥ 0"):
        load_eval_items(f)


def test_bundled_inputs_follow_their_sources():
    """persona: the plan's 80 training triples and 40 test paraphrase pairs; ultrafeedback: eval i is the
    paraphrased row of training pair i (same prompt, other responses)."""
    import json as _json

    from experiments.plans.grammar import load_plan
    from experiments.studies.attribution_inputs import bundled_inputs
    from experiments.studies.bundled import bundled_data_path
    from experiments.studies.persona.data import persona_texts

    train, evals = bundled_inputs("persona")
    texts = persona_texts(load_plan("persona").values)
    assert train == [dict(r) for r in texts.train] and len(evals) == 40
    assert [e["prompt"] for e in evals] == [r["prompt"] for r in texts.test]
    assert all(
        e["chosen"].startswith("My response would be ") and e["rejected"].startswith("I lean toward ") for e in evals
    )
    train, evals = bundled_inputs("ultrafeedback")
    assert len(train) == len(evals) == 64 and [e["train_row"] for e in evals] == list(range(64))
    para = {}
    for line in bundled_data_path("preferences/ultrafeedback_paraphrased.test.jsonl").read_text().splitlines():
        obj = _json.loads(line)
        para[obj["source_id"]] = obj
    for t, e in zip(train, evals, strict=True):
        assert e["prompt"] == t["prompt"] and e["chosen"] == para[t["id"]]["chosen"] != t["chosen"]

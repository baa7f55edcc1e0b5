"""experiments.studies.hamiltonian (docs/math.md §6.1) and dynamics.sampling: graphs, y−, cycle checker, sampler."""

from __future__ import annotations

import itertools
import json

import jax
import numpy as np
import pytest

from dynamics.errors import ConfigError, DataError
from experiments.plans.grammar import load_plan
from experiments.studies.hamiltonian.data import hamiltonian_data
from experiments.studies.hamiltonian.graphs import (
    EDGE_SEP_TOKEN,
    SEP_TOKEN,
    HamiltonianGraph,
    could_become_correct,
    cycle_response,
    generate_graphs,
    graph_prompt,
    is_correct_generation,
    is_hamiltonian_cycle,
    make_graph,
    non_cycle_permutation,
    parse_cycle,
    planted_cycle_graph,
)


@pytest.mark.parametrize("n,p", [(10, 0.2), (5, 0.5), (3, 0.0), (12, 0.05)])
def test_every_graph_contains_its_planted_cycle(n, p):
    rng = np.random.default_rng(982)
    for _ in range(200):
        edges, cycle = planted_cycle_graph(n, p, rng)
        assert sorted(cycle) == list(range(n))
        assert all(a < b for a, b in edges) and len(set(edges)) == len(edges)
        assert is_hamiltonian_cycle(cycle, edges, n)


def test_edge_density_and_shuffle():
    rng = np.random.default_rng(0)
    graphs = [planted_cycle_graph(10, 0.2, rng)[0] for _ in range(400)]
    extra = np.mean([len(g) - 10 for g in graphs])
    assert extra == pytest.approx(0.2 * (45 - 10), abs=0.5)  # 35 non-cycle pairs, each with probability p
    assert any(list(g) != sorted(g) for g in graphs)  # shuffled, not in generation order


def test_rejected_permutation_is_never_a_hamiltonian_cycle():
    checked = 0
    for seed in range(300):
        rng = np.random.default_rng(seed)
        n = int(rng.integers(3, 9))
        p = float(rng.uniform(0.0, 0.9))
        try:
            g = make_graph(n, p, rng, max_tries=10)
        except DataError:
            continue  # dense graphs may exhaust the tries: an error, never a Hamiltonian y−
        assert sorted(g.not_cycle) == list(range(n))
        assert not is_hamiltonian_cycle(g.not_cycle, g.edges, n)
        assert is_hamiltonian_cycle(g.cycle, g.edges, n)
        checked += 1
    # most draws give a graph (232 of the 300 seeds when written): the loop is not skipped wholesale
    assert checked >= 200, checked


def test_rejection_sampling_gives_up_with_an_error():
    complete = list(itertools.combinations(range(4), 2))
    with pytest.raises(DataError, match="complete"):
        non_cycle_permutation(4, complete, np.random.default_rng(0))
    # 4 vertices, all but one edge: most permutations are cycles; 1 try fails sometimes, never returns one
    nearly = complete[:-1]
    outcomes = set()
    for seed in range(100):
        try:
            perm = non_cycle_permutation(4, nearly, np.random.default_rng(seed), max_tries=1)
            assert not is_hamiltonian_cycle(perm, nearly, 4)
            outcomes.add("ok")
        except DataError as err:
            assert "1 random permutations were all Hamiltonian cycles" in str(err)
            outcomes.add("error")
    assert outcomes == {"ok", "error"}


def test_cycle_checker_by_hand():
    square = [(0, 1), (1, 2), (2, 3), (0, 3)]
    assert is_hamiltonian_cycle([0, 1, 2, 3], square, 4)
    assert is_hamiltonian_cycle([2, 1, 0, 3], square, 4)  # reversed and rotated
    assert not is_hamiltonian_cycle([0, 2, 1, 3], square, 4)  # (0, 2) is not an edge
    assert not is_hamiltonian_cycle([0, 1, 2], square, 4)  # not every vertex
    assert not is_hamiltonian_cycle([0, 1, 1, 3], square, 4)  # repeated vertex
    assert not is_hamiltonian_cycle([0, 1, 2, 3], square[:3], 4)  # the closing edge (3, 0) is missing
    assert is_hamiltonian_cycle([0, 1, 2], [(0, 1), (1, 2), (0, 2)], 3)


def test_text_format_is_the_official_one():
    g = HamiltonianGraph(4, ((2, 3), (0, 1), (1, 2), (0, 3)), (0, 1, 2, 3), (0, 2, 1, 3))
    assert graph_prompt(g) == (
        "Vertices: <sep>0<sep>1<sep>2<sep>3\n"
        "Edges: <sep>2<edge_sep>3<sep>0<edge_sep>1<sep>1<edge_sep>2<sep>0<edge_sep>3"
    )
    assert cycle_response(g.cycle) == "0<sep>1<sep>2<sep>3"


def test_generation_validity_checker_by_hand():
    g = HamiltonianGraph(4, ((0, 1), (1, 2), (2, 3), (0, 3)), (0, 1, 2, 3), (0, 2, 1, 3))
    assert is_correct_generation("1<sep>2<sep>3<sep>0", g)
    assert not is_correct_generation("0<sep>2<sep>1<sep>3", g)  # not a cycle of g
    assert not is_correct_generation("0<sep>1<sep>2", g)  # too few
    assert not is_correct_generation("0<sep>1<sep>2<sep>3<sep>", g)  # trailing separator: an empty number
    assert not is_correct_generation(" 0<sep>1<sep>2<sep>3", g)  # whitespace (the official isdigit check)
    assert not is_correct_generation("0<sep>1<sep>1<sep>3", g)  # repeated
    assert not is_correct_generation("0<edge_sep>1<sep>2<sep>3", g)
    assert parse_cycle("3<sep>2<sep>1<sep>0", 4) == (3, 2, 1, 0)
    assert parse_cycle("3<sep>2<sep>x<sep>0", 4) is None


def test_early_exit_is_exact():
    """could_become_correct is False only for texts no continuation of which is a correct answer."""
    n = 4
    valid = "1<sep>2<sep>3<sep>0"
    for k in range(len(valid) + 1):
        assert could_become_correct(valid[:k], n), valid[:k]
    for dead in (
        "a",
        "1<sep>1<sep>",
        "1<sep><sep>",
        "1<sep>2<sep>3<sep>0<sep>",
        "7<sep>",
        " 1",
        "1<edge_sep>",
        "<sep>",
    ):
        assert not could_become_correct(dead, n), dead
        for tail in ("", "0", "<sep>0", "2<sep>3"):
            assert parse_cycle(dead + tail, n) is None


def test_graphs_are_reproducible_and_train_eval_subset(monkeypatch):
    values = dict(load_plan("hamiltonian", "cpu").values)
    a, b = hamiltonian_data(values), hamiltonian_data(values)
    assert a.train == b.train and a.test == b.test and a.train_eval == b.train_eval
    assert len(a.train) == values["n_train"] and len(a.test) == values["n_test"]
    assert len(a.train_eval) == values["n_train_eval"] and list(a.train_eval) == sorted(set(a.train_eval))
    rng = np.random.default_rng(values["data_seed"])
    first = generate_graphs(values["n_train"], 10, 0.2, rng)
    assert first == a.train
    rows = a.rows(a.train[:1])[0]
    assert rows["prompt"].startswith("Vertices: <sep>0<sep>1") and SEP_TOKEN in rows["chosen"]


@pytest.mark.parametrize(
    ("override", "error", "message"),
    [
        ("n_test=0", DataError, "evaluation set of test graphs has no rows"),
        ("n_train=0", DataError, "training set has no rows"),
        ("n_vertices=2", ConfigError, "n_vertices must be >= 3"),
        ("edge_p=1.5", ConfigError, "edge_p must be in"),
    ],
)
def test_bad_options_fail_before_training(tmp_path, monkeypatch, capsys, override, error, message):
    from experiments import cli

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr("dynamics.training.train", no_training)
    monkeypatch.setattr("dynamics.loading.load", no_training)
    code = cli.main(["experiment", "hamiltonian", "--set", override, "--out", str(tmp_path / "out")])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unknown_key_names_the_valid_keys():
    with pytest.raises(ConfigError, match="unknown key 'edge_prob'; valid keys: .*edge_p"):
        load_plan("hamiltonian", "cpu", ["edge_prob=0.3"])


# ----------------------------------------------------------------------------------------------------------
# The sampler and the generation test
# ----------------------------------------------------------------------------------------------------------


def _tiny(vocab: int = 64):
    from dynamics.models import LM, DecoderConfig

    config = DecoderConfig(
        family="llama", vocab_size=vocab, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32,
        tie_embeddings=True, max_position=512,
    )  # fmt: skip
    lm = LM(config)
    return lm, lm.init(jax.random.PRNGKey(0))


def test_sampler_limits_stops_and_seed():
    from dynamics.sampling import sample

    lm, params = _tiny()
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    a = sample(lm, params, prompts, max_new_tokens=12, stop_ids=[], pad_id=0, seed=3, batch_size=2, bucket=16)
    b = sample(lm, params, prompts, max_new_tokens=12, stop_ids=[], pad_id=0, seed=3, batch_size=2, bucket=16)
    assert a == b and all(len(t) == 12 for t in a.tokens) and set(a.stop_reason) == {"max_new_tokens"}
    stop = a.tokens[0][4]
    c = sample(lm, params, prompts, max_new_tokens=12, stop_ids=[stop], pad_id=0, seed=3, batch_size=2, bucket=16)
    assert c.tokens[0] == a.tokens[0][: a.tokens[0].index(stop)] and c.stop_reason[0] == "stop_token"
    assert all(stop not in t for t in c.tokens)
    d = sample(lm, params, prompts, max_new_tokens=12, stop_ids=[], pad_id=0, seed=3, batch_size=2, bucket=16,
               keep_going=lambda ids: len(ids) < 3)  # fmt: skip
    assert [len(t) for t in d.tokens] == [3, 3, 3] and set(d.stop_reason) == {"keep_going"}
    assert d.tokens == tuple(t[:3] for t in a.tokens)  # the early exit does not change the draws before it
    with pytest.raises(ConfigError, match="temperature"):
        sample(lm, params, prompts, max_new_tokens=2, stop_ids=[], pad_id=0, temperature=0.0)


def test_sampler_matches_the_distribution_of_the_model():
    """Many one-token draws follow softmax(W h_last): a chi-square goodness-of-fit test and a total-variation bound,
    on a model whose next-token distribution is far from uniform (a sampler that ignored the logits, or read
    them at the wrong position, would fail both)."""
    from scipy.stats import chi2

    from dynamics.sampling import sample

    lm, params = _tiny(8)
    # scale the (tied) embedding so that the logits W h span a few nats: far from uniform, yet every token keeps
    # p > 0.02 (n p > 40 draws per cell: the chi-square approximation holds)
    params = {**params, "embed": {"embedding": params["embed"]["embedding"] * 6.0}}
    prompt = [1, 2, 3]
    logits = np.asarray(lm.logits(params, np.array([prompt]), np.ones((1, 3), np.int32)), np.float64)[0, -1]
    p = np.exp(logits - logits.max())
    p /= p.sum()
    uniform = np.full(8, 1 / 8)
    assert 0.5 * np.abs(p - uniform).sum() > 0.25 and p.min() > 0.02  # far from uniform (TV distance)
    n = 2000
    draws = sample(lm, params, [prompt] * n, max_new_tokens=1, stop_ids=[], pad_id=0, batch_size=500)
    counts = np.bincount([t[0] for t in draws.tokens], minlength=8)
    stat = float(np.sum((counts - n * p) ** 2 / (n * p)))
    assert stat < chi2.ppf(1 - 1e-4, df=7), (counts, n * p)  # a false alarm once in 10⁴ seeds
    # TV(freq, p) concentrates at ≈ Σ √(p(1−p)/n) / 2 ≈ 0.03; a uniform sampler would sit at TV(uniform, p) > 0.25
    assert 0.5 * np.abs(counts / n - p).sum() < 0.08


@pytest.fixture(scope="module")
def real_tokenizer():
    from dynamics.models import default_model_path
    from dynamics.tokenizer import load_tokenizer

    return load_tokenizer(default_model_path())


def test_generation_test_decodes_and_checks(real_tokenizer, monkeypatch):
    """generation_test keeps <sep> in the text, drops other special tokens, and counts correct cycles."""
    from dynamics.loading import Loaded
    from dynamics.sampling import SampleResult
    from experiments.studies.hamiltonian.data import add_graph_tokens
    from experiments.studies.hamiltonian.generation import generation_test

    lm, params = _tiny(real_tokenizer.vocab_size)
    tok, lm2, params2, ids = add_graph_tokens(Loaded(lm, params, real_tokenizer, "tiny", "tiny"))
    assert lm2.config.vocab_size == real_tokenizer.vocab_size + 2 and ids == (49152, 49153)
    assert tok.encode("1<sep>2", add_special_tokens=False) == [tok.encode("1")[0], ids[0], tok.encode("2")[0]]
    emb = np.asarray(params2["embed"]["embedding"])
    np.testing.assert_allclose(emb[ids[0]], emb[: real_tokenizer.vocab_size].mean(0), rtol=1e-5, atol=1e-7)
    assert real_tokenizer.vocab_size == 49152  # the loaded tokenizer is not changed

    g = HamiltonianGraph(4, ((0, 1), (1, 2), (2, 3), (0, 3)), (0, 1, 2, 3), (0, 2, 1, 3))
    good = tok.encode("1<sep>2<sep>3<sep>0", add_special_tokens=False)
    im_start = tok.token_to_id("<|im_start|>")
    with_special = good[:2] + [im_start] + good[2:]  # a skipped special token does not break the text
    bad = tok.encode("0<sep>2<sep>1<sep>3", add_special_tokens=False)
    calls = {}

    def fake_sample(lm, params, prompts, **kwargs):
        calls["prompts"] = prompts
        calls["stop_ids"] = kwargs["stop_ids"]
        assert kwargs["keep_going"](good[:3]) and not kwargs["keep_going"](tok.encode("hello"))
        return SampleResult((tuple(good), tuple(with_special), tuple(bad)), ("stop_token",) * 3, 7, 300, 1.0, 0)

    monkeypatch.setattr("dynamics.sampling.sample", fake_sample)
    result = generation_test(lm2, params2, tok, [g, g, g])
    assert result.n == 3 and result.correct == 2 and result.accuracy == pytest.approx(2 / 3)
    assert result.examples[0]["text"] == "1<sep>2<sep>3<sep>0" and not result.examples[2]["correct"]
    assert calls["stop_ids"] == [tok.token_to_id("<|im_end|>")]
    prompt_text = tok.decode(calls["prompts"][0])
    assert prompt_text.endswith("<|im_start|>assistant\n") and EDGE_SEP_TOKEN in prompt_text
    assert json.loads(json.dumps(result.to_dict()))["correct"] == 2


@pytest.mark.slow
def test_hamiltonian_end_to_end_with_the_real_tokenizer(tmp_path, real_tokenizer):
    """Two steps of IM-RM and EX-RM on a tiny random LM; the IM-RM's generation test runs."""
    from dynamics.loading import Loaded
    from experiments.studies.protocol import study_runner

    hamiltonian = study_runner("hamiltonian")

    lm, params = _tiny(real_tokenizer.vocab_size)
    loaded = Loaded(lm, params, real_tokenizer, "tiny", "tiny")
    plan = load_plan("hamiltonian", "cpu", ["n_train=8", "n_test=4", "n_train_eval=4", "batch_size=4",
                                            "micro_batch_size=2", "max_steps=2", "params=last:1", "gen_n_train=2",
                                            "gen_n_test=2", "gen_max_new_tokens=8"])  # fmt: skip
    finals = {}
    for spec in plan.runs():
        result = hamiltonian.run(spec.values, tmp_path / spec.name, progress=False, loaded=loaded)
        finals[spec.name] = result.final_eval
        assert 0 <= result.final_eval["test/rewards/accuracies"] <= 1
    assert "generation/test/accuracy" in finals["reward=im"] and "generation/test/accuracy" not in finals["reward=ex"]
    saved = json.loads((tmp_path / "reward=im" / "summary.json").read_text())
    assert saved["final_eval"]["generation/train/n"] == 2.0
    assert (tmp_path / "reward=im" / "generation.json").exists()
    table = hamiltonian.table(plan, finals)
    assert table["columns"][:2] == ["IM-RM", "EX-RM"] and "Correct generations" in hamiltonian.format_table(table)

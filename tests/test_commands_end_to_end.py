"""Every command a user runs, end to end on a tiny model, with its numbers checked against an independent value.

The model is a random d = 16, 2-block Llama with the default tokenizer, written as a Hugging Face directory
(`_tiny_hf`), so that every command reads it through its ordinary `--model` flag. The checks recompute the outputs
by other means: brute force (theorem1), scipy's max-margin direction (theorem2), numpy over hidden states computed
here (footnote3, delta), an Adam step written out by hand (check-step), the timings in each benchmark's JSON.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from _tiny_hf import hidden_states, last_hidden, tiny_hf_dir
from conftest import require

from experiments import cli


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return tiny_hf_dir(tmp_path_factory.getbasetemp() / "tiny-hf")


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    from dynamics.loading import load

    return load(str(tiny_dir))


def _main(argv, capsys) -> str:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def max_margin(z: np.ndarray) -> np.ndarray:
    """argmin ½‖u‖² s.t. ⟨u, z_i⟩ ≥ 1, by scipy's SLSQP (not the QP solver rmdyn uses)."""
    from scipy.optimize import minimize

    u0 = np.linalg.lstsq(z, np.ones(len(z)), rcond=None)[0]
    res = minimize(
        lambda u: 0.5 * u @ u,
        u0 * max(1.0, 1.0 / max((z @ u0).min(), 1e-3)),
        jac=lambda u: u,
        constraints=[{"type": "ineq", "fun": lambda u: z @ u - 1.0, "jac": lambda u: z}],
        method="SLSQP",
        options={"ftol": 1e-14, "maxiter": 1000},
    )
    assert res.success, res.message
    return res.x


# ----------------------------------------------------------------------------------------------------------
# Theorems
# ----------------------------------------------------------------------------------------------------------


def test_theorem1_against_brute_force(tmp_path, capsys):
    beta, deltas = 0.01, [0.05, 0.01]
    out = _main(["theorem1", "--prompts", 2, "--responses", 5, "--vertices", 4, "--deltas", "0.05,0.01",
                 "--out", tmp_path], capsys)  # fmt: skip
    assert "Hamiltonian cycles" in out
    data = json.loads((tmp_path / "theorem1.json").read_text())
    assert data["beta"] == beta and data["deltas"] == deltas
    for delta, res in zip(deltas, data["random"], strict=True):
        ref = np.exp(np.asarray(res["log_ref"]))
        correct = np.asarray(res["correct"])
        np.testing.assert_allclose(ref.sum(1), 1.0, rtol=1e-12)
        assert correct.any(1).all() and not correct.all(1).any()  # a non-trivial correct set per prompt
        pi = ref * np.exp(delta / beta * correct)
        pi /= pi.sum(1, keepdims=True)
        rewards = beta * np.log(pi / ref)
        np.testing.assert_allclose(np.exp(res["log_pi"]), pi, rtol=1e-10)
        np.testing.assert_allclose(res["rewards"], rewards, rtol=1e-9, atol=1e-15)
        ref_c, pi_c = (ref * correct).sum(1), (pi * correct).sum(1)
        np.testing.assert_allclose(res["ref_mass"], ref_c, rtol=1e-12)
        np.testing.assert_allclose(res["mass"], pi_c, rtol=1e-10)
        np.testing.assert_allclose(res["bound"], np.exp(delta / beta) * ref_c, rtol=1e-10)
        assert np.all(pi_c <= np.exp(delta / beta) * ref_c)  # Theorem 1's bound
        # a verifier with margin δ: every correct response beats every incorrect one by exactly δ
        margins = [rewards[i][correct[i]].min() - rewards[i][~correct[i]].max() for i in range(len(ref))]
        np.testing.assert_allclose(res["margin"], margins, rtol=1e-9)
        np.testing.assert_allclose(margins, delta, rtol=1e-9)
        assert res["is_verifier"] == [True, True]
        odds = (pi_c / (1 - pi_c)) / (ref_c / (1 - ref_c))
        np.testing.assert_allclose(np.exp(res["log_odds_ratio"]), odds, rtol=1e-9)
    # Hamiltonian case, N = 4: every ordering of the vertices of a planted 4-cycle graph, enumerated
    n = 4
    edges = {frozenset((i, (i + 1) % n)) for i in range(n)}
    orderings = list(itertools.permutations(range(n)))
    is_cycle = np.array([all(frozenset((p[i], p[(i + 1) % n])) in edges for i in range(n)) for p in orderings])
    assert is_cycle.sum() == 2 * n  # n rotations × 2 directions
    for delta, row in zip(deltas, data["hamiltonian"], strict=True):
        weights = np.where(is_cycle, np.exp(delta / beta), 1.0) / len(orderings)
        mass = weights[is_cycle].sum() / weights.sum()
        assert row["ref_mass"][0] == pytest.approx(is_cycle.mean(), rel=1e-12)
        assert row["mass"][0] == pytest.approx(mass, rel=1e-10)
        assert row["bound"][0] == pytest.approx(np.exp(delta / beta) * is_cycle.mean(), rel=1e-10)
        assert row["vector_margin"][0] == pytest.approx(delta, rel=1e-9)


@pytest.fixture(scope="module")
def theorem2_synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("theorem2")
    assert cli.main(["theorem2", "--seeds", "2", "--steps", "200", "--grid", "5", "--out", str(out)]) == 0
    return json.loads((out / "theorem2.json").read_text()), out


def test_theorem2_synthetic_against_scipy_max_margin(theorem2_synthetic):
    from theory.theorem2 import synthetic_problems

    data, out = theorem2_synthetic
    assert (out / "theorem2.png").read_bytes()[:4] == b"\x89PNG"
    problem = synthetic_problems(0, 2)  # the command's problem: base seed 0, 2 seeds
    h = np.asarray(problem.h_pair, np.float64)
    train, ev = np.asarray(problem.train), np.asarray(problem.eval_triples)
    for s in range(2):
        z = h[s, train[s, :, 0], train[s, :, 1]] - h[s, train[s, :, 0], train[s, :, 2]]
        u = max_margin(z)
        seen = np.zeros(h.shape[2], bool)
        seen[train[s, :, 1:].ravel()] = True
        unseen = ~seen[ev[s, :, 1]] & ~seen[ev[s, :, 2]]
        assert data["n_eval_unseen"][s] == unseen.sum() > 0
        score = (h[s, ev[s, :, 0], ev[s, :, 1]] - h[s, ev[s, :, 0], ev[s, :, 2]]) @ u
        acc = np.mean(np.where(score > 0, 1.0, np.where(score == 0, 0.5, 0.0))[unseen])
        assert data["u_star_acc_unseen"][s] == pytest.approx(acc, abs=1.01 / unseen.sum())
    # the theorem: EX-RM in the direction of u*, IM-RM exactly at chance on unseen tokens at every recorded step
    cos = np.asarray(data["cos_u_star"])
    assert cos[:, 0].tolist() == [0.0, 0.0] and np.all(cos[:, -1] > 0.999)
    assert np.all(np.asarray(data["acc_unseen_im"]) == 0.5)
    assert np.all(np.asarray(data["max_unseen_row_change"]) == 0.0)
    assert data["summary"]["cos_u_star_min"] == pytest.approx(cos[:, -1].min())


def test_theorem2_on_model_representations(tiny_dir, tmp_path, capsys):
    out = _main(["theorem2", "--source", "model", "--model", tiny_dir, "--seeds", "2", "--steps", "200", "--grid",
                 "5", "--out", tmp_path], capsys)  # fmt: skip
    assert "source model" in out
    data = json.loads((tmp_path / "theorem2.json").read_text())
    assert data["source"] != "synthetic"
    # 120 Persona prompts × (2 seen affirmatives × 2 seen negatives): the seen evaluation pairs
    assert data["n_eval_seen"] == [120 * 4, 120 * 4]
    assert np.all(np.asarray(data["acc_unseen_im"]) == 0.5)
    assert np.all(np.asarray(data["max_unseen_reward_diff_im"]) == 0.0)
    assert np.all(np.asarray(data["cos_u_star"])[:, -1] > 0.999)
    assert np.all(np.asarray(data["train_acc_ex"])[:, -1] == 1.0)


def test_bench_theorem2_ratio_is_its_timings(theorem2_synthetic, tmp_path, capsys):
    out = _main(["bench", "theorem2", "--seeds", 2, "--steps", 200, "--grid", 5, "--repeats", 1,
                 "--out", tmp_path], capsys)  # fmt: skip
    r = json.loads((tmp_path / "bench_theorem2.json").read_text())
    assert r["ratio"] == pytest.approx(r["loop"] / r["vmap"], rel=1e-12)
    printed = float(re.search(r"ratio loop / vmap:\s+([\d.]+)x", out).group(1))
    assert printed == pytest.approx(r["ratio"], abs=0.006)
    assert r["max_abs_diff"] < 1e-9  # the vmapped and the looped simulator agree
    # and the bench simulates what `rmdyn theorem2` does on the same settings
    data, _ = theorem2_synthetic
    assert (r["n_seeds"], r["n_steps"]) == (data["n_seeds"], data["config"]["n_steps"])


# ----------------------------------------------------------------------------------------------------------
# Models, Footnote 3, benchmarks on a model
# ----------------------------------------------------------------------------------------------------------


def test_models_and_models_check(tiny_dir, capsys):
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    out = _main(["models"], capsys)
    for family in ("llama", "qwen2", "gpt_neox", "gemma2"):
        assert re.search(rf"^\s+{family}\s", out, re.M), family
    assert "Default model: SmolLM2-135M-Instruct" in out and "Loaded" not in out
    out = _main(["models", "--check", tiny_dir], capsys)
    n_params = sum(a.size for a in load_file(str(tiny_dir / "model.safetensors")).values())  # tied: no lm_head
    vocab = Tokenizer.from_file(str(tiny_dir / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    fields = dict(re.findall(r"^  (\w+)\s+(.+)$", out.split("Loaded", 1)[1], re.M))
    assert int(fields["n_params"].replace(",", "")) == n_params == 790_352
    assert int(fields["vocab_size"].replace(",", "")) == vocab
    assert (fields["n_layers"], fields["d_model"], fields["family"]) == ("2", "16", "llama")
    assert fields["tokenizer"].startswith(f"{vocab:,} ids, chat template: own")


def test_footnote3_against_numpy(tiny_dir, loaded, tmp_path, capsys):
    from experiments.plans.grammar import load_plan
    from experiments.studies.persona.data import persona_texts

    sets = ["n_train=6", "n_test=3"]
    _main(["footnote3", "--model", tiny_dir, *[a for s in sets for a in ("--set", s)], "--out", tmp_path], capsys)
    data = json.loads((tmp_path / "footnote3.json").read_text())
    texts = persona_texts(dict(load_plan("persona", None, sets).values))
    train, test = texts.train, texts.test
    assert data["shapes"] == {"seen": [6, 16], "unseen_train": [24, 16], "unseen_test": [12, 16]}
    # every sequence in one forward pass: the seen pairs, then per split and combination the yes and no answers
    prompts = [r["prompt"] for r in train] * 2
    responses = [r["chosen"] for r in train] + [r["rejected"] for r in train]
    blocks = []
    for split, rows in (("train", train), ("test", test)):
        p = [r["prompt"] for r in rows]
        yes, no = texts.eval_prefixes[split]["yes"], texts.eval_prefixes[split]["no"]
        for a, b in itertools.product(texts.eval_words_yes, texts.eval_words_no):
            blocks.append((split, len(prompts), len(p)))
            prompts += p * 2
            responses += [x + a for x in yes] + [x + b for x in no]
    h = last_hidden(loaded, prompts, responses)
    seen = h[:6] - h[6:12]
    unseen = {
        split: np.concatenate([h[s : s + n] - h[s + n : s + 2 * n] for sp, s, n in blocks if sp == split])
        for split in ("train", "test")
    }

    def cosines(a, b):
        return (a @ b.T) / np.outer(np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1))

    u = max_margin(seen)
    stats = data["statistics"]
    for split in ("train", "test"):
        for what, values in (("inner", seen @ unseen[split].T), ("cosine", cosines(seen, unseen[split]))):
            got = stats[f"seen·unseen_{split} {what}"]
            assert got["count"] == values.size
            for name, fn in (("mean", np.mean), ("min", np.min), ("max", np.max), ("median", np.median)):
                assert got[name] == pytest.approx(fn(values), rel=1e-4, abs=1e-5), (split, what, name)
            assert got["fraction_positive"] == pytest.approx(np.mean(values > 0), abs=1.01 / values.size)
        cos_u = cosines(u[None], unseen[split])[0]
        assert stats[f"u*·unseen_{split} cosine"]["mean"] == pytest.approx(cos_u.mean(), rel=1e-3, abs=1e-4)
    mm = data["max_margin"]
    assert mm["separable"] and mm["norm"] == pytest.approx(np.linalg.norm(u), rel=1e-4)
    assert stats["u*·seen cosine"]["fraction_positive"] == 1.0


def test_bench_rho_on_tiny_model(tiny_dir, tmp_path, capsys):
    out = _main(["bench", "rho", "--model", tiny_dir, "--lengths", "8,16", "--chunk", "4096", "--repeats", 1,
                 "--out", tmp_path], capsys)  # fmt: skip
    res = json.loads((tmp_path / "bench_rho.json").read_text())
    assert (res["vocab"], res["d_model"], res["chunk"]) == (49152, 16, 4096)
    lines = [line.split() for line in out.splitlines() if re.match(r"^\s+(8|16) ", line)]
    assert [int(cells[0]) for cells in lines] == [8, 16]
    for row, cells in zip(res["rows"], lines, strict=True):
        n = row["length"]
        assert row["time_ratio_naive_over_chunked"] == pytest.approx(row["naive_s"] / row["chunked_s"], rel=1e-12)
        assert float(cells[3]) == pytest.approx(row["naive_s"] / row["chunked_s"], abs=0.006)
        assert row["memory_ratio_naive_over_chunked"] == pytest.approx(
            row["naive_temp_bytes"] / row["chunked_temp_bytes"], rel=1e-12
        )
        assert row["klv_tensor_bytes"] == n * n * 49152 * 4 and row["kv_bytes"] == 2 * n * 49152 * 4
        assert row["max_abs_diff"] < 1e-5  # the chunked ρ is the full-vocabulary ρ


def test_bench_attribute_ratio_is_its_timings(tiny_dir, tmp_path, capsys):
    out = _main(["bench", "attribute", "--model", tiny_dir, "--pairs", 3, "--eval", 2, "--project", 0, "--block", 2,
                 "--repeats", 1, "--params", "last:1", "--out", tmp_path], capsys)  # fmt: skip
    res = json.loads((tmp_path / "bench_attribute.json").read_text())
    assert res["backward_passes"] == 2 * 3 + 2 * 2
    assert res["ratio_to_floor"] == pytest.approx(res["total_s"] / (10 * res["single_gradient_s"]), rel=1e-12)
    printed = float(re.search(r"\(a\)\) = ([\d.]+)", out).group(1))
    assert printed == pytest.approx(res["ratio_to_floor"], abs=0.006)


def test_bench_train_on_tiny_model(tiny_dir, tmp_path, capsys):
    require("torch")
    require("transformers")
    out = _main(["bench", "train", "--model", tiny_dir, "--pairs", 2, "--tokens", 32, "--response-tokens", 16,
                 "--micro-batch", 2, "--repeats", 1, "--params", "unembed", "--packed-only", "--out", tmp_path],
                capsys)  # fmt: skip
    res = json.loads((tmp_path / "bench_train.json").read_text())
    assert res["tokens_per_step"] == 2 * 2 * 32
    for side in ("rmdyn", "torch"):
        assert res[side]["tokens_per_s"] == pytest.approx(128 / res[side]["step_s"], rel=1e-12)
    assert res["ratio"] == pytest.approx(res["torch"]["step_s"] / res["rmdyn"]["step_s"], rel=1e-12)
    printed = float(re.search(r"transformers \+ torch.optim.Adam: ([\d.]+)×", out).group(1))
    assert printed == pytest.approx(res["ratio"], abs=0.006)
    assert math.isfinite(res["rmdyn"]["grad_norm"]) and res["rmdyn"]["grad_norm"] > 0


# ----------------------------------------------------------------------------------------------------------
# One-step commands: check-step with Adam, delta with the closed form
# ----------------------------------------------------------------------------------------------------------

TRIPLE = ("Do you like people?", "A truthful reply is yes", "I say no")
PAIRS = (("Is the sky blue?", "My response would be certainly"), ("Is it?", "I lean toward nope"))


def _flags():
    flags = ["--prompt", TRIPLE[0], "--chosen", TRIPLE[1], "--rejected", TRIPLE[2]]
    for p, r in PAIRS:
        flags += ["--pair", p, r]
    return flags


def test_check_step_adam_is_one_hand_written_adam_step(tiny_dir, loaded, tmp_path, capsys):
    """EX-RM, head only: one Adam step from zero moments moves u by −η·g/(|g| + ε); Δr = ⟨Δu, h⟩ exactly."""
    import jax

    lrs = [1e-3, 1e-2]
    _main(["check-step", "--model", tiny_dir, *_flags(), "--optimizer", "adam", "--reward", "ex", "--params",
           "head", "--lrs", "1e-3,1e-2", "--out", tmp_path], capsys)  # fmt: skip
    data = json.loads((tmp_path / "check_step.json").read_text())
    res = data["results"]["EX-RM"]
    assert res["lrs"] == lrs and res["meta"]["optimizer"] == "adam"
    u = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (16,), dtype=np.float32) * 0.02, np.float64)  # seed 0
    h = last_hidden(loaded, [TRIPLE[0]] * 2 + [p for p, _ in PAIRS], [TRIPLE[1], TRIPLE[2]] + [r for _, r in PAIRS])
    dz = h[0] - h[1]
    g = -dz / (1.0 + np.exp(u @ dz))  # ∇_u of −ln σ(⟨u, h+ − h−⟩)
    for k, lr in enumerate(lrs):
        step = -lr * g / (np.abs(g) + 1e-8)  # Adam's first step: m̂ = g, v̂ = g²
        expected = h[2:] @ step
        np.testing.assert_allclose(res["actual"][k], expected, rtol=2e-3, atol=1e-7)
        np.testing.assert_allclose(res["predicted"][k], expected, rtol=2e-3, atol=1e-7)
    assert all(s["pearson"] > 0.999 for s in res["stats"])


def test_delta_closed_form_against_numpy(tiny_dir, loaded, tmp_path, capsys):
    """Assumption 1 (--params output): EX-RM trains u, IM-RM the untied unembedding W; Δr recomputed in numpy."""
    import jax

    from dynamics.text import encode_pairs

    lr, beta = 1e-3, 0.01
    _main(["delta", "--model", tiny_dir, *_flags(), "--params", "output", "--method", "closed_form", "--lr", lr,
           "--out", tmp_path], capsys)  # fmt: skip
    res = json.loads((tmp_path / "delta.json").read_text())["results"]
    assert {k: v["meta"]["params"] for k, v in res.items()} == {"EX-RM": "head", "IM-RM": "unembed"}
    assert {v["meta"]["method"] for v in res.values()} == {"closed_form"}
    prompts = [TRIPLE[0]] * 2 + [p for p, _ in PAIRS]
    responses = [TRIPLE[1], TRIPLE[2]] + [r for _, r in PAIRS]
    hidden, ids = hidden_states(loaded, prompts, responses)
    # EX-RM, head u (seed 0): one SGD step gives Δr(x', y') = η·σ(−⟨u, h+ − h−⟩)·⟨h+ − h−, h_{x',y'}⟩
    u = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (16,), dtype=np.float32) * 0.02, np.float64)
    h = hidden[np.arange(4), [len(r) - 1 for r in ids]]
    dz = h[0] - h[1]
    np.testing.assert_allclose(res["EX-RM"]["delta"], lr / (1.0 + np.exp(u @ dz)) * (h[2:] @ dz), rtol=1e-4)
    np.testing.assert_allclose(res["EX-RM"]["reward_before"], h[2:] @ u, rtol=1e-4, atol=1e-7)
    # IM-RM, W only: ∇_W ln π(y|x) = Σ_t (e_{y_t} − softmax(W h_{t−1})) h_{t−1}ᵀ over the response tokens; at
    # π = π_ref the rewards are 0 and the BT weight ½, so Δr(x', y') = η·β²·½·⟨∇_W ln π(y'|x'), ∇_W ln π(y+|x) −
    # ∇_W ln π(y−|x)⟩
    W = np.asarray(loaded.params["embed"]["embedding"], np.float64)
    response = np.asarray(encode_pairs(loaded.tokenizer, prompts, responses, max_length=512).response_mask)

    def grad_log_pi(i):
        g = np.zeros_like(W)
        for t in np.flatnonzero(response[i]):
            x = hidden[i, t - 1]
            logits = W @ x
            p = np.exp(logits - logits.max())
            g -= np.outer(p / p.sum(), x)
            g[ids[i][t]] += x
        return g

    grads = [grad_log_pi(i) for i in range(4)]
    expected = [lr * beta**2 * 0.5 * np.sum(g * (grads[0] - grads[1])) for g in grads[2:]]
    np.testing.assert_allclose(res["IM-RM"]["delta"], expected, rtol=1e-4)
    assert res["IM-RM"]["reward_before"] == [0.0, 0.0]


def test_footnote3_on_the_controlled_cells_against_numpy(tiny_dir, loaded, tmp_path, capsys):
    """`rmdyn footnote3 --set design=controlled`: u*'s cosines with one controlled cell's same-opening differences,
    recomputed from last-token states (transformers) and scipy's max-margin direction."""
    from experiments.plans.grammar import load_plan
    from experiments.studies.persona.data import persona_texts

    sets = ["n_train=6", "n_test=3", "design=controlled", "controlled_train_prompts=2"]
    _main(["footnote3", "--model", tiny_dir, *[a for s in sets for a in ("--set", s)], "--out", tmp_path], capsys)
    data = json.loads((tmp_path / "footnote3.json").read_text())
    texts = persona_texts(dict(load_plan("persona", None, sets).values))
    assert data["shapes"]["same/test/new/new2"] == [3 * 4 * 3, 16]  # 3 new openings × 2×2 word pairs × 3 prompts
    prompts = [r["prompt"] for r in texts.train] * 2
    responses = [r["chosen"] for r in texts.train] + [r["rejected"] for r in texts.train]
    h = last_hidden(loaded, prompts, responses)
    u = max_margin(h[:6] - h[6:12])
    test = [r["prompt"] for r in texts.test]
    diffs = []
    for o in ("My response would be ", "I lean toward ", "Here is my answer: "):
        for a, b in itertools.product(("indeed", "definitely"), ("hardly", "unlikely")):
            hh = last_hidden(loaded, test * 2, [o + a] * 3 + [o + b] * 3)
            diffs.append(hh[:3] - hh[3:])
    d = np.concatenate(diffs)
    cos = (d @ u) / (np.linalg.norm(d, axis=1) * np.linalg.norm(u))
    got = data["statistics"]["u*·same/test/new/new2 cosine"]
    assert got["count"] == cos.size and got["mean"] == pytest.approx(cos.mean(), rel=1e-3, abs=1e-4)
    assert got["fraction_positive"] == pytest.approx(np.mean(cos > 0), abs=1.01 / cos.size)

"""`rmdyn attribute` end to end on a tiny Hugging Face model, its C recomputed in numpy from hidden states.

Under Assumption 1 (--params output) C has closed forms that need no autodiff (docs/math.md §10.1, §3.1, §3.2):
EX-RM (head u): C_ij = η σ(−⟨u, Δh_j⟩) ⟨Δh̄_i, Δh_j⟩; IM-RM (untied W, π = π_ref so w = ½):
C_ij = η β² ½ ⟨∇_W ln π(ē+) − ∇_W ln π(ē−), ∇_W ln π(y+) − ∇_W ln π(y−)⟩, with ∇_W ln π written out as
Σ_t (e_{y_t} − softmax(W h_{t−1})) h_{t−1}ᵀ.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from _tiny_hf import hidden_states, tiny_hf_dir

from experiments import cli

TRAIN = [
    ("Do you like people?", "A truthful reply is yes", "I say no"),
    ("Is the sky blue?", "Yes, it is blue", "No, it is green"),
    ("Do cats bark?", "No, they meow", "Yes, loudly"),
]
EVAL = [("Do you like dogs?", "A truthful reply is yes", "I say no"), ("Is grass green?", "Yes, it is", "No")]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return tiny_hf_dir(tmp_path_factory.getbasetemp() / "tiny-hf")


def _write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in rows))
    return path


def test_attribute_output_params_against_numpy(tiny_dir, tmp_path, capsys):
    import jax

    from dynamics.loading import load
    from dynamics.text import encode_pairs

    lr, beta = 1e-3, 0.01
    out = tmp_path / "out"
    argv = ["attribute", "--model", tiny_dir, "--train", _write(tmp_path / "t.jsonl", TRAIN), "--eval",
            _write(tmp_path / "e.jsonl", EVAL), "--params", "output", "--lr", lr, "--top", 2, "--out", out]  # fmt: skip
    assert cli.main([str(a) for a in argv]) == 0, capsys.readouterr().err
    data = json.loads((out / "attribution.json").read_text())
    res = data["results"]
    loaded = load(str(tiny_dir))
    prompts = [p for p, _, _ in TRAIN] * 2 + [p for p, _, _ in EVAL] * 2
    responses = [c for _, c, _ in TRAIN] + [r for _, _, r in TRAIN] + [c for _, c, _ in EVAL] + [r for _, _, r in EVAL]
    hidden, ids = hidden_states(loaded, prompts, responses)
    N, M = len(TRAIN), len(EVAL)
    # EX-RM, head u (seed 0)
    u = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (16,), dtype=np.float32) * 0.02, np.float64)
    h = hidden[np.arange(len(ids)), [len(r) - 1 for r in ids]]
    dh_train = h[:N] - h[N : 2 * N]
    dh_eval = h[2 * N : 2 * N + M] - h[2 * N + M :]
    w = 1.0 / (1.0 + np.exp(dh_train @ u))
    np.testing.assert_allclose(
        res["EX-RM"]["contributions"]["contribution"], lr * w * (dh_eval @ dh_train.T), rtol=1e-4
    )
    # IM-RM, untied W
    W = np.asarray(loaded.params["embed"]["embedding"], np.float64)
    response = np.asarray(encode_pairs(loaded.tokenizer, prompts, responses, max_length=512).response_mask)

    def grad_log_pi(i):
        g = np.zeros_like(W)
        for t in np.flatnonzero(response[i]):
            logits = W @ hidden[i, t - 1]
            p = np.exp(logits - logits.max())
            g -= np.outer(p / p.sum(), hidden[i, t - 1])
            g[ids[i][t]] += hidden[i, t - 1]
        return g

    G = [grad_log_pi(i) for i in range(len(ids))]
    gm_train = [G[j] - G[N + j] for j in range(N)]
    gm_eval = [G[2 * N + i] - G[2 * N + M + i] for i in range(M)]
    expected = np.array([[lr * beta**2 * 0.5 * np.sum(a * b) for b in gm_train] for a in gm_eval])
    im = res["IM-RM"]
    # float32 gradients of two responses that share their closing tokens: their difference cancels, so the bound
    # is relative to the largest entry
    scale = np.abs(expected).max()
    np.testing.assert_allclose(im["contributions"]["contribution"], expected, rtol=1e-3, atol=1e-3 * scale)
    assert (
        im["contributions"]["meta"]["params"] == "unembed" and res["EX-RM"]["contributions"]["meta"]["params"] == "head"
    )
    # the token-pair views sum to their entries (Eq. (5) with W alone trained)
    assert im["token_views"]
    for key, view in im["token_views"].items():
        i, j = map(int, key.split(","))
        assert view["total"] == pytest.approx(expected[i, j], rel=1e-3, abs=1e-3 * scale)
    # rankings follow C; texts and statistics are recorded; the report embeds its figures; no absolute path
    for label in ("EX-RM", "IM-RM"):
        C = np.asarray(res[label]["contributions"]["contribution"])
        for i, r in enumerate(res[label]["rankings"]):
            assert r["up"] == [j for j in np.argsort(-C[i]) if C[i, j] > 0][:2]
    assert res["EX-RM"]["statistics"]["indicator_share"] is None
    assert 0 <= im["statistics"]["indicator_share"]
    assert data["eval"]["kind"] == "pairs" and data["train"]["rows"][1]["chosen"] == "Yes, it is blue"
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "Yes, it is blue" in page
    assert not re.search(r'"/(home|tmp|work|root|Users)/', (out / "attribution.json").read_text())


def test_attribute_along_a_run(tiny_dir, tmp_path, capsys):
    """--run: an EX-RM whose head alone trains (SGD) is linear in its parameters, so the along-run prediction is
    the actual change and the linearised trajectory never parts; a run of another reward type is refused."""
    from dynamics.loading import load
    from dynamics.training import TrainConfig, train
    from experiments.studies import one_step

    loaded = load(str(tiny_dir))
    train_file, eval_file = _write(tmp_path / "t.jsonl", TRAIN), _write(tmp_path / "e.jsonl", EVAL)
    data = one_step.encode_triples(
        loaded, [type("R", (), {"prompt": p, "chosen": c, "rejected": r})() for p, c, r in TRAIN]
    )
    config = TrainConfig(reward="ex", params="head", optimizer="sgd", lr=2.0, epochs=2, batch_size=2,
                         micro_batch_size=2, checkpoint_every_steps=1, keep_checkpoints=100,
                         eval_at_start=False)  # fmt: skip
    run_dir = tmp_path / "run"
    train(config, loaded.lm, loaded.params, data, None, run_dir=run_dir, progress=False)
    out = tmp_path / "out"
    argv = ["attribute", "--model", tiny_dir, "--train", train_file, "--eval", eval_file, "--reward", "ex",
            "--params", "head", "--run", run_dir, "--out", out]  # fmt: skip
    assert cli.main([str(a) for a in argv]) == 0, capsys.readouterr().err
    run = json.loads((out / "attribution.json").read_text())["run"]
    pred, actual = np.asarray(run["run"]["predicted_change"]), np.asarray(run["run"]["actual_change"])
    assert np.abs(actual).max() > 1e-3
    np.testing.assert_allclose(pred, actual, rtol=1e-3, atol=1e-3 * np.abs(actual).max())
    assert run["run"]["checkpoint_steps"] == [0, 1, 2, 3, 4]
    traj = run["trajectory"]
    assert traj["parting_step"] is None and traj["actual_steps"] == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(np.asarray(traj["predicted"]), np.asarray(traj["actual"]), rtol=1e-3,
                               atol=1e-3 * np.abs(actual).max())  # fmt: skip
    assert not re.search(r'"/(home|tmp|work|root|Users)/', (out / "attribution.json").read_text())
    assert (out / "attribution_trajectory.png").exists() and "Along the run" in (out / "report.html").read_text()
    argv[argv.index("ex")] = "im"
    argv[argv.index("head")] = "all"
    assert cli.main([str(a) for a in argv]) == 2
    assert f"--run {run_dir} was trained with reward ex, not im" in capsys.readouterr().err
    argv[argv.index("im")] = "ex"
    argv[argv.index(train_file)] = _write(tmp_path / "t2.jsonl", TRAIN[:2])
    assert cli.main([str(a) for a in argv]) == 2
    assert "the training pairs differ from the run's" in capsys.readouterr().err

"""Theorem 2 simulator (docs/math.md §5): checked against an independent numpy GD and the theorem's claims.

The numpy reference trains the IM-RM through the full log-softmax,
∇_W ln π(y|x) = (e_y − softmax(W h_x)) h_x^T, not through the simulator's structural reward difference,
and computes accuracies and u*'s accuracy itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import jax
import numpy as np
import pytest
from scipy.special import expit, log_softmax

from dynamics.errors import ConfigError, RmdynError
from theory.maxmargin import max_margin_direction
from theory.theorem2 import (
    SYNTHETIC_SEEN_BAD,
    SYNTHETIC_SEEN_GOOD,
    Theorem2Config,
    Theorem2Problem,
    recording_grid,
    select_seeds,
    simulate_theorem2,
    simulator_trace_count,
    synthetic_problem,
    synthetic_problems,
)

N_SEEDS = 6
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def problem() -> Theorem2Problem:
    return synthetic_problems(123, N_SEEDS)


@pytest.fixture(scope="module")
def default_result(problem: Theorem2Problem):  # noqa: ANN201
    """The default configuration (what `rmdyn theorem2` runs), on fewer seeds."""
    return simulate_theorem2(problem, Theorem2Config(), seed=123)


def _np(problem: Theorem2Problem, s: int) -> dict[str, np.ndarray]:
    p = select_seeds(problem, s)
    return {k: np.asarray(getattr(p, k), dtype=np.float64) for k in ("h_pair", "h_prompt", "unembedding")} | {
        "train": np.asarray(p.train),
        "eval": np.asarray(p.eval_triples),
    }


def _accuracy(d: np.ndarray) -> float:
    return float(np.mean(d > 0) + 0.5 * np.mean(d == 0))


def _logit_gap(w: np.ndarray, ev: np.ndarray, h: np.ndarray) -> np.ndarray:
    """⟨W_{y+} − W_{y−}, h_x⟩ per evaluation triple."""
    return np.einsum("kd,kd->k", w[ev[:, 1]] - w[ev[:, 2]], h)


def _ex_diff(h_pair: np.ndarray, ev: np.ndarray, u: np.ndarray) -> np.ndarray:
    """r_EX(x, y+) − r_EX(x, y−) per evaluation triple."""
    return h_pair[ev[:, 0], ev[:, 1]] @ u - h_pair[ev[:, 0], ev[:, 2]] @ u


def _numpy_gd(a: dict[str, np.ndarray], steps: list[int], lr: float, im_lr: float, beta: float, schedule: str):  # noqa: ANN202
    """Independent full-batch GD on both heads; returns per recording step (cos, log-losses, params)."""
    x, yp, ym = a["train"].T
    h_pair, hx, w0 = a["h_pair"], a["h_prompt"], a["unembedding"]
    z = h_pair[x, yp] - h_pair[x, ym]
    n = len(x)
    u, w = np.zeros(z.shape[1]), w0.copy()
    logp0 = log_softmax(hx[x] @ w0.T, axis=1)

    def im_margin(w: np.ndarray) -> np.ndarray:
        logp = log_softmax(hx[x] @ w.T, axis=1)
        r = beta * (logp - logp0)
        return r[np.arange(n), yp] - r[np.arange(n), ym]

    def loss(m: np.ndarray) -> float:
        return float(np.mean(np.logaddexp(0.0, -m)))

    out = []
    t = 0
    for target in steps:
        while t < target:
            m = z @ u
            g = expit(-m) / n / (loss(m) if schedule == "normalized" else 1.0)
            u = u + lr * z.T @ g
            mi = im_margin(w)
            gi = expit(-mi) / n / (loss(mi) if schedule == "normalized" else 1.0)
            p = np.exp(log_softmax(hx[x] @ w.T, axis=1))
            onehot = np.eye(w.shape[0])
            grad = beta * ((onehot[yp] - p) - (onehot[ym] - p))  # ∇ of r(y+) − r(y−) w.r.t. the logits
            w = w + im_lr * (grad * gi[:, None]).T @ hx[x]
            t += 1
        out.append((u.copy(), w.copy(), np.log(loss(z @ u)), np.log(loss(im_margin(w)))))
    return out


@pytest.mark.parametrize("schedule", ["plain", "normalized"])
@pytest.mark.parametrize("method", ["dual", "primal"])
def test_matches_independent_numpy_gd(problem: Theorem2Problem, schedule: str, method: str) -> None:
    cfg = Theorem2Config(n_steps=60, n_grid=6, schedule=schedule, method=method, lr=0.3)
    sub = select_seeds(problem, slice(0, 2))
    res = simulate_theorem2(sub, cfg)
    for s in range(2):
        a = _np(sub, s)
        ref = _numpy_gd(a, list(res.steps), cfg.lr, cfg.resolved_im_lr, cfg.beta, schedule)
        x, yp, ym = a["train"].T
        u_star = max_margin_direction(a["h_pair"][x, yp] - a["h_pair"][x, ym]).direction
        for k, (u, _w, ll_ex, ll_im) in enumerate(ref):
            cos = u @ u_star / (np.linalg.norm(u) * np.linalg.norm(u_star)) if np.any(u) else 0.0
            assert res.cos_u_star[s, k] == pytest.approx(cos, abs=1e-5)
            assert res.log_loss_ex[s, k] == pytest.approx(ll_ex, rel=1e-8, abs=1e-9)
            assert res.log_loss_im[s, k] == pytest.approx(ll_im, rel=1e-6, abs=1e-8)
        np.testing.assert_allclose(res.final_u[s], ref[-1][0], rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(res.final_unembedding[s], ref[-1][1], rtol=1e-7, atol=1e-9)


def test_dual_and_primal_agree(problem: Theorem2Problem) -> None:
    sub = select_seeds(problem, slice(0, 3))
    a = simulate_theorem2(sub, Theorem2Config(n_steps=500, n_grid=8, method="dual"))
    b = simulate_theorem2(sub, Theorem2Config(n_steps=500, n_grid=8, method="primal"))
    for name in ("cos_u_star", "acc_unseen_ex", "acc_seen_ex", "acc_seen_im", "train_acc_im"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), atol=1e-9)
    np.testing.assert_allclose(a.log_loss_ex, b.log_loss_ex, rtol=1e-9)
    np.testing.assert_allclose(a.log_loss_im, b.log_loss_im, rtol=1e-9)
    for r in (a, b):
        assert np.all(r.acc_unseen_im == 0.5)
        assert np.all(r.max_unseen_row_change == 0.0)


def test_im_rm_ties_on_unseen_tokens(problem: Theorem2Problem, default_result) -> None:  # noqa: ANN001
    res = default_result
    # IM-RM fits the training set...
    assert np.all(res.train_acc_im[:, -1] == 1.0)
    assert np.all(res.log_loss_im[:, -1] < np.log(1e-3))
    # ...while every unseen pair ties, at every recorded step: accuracy exactly ½, not ≈ ½.
    assert np.all(res.acc_unseen_im == 0.5)
    assert np.all(res.max_unseen_reward_diff_im == 0.0)
    assert np.all(res.max_unseen_row_change == 0.0)
    seen = set(SYNTHETIC_SEEN_GOOD + SYNTHETIC_SEEN_BAD)
    for s in range(N_SEEDS):
        a = _np(problem, s)
        w_t = res.final_unembedding[s]
        w_0 = np.asarray(select_seeds(problem, s).unembedding).astype(w_t.dtype)
        trained = set(a["train"][:, 1:].ravel().tolist())
        unseen = np.array([v for v in range(w_0.shape[0]) if v not in trained])
        assert trained <= seen
        # unseen rows bitwise unchanged
        assert w_t[unseen].tobytes() == w_0[unseen].tobytes()
        # reward difference of unseen pairs, structurally: the same expression at t and 0 is bitwise equal
        ev = a["eval"][np.isin(a["eval"][:, 1], unseen) & np.isin(a["eval"][:, 2], unseen)]
        h = a["h_prompt"][ev[:, 0]]
        diff = _logit_gap(w_t, ev, h) - _logit_gap(w_0, ev, h)
        assert np.all(diff == 0.0)
        assert _accuracy(diff) == 0.5
        # through log_softmax the normaliser only cancels up to rounding: tiny but not structurally 0
        lp_t, lp_0 = log_softmax(h @ w_t.T, axis=1), log_softmax(h @ w_0.T, axis=1)
        k = np.arange(len(ev))
        noisy = (lp_t[k, ev[:, 1]] - lp_0[k, ev[:, 1]]) - (lp_t[k, ev[:, 2]] - lp_0[k, ev[:, 2]])
        assert np.max(np.abs(noisy)) < 1e-9


def test_ex_rm_converges_to_max_margin(problem: Theorem2Problem, default_result) -> None:  # noqa: ANN001
    res = default_result
    mean_cos = res.cos_u_star.mean(axis=0)
    assert np.all(np.diff(mean_cos[1:]) >= -1e-6)  # increases towards 1
    assert np.all(res.cos_u_star[:, -1] >= 0.99)
    for s in range(N_SEEDS):
        a = _np(problem, s)
        x, yp, ym = a["train"].T
        u_star = max_margin_direction(a["h_pair"][x, yp] - a["h_pair"][x, ym]).direction
        u = res.final_u[s]
        assert u @ u_star / (np.linalg.norm(u) * np.linalg.norm(u_star)) >= 0.99
        ev = a["eval"]
        trained = np.unique(a["train"][:, 1:])
        unseen = ~np.isin(ev[:, 1], trained) & ~np.isin(ev[:, 2], trained)
        acc_star = _accuracy(_ex_diff(a["h_pair"], ev, u_star)[unseen])
        assert res.acc_unseen_ex[s, -1] == acc_star
        assert res.u_star_acc_unseen[s] == acc_star
        assert res.n_eval_unseen[s] == unseen.sum() == 30 * 49
        assert res.acc_seen_ex[s, -1] == 1.0  # u* separates every seen combination here


def test_vmap_and_loop_agree_without_retracing(problem: Theorem2Problem) -> None:
    sub = select_seeds(problem, slice(0, 3))
    cfg = Theorem2Config(n_steps=200, n_grid=5, schedule="plain")
    a = simulate_theorem2(sub, cfg)
    b = simulate_theorem2(sub, cfg, u_star=a.u_star, vectorize=False)
    np.testing.assert_allclose(a.cos_u_star, b.cos_u_star, atol=1e-12)
    np.testing.assert_allclose(a.log_loss_im, b.log_loss_im, rtol=1e-12)
    np.testing.assert_array_equal(a.acc_unseen_im, b.acc_unseen_im)
    before = simulator_trace_count()
    simulate_theorem2(sub, replace(cfg, lr=0.1, beta=0.05), u_star=a.u_star)  # new values, same shapes
    assert simulator_trace_count() == before


def test_float32_keeps_exact_ties(problem: Theorem2Problem) -> None:
    res = simulate_theorem2(select_seeds(problem, slice(0, 2)), Theorem2Config(n_steps=300, n_grid=4, dtype="float32"))
    assert res.final_unembedding.dtype == np.float32
    assert np.all(res.acc_unseen_im == 0.5) and np.all(res.max_unseen_row_change == 0.0)
    assert np.all(res.train_acc_im[:, -1] == 1.0)


def test_initial_state_and_ties_count_half(problem: Theorem2Problem, default_result) -> None:  # noqa: ANN001
    res = default_result
    assert res.steps[0] == 0
    # u(0) = 0 and W(0) = π_ref: every reward difference is 0, so every accuracy is exactly ½
    for name in (
        "acc_unseen_ex",
        "acc_seen_ex",
        "acc_unseen_im",
        "acc_seen_im",
        "train_acc_ex",
        "train_acc_im",
    ):
        assert np.all(getattr(res, name)[:, 0] == 0.5), name
    assert np.allclose(res.log_loss_ex[:, 0], np.log(np.log(2.0)))


def test_u_init(problem: Theorem2Problem) -> None:
    sub = select_seeds(problem, slice(0, 1))
    u0 = np.full(16, 0.3)
    res = simulate_theorem2(sub, Theorem2Config(n_steps=1, n_grid=2, schedule="plain"), u_init=u0)
    a = _np(sub, 0)
    x, yp, ym = a["train"].T
    z = a["h_pair"][x, yp] - a["h_pair"][x, ym]
    np.testing.assert_allclose(res.final_u[0], u0 + 0.5 * z.T @ (expit(-(z @ u0)) / len(z)), rtol=1e-12)


def test_recording_grid() -> None:
    g = recording_grid(10_000_000, 41)
    assert g[0] == 0 and g[1] == 1 and g[-1] == 10_000_000
    assert np.all(np.diff(g) > 0)
    assert list(recording_grid(3, 10)) == [0, 1, 2, 3]


def test_result_json_and_figure(tmp_path, problem: Theorem2Problem) -> None:  # noqa: ANN001
    from figures.theorem2 import theorem2_figure

    res = simulate_theorem2(select_seeds(problem, slice(0, 2)), Theorem2Config(n_steps=50, n_grid=6), seed=5)
    data = json.loads(res.save(tmp_path / "r.json").read_text())
    assert data["acc_unseen_im"] == [[0.5] * len(res.steps)] * 2
    assert data["config"]["schedule"] == "normalized" and data["seed"] == 5
    png, js = theorem2_figure(data, tmp_path / "fig" / "theorem2.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(js.read_text())["steps"] == res.steps.tolist()
    png2, _ = theorem2_figure(res, tmp_path / "fig2.png")  # a result object works too
    assert png2.exists()


# ----------------------------------------------------------------------------------------------------------
# Bad input


def _one(problem: Theorem2Problem) -> Theorem2Problem:
    return select_seeds(problem, 0)


def test_not_separable_training_differences(problem: Theorem2Problem) -> None:
    p = _one(problem)
    train = np.asarray(p.train).copy()
    train[1] = [train[0, 0], train[0, 2], train[0, 1]]  # same prompt, tokens swapped: z_1 = −z_0
    with pytest.raises(RmdynError, match=r"not linearly separable.*rows \[0, 1\]"):
        simulate_theorem2(replace(p, train=train), Theorem2Config(n_steps=5, n_grid=2))


def test_mismatched_dimensions(problem: Theorem2Problem) -> None:
    p = _one(problem)
    with pytest.raises(ConfigError, match=r"unembedding has hidden size 8 \(shape \(20, 8\)\), h_prompt has 16"):
        simulate_theorem2(replace(p, unembedding=np.zeros((20, 8), np.float32)))
    with pytest.raises(ConfigError, match=r"h_pair has 19 tokens"):
        simulate_theorem2(replace(p, h_pair=np.asarray(p.h_pair)[:, :19]))
    with pytest.raises(ConfigError, match=r"u_star must have shape \(1, 16\)"):
        simulate_theorem2(p, u_star=np.zeros((1, 15)))


def test_eval_token_outside_vocabulary(problem: Theorem2Problem) -> None:
    p = _one(problem)
    ev = np.asarray(p.eval_triples).copy()
    ev[7, 2] = 25
    with pytest.raises(ConfigError, match=r"eval_triples\[row 7\] has y- token 25, outside the vocabulary of size 20"):
        simulate_theorem2(replace(p, eval_triples=ev))
    batched = select_seeds(problem, slice(0, 2))
    ev = np.asarray(batched.eval_triples).copy()
    ev[1, 3, 0] = 99
    with pytest.raises(ConfigError, match=r"eval_triples\[seed 1, row 3\] has prompt 99, outside the prompts"):
        simulate_theorem2(replace(batched, eval_triples=ev))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"schedule": "adam"}, r"schedule must be one of"),
        ({"lr": -1.0}, r"lr must be a finite number > 0"),
        ({"n_steps": 0}, r"n_steps must be an integer in \[1, 2\*\*31\)"),
        ({"method": "x"}, r"method must be one of"),
    ],
)
def test_bad_config(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Theorem2Config(**kwargs)


def test_bad_source_arguments() -> None:
    from experiments.cli.commands.theorem2 import load_problem

    with pytest.raises(ConfigError, match=r"--source must be 'synthetic' or 'model'"):
        load_problem("llm", 2, 0)
    with pytest.raises(ConfigError, match=r"--seeds must be >= 1"):
        load_problem("model", 0, 0)


def test_synthetic_problem_is_deterministic_per_key() -> None:
    a = synthetic_problem(jax.random.key(1))
    b = synthetic_problem(jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(a.h_pair), np.asarray(b.h_pair))
    assert np.asarray(a.eval_triples).shape == (30 * 58, 3)


def test_imports_stay_light() -> None:
    """theory never imports the LLM code; CLI registration never imports JAX."""
    code = (
        "import sys, theory\n"
        "bad = [m for m in sys.modules if m.startswith(('dynamics.models', 'torch', 'transformers'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    code = (
        "import sys, argparse\n"
        "import experiments.cli.commands.theorem1 as a, experiments.cli.commands.theorem2 as b, "
        "experiments.cli.commands.bench as c\n"
        "p = argparse.ArgumentParser().add_subparsers()\n"
        "a.register(p); b.register(p); c.register(p)\n"
        "assert 'jax' not in sys.modules, 'registration imported jax'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)

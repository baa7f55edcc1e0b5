"""The one-step commands (`rmdyn delta`, `rho`, `check-step`, `demo`, `bench delta`) and their figures.

Figures are drawn from synthetic numbers; the commands run end to end on the hidden `--tiny` model (a random
d = 16, 2-block Llama with the default tokenizer), and their argument errors exit with status 2 before any model
loads.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments import cli

# ----------------------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------------------


def _delta_dict(reward: str, delta: list[float], method: str = "ntk") -> dict:
    return {
        "delta": delta,
        "reward_before": [0.0] * len(delta),
        "meta": {"reward": reward, "method": method, "params": "all", "optimizer": "sgd", "lr": 1e-3},
    }


def test_delta_bars_figure_writes_png_and_numbers(tmp_path):
    from figures.delta_bars import delta_bars_figure

    results = {
        "EX-RM": _delta_dict("EX-RM", [0.1, -0.2, 0.05]),
        "EX-RM head": _delta_dict("EX-RM", [0.01, 0.02, -0.03], "closed_form"),
        "IM-RM": _delta_dict("IM-RM", [1e-6, 2e-6, -3e-6]),
    }
    png, js = delta_bars_figure(results, ["a", "b", "c"], tmp_path / "bars.png", expected=[1, -1, 0], title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(js.read_text())
    assert data["labels"] == ["a", "b", "c"] and data["expected_sign"] == [1, -1, 0]
    assert data["series"]["IM-RM"]["delta"] == [1e-6, 2e-6, -3e-6]
    assert data["series"]["EX-RM head"]["panel"] == "EX" and data["series"]["IM-RM"]["panel"] == "IM"
    with pytest.raises(ValueError, match="2 labels"):
        delta_bars_figure(results, ["a", "b"], tmp_path / "bad.png")


def _rho_result():
    from dynamics.rho import RhoPanel, RhoResult

    rng = np.random.default_rng(0)

    def panel(tokens):
        shape = (3, len(tokens))
        terms = {k: rng.uniform(0, 0.5, shape) for k in ("indicator", "cross_train", "cross_unseen", "inner")}
        return RhoPanel(train_tokens=tokens, terms=terms, hidden_similarity=rng.normal(size=shape))

    return RhoResult(
        unseen_tokens=["My", " answer", "\n"],
        chosen=panel(["A", " yes", "<|im_end|>", "\n"]),
        rejected=panel(["I", " say", " no", "<|im_end|>", "\n"]),
        beta=0.01,
        bt_weight=0.5,
        lr=1e-3,
        closing_tokens_excluded=False,
        meta={"unseen_response": "My answer"},
    )


def test_rho_figure_accepts_result_and_dict(tmp_path):
    from figures.rho_heatmap import readable_token, rho_figure

    result = _rho_result()
    png, js = rho_figure(result, tmp_path / "rho.png")
    assert png.stat().st_size > 10_000
    data = json.loads(js.read_text())
    # against values computed here from the panels' raw inputs (the four terms and ⟨h, h'⟩), not from the
    # result's own properties: ρ = 1[·] − cross_train − cross_unseen + inner, product = ⟨h, h'⟩ ρ, sums of both,
    # and Δr = η g β² (ΣΣ product(y+) − ΣΣ product(y−)) (arXiv 2507.07981 Eq. (5); docs/math.md §3.2)
    expected = {}
    for side in ("chosen", "rejected"):
        panel = getattr(result, side)
        t = panel.terms
        rho = t["indicator"] - t["cross_train"] - t["cross_unseen"] + t["inner"]
        product = panel.hidden_similarity * rho
        np.testing.assert_allclose(data[side]["rho"], rho, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(data[side]["product"], product, rtol=1e-12, atol=1e-15)
        sums = data["figure"]["sums"][side]
        assert sums["product"] == pytest.approx(product.sum(), rel=1e-12)
        assert sums["rho"] == pytest.approx(rho.sum(), rel=1e-12)
        assert sums["hidden_similarity"] == pytest.approx(panel.hidden_similarity.sum(), rel=1e-12)
        expected[side] = product.sum()
    delta = 1e-3 * 0.5 * 0.01**2 * (expected["chosen"] - expected["rejected"])
    assert abs(delta) > 1e-9
    assert data["delta_reward_closed_form"] == pytest.approx(delta, rel=1e-12)
    # the figure drawn from the result's JSON (as `rmdyn rho` saves it) writes the same numbers
    png2, js2 = rho_figure(json.loads(json.dumps(result.to_dict())), tmp_path / "again.png")
    assert png2.is_file()
    again = json.loads(js2.read_text())
    assert again["figure"]["sums"] == data["figure"]["sums"]
    assert again["delta_reward_closed_form"] == data["delta_reward_closed_form"]
    assert readable_token(" yes\n") == "␣yes\\n"
    bad = result.to_dict()
    bad["chosen"]["rho"] = [[0.0]]
    with pytest.raises(ValueError, match=r"chosen.rho has shape \(1, 1\), expected \(3, 4\)"):
        rho_figure(bad, tmp_path / "bad.png")


def test_step_scatter_figure(tmp_path):
    from figures.step_scatter import step_scatter_figure

    lrs = np.array([1e-4, 1e-3, 1e-2])
    k = np.array([1.0, -2.0, 0.5, 3.0])
    results = {}
    for name, c in (("EX-RM", 0.3), ("IM-RM", 5.0)):
        pred = np.outer(lrs, k)
        results[name] = {
            "lrs": lrs,
            "predicted": pred,
            "actual": pred + c * np.outer(lrs**2, k**2),
            "meta": {"reward": name, "params": "all", "optimizer": "sgd"},
            "residual_slope": {"slope_of_max": 2.0},
        }
    png, js = step_scatter_figure(results, tmp_path / "step.png")
    assert png.is_file()
    data = json.loads(js.read_text())
    np.testing.assert_allclose(data["results"]["IM-RM"]["max_abs_residual"], 5.0 * lrs**2 * 9.0)
    assert data["figure"]["slope_2_guide_anchor"][0] == pytest.approx(1e-2)
    with pytest.raises(ValueError, match="learning rates"):
        step_scatter_figure({"x": {"lrs": [1.0], "predicted": [[1.0, 2.0]], "actual": [[1.0]]}}, tmp_path / "b.png")


# ----------------------------------------------------------------------------------------------------------
# Argument errors: exit 2 with a message, before the model loads
# ----------------------------------------------------------------------------------------------------------


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["delta", "--params", "bogus"], "--params: unknown parameter selection 'bogus'"),
        (["delta", "--params", "head"], "the IM-RM has no head"),
        (["delta", "--params", "unembed", "--reward", "ex"], "does not read the unembedding"),
        (["delta", "--method", "closed_form", "--params", "all"], "covers Assumption 1 only"),
        (["delta", "--lr", "0"], "--lr must be a finite number > 0, got 0.0"),
        (["delta", "--lr=-1e-3"], "--lr must be a finite number > 0"),
        (["delta", "--lr", "-0.5"], "--lr must be a finite number > 0, got -0.5"),
        (["delta", "--lr", "nan"], "--lr must be a finite number > 0"),
        (["delta", "--chunk-size", "0"], "--chunk-size must be ≥ 1"),
        (["delta", "--prompt", "p", "--chosen", "c"], "missing --rejected"),
        (["delta", "--row", "2"], "--row needs --train FILE"),
        (["delta", "--pair", "p", " "], "must be non-empty"),
        (["rho", "--lr", "0"], "--lr must be a finite number > 0"),
        (["rho", "--beta", "-1"], "--beta must be a finite number > 0"),
        (["check-step", "--lrs", "1e-3,-1"], "every value of --lrs must be a finite number > 0"),
        (["check-step", "--lrs", "1e-3,abc"], "--lrs must be a comma-separated list"),
        (["check-step", "--params", "last:x"], "--params: parameter selection 'last:x': K in last:K must be"),
        (["demo", "--lr", "0"], "--lr must be a finite number > 0"),
        (["bench", "delta", "--pairs", "0", "--tiny"], "must be ≥ 1"),
    ],
)
def test_argument_errors_exit_2(argv, message, capsys, tmp_path):
    code = cli.main([*argv, "--out", str(tmp_path / "out")] if argv[0] != "bench" else argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and err.startswith(f"rmdyn {argv[0]}: error:")
    assert not (tmp_path / "out").exists()


def test_jsonl_errors_name_file_and_line(tmp_path, capsys):
    unseen = _jsonl(tmp_path / "unseen.jsonl", [{"prompt": "p", "response": "ok"}, {"prompt": "p", "response": ""}])
    assert cli.main(["delta", "--unseen", str(unseen), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{unseen} line 2: field 'response' is empty" in err
    train = _jsonl(tmp_path / "train.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    assert cli.main(["delta", "--train", str(train), "--row", "1", "--out", str(tmp_path / "o")]) == 2
    assert f"--row 1: {train} has rows 0..0" in capsys.readouterr().err
    assert cli.main(["rho", "--train", str(train), "--prompt", "x", "--out", str(tmp_path / "o")]) == 2
    assert "--train and --prompt both given" in capsys.readouterr().err
    assert cli.main(["rho", "--unseen", str(unseen), "--out", str(tmp_path / "o")]) == 2  # line 2 is still bad
    assert f"{unseen} line 2" in capsys.readouterr().err


def test_params_defaults_and_reward_kinds():
    from experiments.cli.arguments import resolve_params

    assert resolve_params(None, ["ex", "im"]) == "all"
    assert resolve_params(None, ["im"], "closed_form") == "output"
    assert resolve_params("last:3", ["ex", "im"]) == "last:3"
    assert resolve_params("re:layers_1/", ["im"]) == "re:layers_1/"
    from dynamics.errors import ConfigError

    with pytest.raises(ConfigError, match=r"--params: .*'re:\('.*not a valid regular expression"):
        resolve_params("re:(", ["im"])


def test_registration_does_not_import_jax():
    import subprocess
    import sys

    code = (
        "import sys; from experiments import cli; cli.build_parser(); "
        "print('jax' in sys.modules, 'dynamics.delta' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# ----------------------------------------------------------------------------------------------------------
# Inputs and the demo's bookkeeping
# ----------------------------------------------------------------------------------------------------------


def test_demo_set_and_sign_summary():
    from experiments.studies.demo import demo_pairs, demo_triple, sign_summary

    triple, pairs = demo_triple(), demo_pairs()
    assert triple.chosen == "A truthful reply is yes" and triple.rejected == "Considering the statement, I say no"
    assert pairs[0].prompt == triple.prompt and pairs[0].response == "My response would be certainly"
    assert len({p.prompt for p in pairs}) == 3 and len(pairs) == 22
    assert {p.group for p in pairs} == {"paraphrase", "swapped openings", "training style"}
    delta = np.array([1.0 if p.expected > 0 else -1.0 for p in pairs])
    s = sign_summary(delta, pairs)
    assert all(v["expected_sign"] == 1.0 and v["margin_accuracy"] == 1.0 for v in s.values())
    s = sign_summary(np.zeros(len(pairs)), pairs)
    assert s["paraphrase"]["margin_accuracy"] == 0.5  # ties count ½
    assert s["paraphrase"]["n"] == 12


# ----------------------------------------------------------------------------------------------------------
# End to end on the tiny model
# ----------------------------------------------------------------------------------------------------------

PAIRS = ["--pair", "Is the sky blue?", "My response would be certainly", "--pair", "Is it?", "I lean toward nope"]
TRIPLE = ["--prompt", "Do you like people?", "--chosen", "A truthful reply is yes", "--rejected", "I say no"]


def test_delta_command_on_tiny_model(tmp_path, capsys):
    unseen = _jsonl(tmp_path / "u.jsonl", [{"prompt": "Q?", "chosen": "Yes", "rejected": "No"}])
    out = tmp_path / "delta"
    code = cli.main(["delta", "--tiny", *TRIPLE, *PAIRS, "--unseen", str(unseen), "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0
    assert "EX-RM Δr" in text and "IM-RM Δr" in text and "K(u,y+)" in text
    data = json.loads((out / "delta.json").read_text())
    assert [p["label"] for p in data["unseen"]] == ["chosen", "rejected", None, None]
    for name in ("EX-RM", "IM-RM"):
        assert len(data["results"][name]["delta"]) == 4
        assert data["results"][name]["meta"]["params"] == "all"
    assert (out / "delta_bars.png").is_file() and (out / "delta_bars.json").is_file()


def test_rho_command_on_tiny_model(tmp_path, capsys):
    out = tmp_path / "rho"
    code = cli.main(["rho", "--tiny", *TRIPLE, "--pair", "Is the sky blue?", "Certainly yes", "--exclude-closing",
                     "--out", str(out)])  # fmt: skip
    text = capsys.readouterr().out
    assert code == 0 and "K(u,y+) = β²ΣΣ" in text and "Δr (Eq. (5)" in text
    data = json.loads((out / "rho.json").read_text())
    assert data["closing_tokens_excluded"] is True
    assert "<|im_end|>" not in data["unseen_tokens"] and "<|im_end|>" not in data["chosen"]["tokens"]
    assert (out / "rho.png").is_file()


def test_check_step_command_on_tiny_model(tmp_path, capsys):
    out = tmp_path / "step"
    code = cli.main(["check-step", "--tiny", *TRIPLE, *PAIRS, "--lrs", "1e-2,1e-1", "--params", "last:1",
                     "--reward", "ex", "--out", str(out)])  # fmt: skip
    text = capsys.readouterr().out
    assert code == 0 and "residual slope" in text and "Pearson" in text
    data = json.loads((out / "check_step.json").read_text())
    assert list(data["results"]) == ["EX-RM"] and data["results"]["EX-RM"]["lrs"] == [1e-2, 1e-1]
    assert np.asarray(data["results"]["EX-RM"]["actual"]).shape == (2, 2)
    assert (out / "check_step.png").is_file()


def test_bench_delta_on_tiny_model(capsys):
    code = cli.main(["bench", "delta", "--tiny", "--reward", "ex", "--pairs", "3", "--chunk-size", "2",
                     "--grad-chunk-size", "2", "--repeats", "1"])  # fmt: skip
    text = capsys.readouterr().out
    assert code == 0 and "ratio (b)/(a)" in text and "ratio (c)/(b)" in text
    rel = float(text.split("max |Δr| = ")[1].split()[0])
    assert rel < 1e-3  # the eNTK and the materialized gradients compute the same numbers


def test_demo_command_on_tiny_model(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--tiny", "--no-closed-form", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "One-step ranking" in text and "What this shows on this model" in text and "EX all" in text
    for name in ("delta.json", "delta_bars.png", "rho.png", "rho.json", "rho_content_tokens.png"):
        assert (out / name).is_file(), name
    data = json.loads((out / "delta.json").read_text())
    assert set(data["results"]) == {"EX-RM ntk all", "IM-RM ntk all"}
    assert len(data["unseen"]) == 22 and data["summary"]["IM-RM ntk all"]["ranking"]["paraphrase"]["n"] == 12

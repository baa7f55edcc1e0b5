"""experiments.studies.ultrafeedback (docs/math.md §6.3): selection, length filter, tie rule, summaries, bad data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from dynamics.errors import ConfigError, DataError
from experiments.plans.grammar import load_plan
from experiments.studies.ultrafeedback.data import ultrafeedback_data
from experiments.studies.ultrafeedback.report import (
    PAPER_AGGREGATE,
    TieRule,
    aggregate_table,
    compare_sets,
    parse_categories,
    set_metrics,
    summarize_categories,
    ultrafeedback_report,
)
from experiments.studies.ultrafeedback.runner import validate


def _metrics(acc: float, margin: float = 1.0, n: int = 200) -> dict[str, float]:
    return {"accuracy": acc, "normalized_margin": margin, "n": n}


def test_tie_rules_by_hand():
    stderr = TieRule("stderr", k=1.0)
    se = math.sqrt(0.7 * 0.3 / 200 + 0.6 * 0.4 / 200)  # ≈ 0.0474
    assert stderr.band(0.7, 0.6, 200, 200) == pytest.approx(se)
    assert stderr.decide(0.70, 0.60, 200, 200) == "ex"  # 0.10 > 0.047
    assert stderr.decide(0.60, 0.70, 200, 200) == "im"
    assert stderr.decide(0.70, 0.67, 200, 200) == "tie"  # 0.03 < 0.046
    assert stderr.decide(0.70, 0.60, 16, 16) == "tie"  # the same gap on 16 pairs is within one SE (≈ 0.17)
    assert stderr.decide(1.0, 1.0, 10, 10) == "tie"  # SE 0, equal
    assert stderr.decide(1.0, 0.95, 10, 10) == "tie" and stderr.decide(1.0, 0.95, 1000, 1000) == "ex"
    assert TieRule("stderr", k=2.0).band(0.7, 0.6, 200, 200) == pytest.approx(2 * se)
    fixed = TieRule("fixed", threshold=0.01)
    assert fixed.decide(0.700, 0.695, 5, 5) == "tie" and fixed.decide(0.70, 0.68, 5, 5) == "ex"
    assert fixed.decide(0.5, 0.51, 200, 200) == "tie"  # |Δ| = 0.01 is within the band (≤)
    assert "0.01" in fixed.describe() and fixed.to_dict()["kind"] == "fixed"
    with pytest.raises(ConfigError, match="tie_rule must be"):
        TieRule("binomial")
    with pytest.raises(ConfigError, match=">= 0"):
        TieRule("fixed", threshold=-1.0)


def test_win_tie_loss_summary_per_category():
    categories = parse_categories(["uf=in-distribution", "para=token-level shift", "fr=token-level shift",
                                   "math=domain shift", "code=domain shift"])  # fmt: skip
    ex = {"uf": _metrics(0.75, 1.1), "para": _metrics(0.70), "fr": _metrics(0.62), "math": _metrics(0.55),
          "code": _metrics(0.64), "train": _metrics(0.9)}  # fmt: skip
    im = {"uf": _metrics(0.64, 0.8), "para": _metrics(0.60), "fr": _metrics(0.61), "math": _metrics(0.72),
          "code": _metrics(0.63), "train": _metrics(0.9)}  # fmt: skip
    comps = compare_sets(ex, im, categories, TieRule("fixed", threshold=0.02))
    assert [c.set for c in comps] == ["uf", "para", "fr", "math", "code"]  # "train" has no category
    assert [c.winner for c in comps] == ["ex", "ex", "tie", "im", "tie"]
    summary = summarize_categories(comps)["EX-RM vs IM-RM"]
    assert list(summary) == ["in-distribution", "token-level shift", "domain shift"]
    assert (summary["token-level shift"]["ex_wins"], summary["token-level shift"]["ties"]) == (1, 1)
    assert (summary["domain shift"]["im_wins"], summary["domain shift"]["ties"]) == (1, 1)
    assert summary["token-level shift"]["mean_acc_ex"] == pytest.approx(0.66)
    assert summary["in-distribution"]["mean_margin_im"] == pytest.approx(0.8)


def test_aggregate_table_means_and_paper_numbers():
    categories = {"uf": "in-distribution", "para": "token-level shift", "fr": "token-level shift"}
    runs = [
        {"label": "EX-RM", "metrics": {"uf": _metrics(0.8, 1.2), "para": _metrics(0.7, 1.0), "fr": _metrics(0.5, 0.8)}},
        {"label": "EX-RM", "metrics": {"uf": _metrics(0.6, 1.0), "para": _metrics(0.6, 1.0), "fr": _metrics(0.6, 1.0)}},
        {"label": "IM-RM", "metrics": {"uf": _metrics(0.5, 0.5), "para": _metrics(0.4, 0.5), "fr": _metrics(0.4, 0.7)}},
    ]
    table = aggregate_table(runs, categories)
    rows = {r["category"]: r for r in table["rows"]}
    assert rows["in-distribution"]["EX-RM acc"] == pytest.approx(0.7)  # over two runs
    assert rows["token-level shift"]["EX-RM acc"] == pytest.approx(0.6)  # over two sets × two runs
    assert rows["token-level shift"]["IM-RM margin"] == pytest.approx(0.6)
    assert rows["in-distribution"]["paper IM-RM acc"] == PAPER_AGGREGATE["in-distribution"]["IM-RM"][0] == 0.646
    assert "paper EX-RM margin" in table["columns"]
    assert "paper EX-RM acc" not in aggregate_table(runs, categories, paper=False)["columns"]


def test_report_pairs_runs_within_groups():
    def final(acc):
        return {
            "uf/rewards/accuracies": acc,
            "uf/rewards/normalized_margin": 1.0,
            "uf/rows": 100.0,
            "train/rewards/accuracies": 1.0,
            "train/rewards/normalized_margin": 2.0,
            "train/rows": 10.0,
        }

    runs = [
        {"name": "a-ex", "reward": "ex", "group": "model=a", "final_eval": final(0.9)},
        {"name": "a-im", "reward": "im", "group": "model=a", "final_eval": final(0.5)},
        {"name": "a-exm", "reward": "ex-mean", "group": "model=a", "final_eval": final(0.52)},
        {"name": "b-ex", "reward": "ex", "group": "model=b", "final_eval": final(0.4)},
        {"name": "b-im", "reward": "im", "group": "model=b", "final_eval": final(0.8)},
    ]
    report = ultrafeedback_report(runs, {"uf": "in-distribution"}, TieRule())
    pairs = [(c["group"], c["explicit"], c["implicit"], c["winner"]) for c in report["comparisons"]]
    assert pairs == [("model=a", "EX-RM", "IM-RM", "ex"), ("model=a", "EX-RM (mean)", "IM-RM", "tie"),
                     ("model=b", "EX-RM", "IM-RM", "im")]  # fmt: skip
    assert report["summary"]["EX-RM vs IM-RM"]["in-distribution"] == {
        "ex_wins": 1, "ties": 0, "im_wins": 1, "n_sets": 2, "mean_acc_ex": pytest.approx(0.65),
        "mean_acc_im": pytest.approx(0.65), "mean_margin_ex": 1.0, "mean_margin_im": 1.0,
    }  # fmt: skip
    assert report["per_set"]["a-ex"]["train"]["n"] == 10
    assert report["tie_rule"]["kind"] == "stderr"
    with pytest.raises(DataError, match="no set 'fr'"):
        set_metrics(runs[0]["final_eval"], "fr")


@pytest.fixture(scope="module")
def tokenizer():
    from dynamics.models import default_model_path
    from dynamics.tokenizer import load_tokenizer

    return load_tokenizer(default_model_path())


def test_cpu_preset_data_skips_long_pairs_and_reports(tokenizer):
    values = dict(load_plan("ultrafeedback", "cpu").values)
    data = ultrafeedback_data(values, tokenizer)
    assert len(data.train) == values["n_train"] and len(data.eval_sets["train"]) == values["n_train_eval"]
    assert list(data.eval_sets) == ["train", *values["eval_sets"]]
    assert all(len(rows) == values["n_eval"] for name, rows in data.eval_sets.items() if name != "train")
    limit = values["max_response_tokens"]
    for rows in [data.train, *data.eval_sets.values()]:
        for r in rows:
            assert len(tokenizer.encode(r.chosen, add_special_tokens=False)) <= limit
            assert len(tokenizer.encode(r.rejected, add_special_tokens=False)) <= limit
    info = data.info["rows"]["french"]
    assert info["available"] == 200 and info["over_max_response_tokens"] == len(info["skipped_ids"]) > 50
    assert data.info["rows"]["train_data"]["fields"] == ["prompt", "original_chosen", "original_rejected"]
    # English originals of the rewritten rows: row 0 of the bundled file
    first = json.loads(Path(data.info["rows"]["train_data"]["file"]).read_text(encoding="utf-8").splitlines()[0])
    originals = {(r.prompt, r.chosen) for r in ultrafeedback_data({**values, "max_response_tokens": 0,
                                                                  "n_train": 0}, tokenizer).train}  # fmt: skip
    assert (first["prompt"], first["original_chosen"]) in originals
    assert data.info["categories"]["french"] == "token-level shift"
    assert data.info["tie_rule"]["kind"] == "stderr"


def test_rewardmath_selection_is_the_official_randperm():
    """1,000 of the 2,000 RewardMATH pairs: torch.randperm(2000, generator=manual_seed(517))[:1000]."""
    from dynamics.datasets import TorchCompatibleGenerator, load_preferences
    from experiments.studies.bundled import bundled_data_path

    values = dict(load_plan("rewardmath").values)
    data = ultrafeedback_data(values)
    rows = load_preferences(bundled_data_path("rewardmath.train"))
    perm = TorchCompatibleGenerator(517).randperm(2000)[:1000]
    assert [r.id for r in data.train] == [rows[int(i)].id for i in perm]
    train_eval = np.sort(TorchCompatibleGenerator(517).randperm(1000)[:200])
    assert [r.id for r in data.eval_sets["train"]] == [data.train[int(i)].id for i in train_eval]
    assert list(data.eval_sets)[1] == "rewardmath" and "ultrafeedback" in data.eval_sets
    assert data.info["categories"]["rewardmath"] == "in-distribution"


def test_bad_data_file_names_file_and_line(tmp_path, monkeypatch, capsys):
    from experiments import cli

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr("dynamics.training.train", no_training)
    monkeypatch.setattr("dynamics.loading.load", no_training)
    bad = tmp_path / "train.jsonl"
    good = json.dumps({"prompt": "P", "chosen": "A", "rejected": "B"})
    bad.write_text(good + "\n" + json.dumps({"prompt": "P", "chosen": "", "rejected": "B"}) + "\n")
    code = cli.main(["experiment", "ultrafeedback", "--set", f"train_data={bad}", "--set", "max_response_tokens=0",
                     "--out", str(tmp_path / "out")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and f"{bad} line 2" in err and "'chosen' is empty" in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code = cli.main(["experiment", "ultrafeedback", "--set", f"eval_sets=[\"mine={empty}\"]",
                     "--set", 'categories=["mine=domain shift"]', "--out", str(tmp_path / "out")])  # fmt: skip
    assert code == 2 and "no rows" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (["n_train_eval=0"], DataError, "evaluation set 'train' has no rows"),
        (["eval_sets=[]"], ConfigError, "eval_sets is empty"),
        (['eval_sets=["nope"]'], DataError, "eval set 'nope'"),
        (['categories=["ultrafeedback=in-distribution"]'], ConfigError, "no category for the evaluation sets"),
        (['categories=["ultrafeedback"]'], ConfigError, "expected 'set=category'"),
        (["tie_rule=binomial"], ConfigError, "tie_rule must be"),
        (["reward=exgrm"], ConfigError, "Persona only"),
        (["n_eval=-1"], ConfigError, "n_eval must be >= 0"),
    ],
)
def test_bad_options_are_config_errors(overrides, error, message):
    values = dict(load_plan("ultrafeedback", None, [*overrides, "max_response_tokens=0"]).values)
    with pytest.raises(error, match=message):
        validate(values)


def test_all_rows_too_long_is_an_empty_set(tokenizer):
    sets = ['eval_sets=["rewardbench_math"]', 'categories=["rewardbench_math=domain shift"]']
    values = dict(load_plan("ultrafeedback", "cpu", sets).values)
    with pytest.raises(DataError, match="training set has no rows"):
        ultrafeedback_data({**values, "max_response_tokens": 1}, tokenizer)
    with pytest.raises(ConfigError, match="n_train must be >= 0"):
        ultrafeedback_data({**values, "n_train": -2}, tokenizer)


def test_unknown_key_names_the_valid_keys():
    with pytest.raises(ConfigError, match="unknown key 'tie_rules'; valid keys: .*tie_rule"):
        load_plan("ultrafeedback", "cpu", ["tie_rules=fixed"])


def test_derived_plans_share_the_parents_keys():
    """rewardmath / *_ablations duplicate their parent's [base]; they must not drift apart."""
    uf = load_plan("ultrafeedback").values
    for name, changed in (("rewardmath", {"train_data", "n_train", "eval_sets", "categories"}),
                          ("ultrafeedback_ablations", {"reward"})):  # fmt: skip
        other = load_plan(name).values
        assert set(other) == set(uf)
        assert {k for k in uf if uf[k] != other[k]} == changed
    assert load_plan("ultrafeedback_ablations").grid["reward"] == ("ex", "ex-mean", "im", "im-noref")
    persona, ablations = load_plan("persona"), load_plan("persona_ablations")
    assert dict(persona.values) == {**ablations.values, "reward": persona.values["reward"]}
    assert ablations.grid["reward"] == ("ex", "ex-mean", "im", "im-noref", "exgrm")
    for preset in ("cpu", "paper"):
        a, b = load_plan("persona", preset), load_plan("persona_ablations", preset)
        assert {k: v for k, v in a.values.items() if k != "reward"} == {
            k: v for k, v in b.values.items() if k != "reward"
        }


@pytest.mark.slow
def test_ultrafeedback_end_to_end_with_the_real_tokenizer(tmp_path, tokenizer):
    """Two steps of IM-RM and EX-RM on a tiny random LM, 4 pairs per set; the report and the table."""
    import jax

    from dynamics.loading import Loaded
    from dynamics.models import LM, DecoderConfig
    from experiments.studies.protocol import study_runner

    ultrafeedback = study_runner("ultrafeedback")

    config = DecoderConfig(
        family="llama", vocab_size=49152, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32,
        tie_embeddings=True, max_position=1024,
    )  # fmt: skip
    lm = LM(config)
    loaded = Loaded(lm, lm.init(jax.random.PRNGKey(0)), tokenizer, "tiny", "tiny")
    plan = load_plan("ultrafeedback", "cpu", ["n_train=8", "n_eval=4", "n_train_eval=4", "batch_size=4",
                                              "micro_batch_size=2", "max_steps=2", "params=last:1"])  # fmt: skip
    finals = {}
    for spec in plan.runs():
        result = ultrafeedback.run(spec.values, tmp_path / spec.name, progress=False, loaded=loaded)
        finals[spec.name] = result.final_eval
        assert result.final_eval["rewardmath/rows"] == 4.0
    table = ultrafeedback.table(plan, finals)
    assert len(table["comparisons"]) == 7 and set(table["summary"]["EX-RM vs IM-RM"]) == {
        "in-distribution", "token-level shift", "domain shift"}  # fmt: skip
    assert "win / tie / loss" in ultrafeedback.format_table(table)
    saved = json.loads((tmp_path / "reward=ex" / "config.json").read_text())
    assert saved["data"]["info"]["rows"]["french"]["over_max_response_tokens"] > 0

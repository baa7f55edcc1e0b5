"""experiments.plans (plans, presets, --set) and experiments.studies.persona (data, evaluation sets, the CLI)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import require

from dynamics.errors import ConfigError, DataError
from experiments.plans.grammar import load_plan


def test_plan_presets_and_overrides():
    plan = load_plan("persona", "cpu")
    assert plan.values["params"] == "last:8" and plan.values["lr"] == 3e-5 and plan.values["batch_size"] == 32
    assert [r.name for r in plan.runs()] == ["reward=im", "reward=ex"]
    paper = load_plan("persona", "paper")
    assert paper.values["lr"] == 1e-6 and paper.values["params"] == "all" and paper.values["epochs"] == 50
    assert len(paper.runs()) == 8  # 4 models × 2 reward types
    custom = load_plan("persona", "cpu", ["lr=1e-4", "epochs=2", "reward=ex", "truncate=true", "words_yes=ok,fine"])
    assert custom.values["lr"] == 1e-4 and custom.values["epochs"] == 2 and custom.values["truncate"] is True
    assert custom.values["words_yes"] == ["ok", "fine"]
    assert [r.name for r in custom.runs()] == ["reward=ex"] and custom.runs()[0].values["reward"] == "ex"
    axis = load_plan("persona", "cpu", ['options.reward=["im", "im-noref", "ex"]'])
    assert [r.values["reward"] for r in axis.runs()] == ["im", "im-noref", "ex"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("learning_rate=1", "unknown key 'learning_rate'; valid keys: .*lr"),
        ("epochs=2.5", "epochs must be an int"),
        ("lr=fast", "lr must be a float"),
        ("truncate=maybe", "truncate must be a bool"),
        ("epochs", "expected key=value"),
        ("options.nope=[1]", "not a key"),
    ],
)
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError, match=message):
        load_plan("persona", "cpu", [override])


def test_unknown_plan_and_preset():
    with pytest.raises(ConfigError, match="available: .*persona"):
        load_plan("nope")
    with pytest.raises(ConfigError, match="presets: controlled, cpu, paper, remedy"):
        load_plan("persona", "gpu")


def test_a_typo_in_a_plan_names_the_file(tmp_path):
    text = Path(load_plan("persona").source).read_text()
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace("[presets.cpu]\n", "[presets.cpu]\nlearning_rate = 1.0\n"))
    with pytest.raises(ConfigError, match=r"bad.toml \[presets.cpu\]: 'learning_rate' is not a key"):
        load_plan(str(bad), "cpu")


def test_persona_texts_reproduce_the_official_draws():
    """split_rng="torch": torch.randperm, then per row randint for yes prefix, yes word, no prefix, no word."""
    torch = require("torch")
    from dynamics.datasets import load_persona, persona_split
    from experiments.studies.bundled import bundled_data_path
    from experiments.studies.persona.data import persona_texts

    values = dict(load_plan("persona").values)
    texts = persona_texts(values)
    rows = load_persona(bundled_data_path("persona/agreeableness.jsonl"))
    train, test = persona_split(rows, 80, 40, 875, rng="torch")
    assert [t["prompt"] for t in texts.train] == [r.prompt for r in train]
    assert [t["prompt"] for t in texts.test] == [r.prompt for r in test]
    g = torch.Generator().manual_seed(875)
    torch.randperm(len(rows), generator=g)
    expected = []
    for _ in range(120):  # the official datamodule maps the training rows, then the test rows
        draws = [int(torch.randint(0, 2, (1,), generator=g)) for _ in range(4)]
        yes = values["prefixes_yes"][draws[0]] + values["words_yes"][draws[1]]
        no = values["prefixes_no"][draws[2]] + values["words_no"][draws[3]]
        expected.append((yes, no))
    assert [(t["chosen"], t["rejected"]) for t in texts.train + texts.test] == expected
    assert set(texts.eval_prefixes["test"]["yes"]) == {"My response would be "}


def test_persona_bad_data_fails_before_training(tmp_path, monkeypatch, capsys):
    from experiments import cli

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr("dynamics.training.train", no_training)
    monkeypatch.setattr("dynamics.loading.load", no_training)
    bad = tmp_path / "persona.jsonl"
    good = json.dumps({"question": "Q?", "statement": "S", "answer_matching_behavior": " Yes",
                       "answer_not_matching_behavior": " No"})  # fmt: skip
    bad.write_text(good + "\n" + '{"question": "Q2?", "statement": ""}\n')
    code = cli.main(["experiment", "persona", "--set", f"data_file={bad}", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and f"{bad} line 2" in err
    code = cli.main(["experiment", "persona", "--set", "n_test=0", "--out", str(tmp_path / "out")])
    assert code == 2 and "evaluation set of test prompts has no rows" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_persona_end_to_end_with_the_real_tokenizer(tmp_path):
    """Two steps of IM-RM, EX-RM and EX-GRM on a tiny random LM with the default tokenizer (vocabulary 49152).

    `rmdyn experiment persona --preset cpu --set max_steps=...` runs the same path on the real model.
    """
    import jax

    from dynamics.loading import Loaded
    from dynamics.models import LM, DecoderConfig, default_model_path
    from dynamics.tokenizer import load_tokenizer
    from experiments.studies.protocol import study_runner

    persona = study_runner("persona")

    tokenizer = load_tokenizer(default_model_path())
    config = DecoderConfig(
        family="llama", vocab_size=49152, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32,
        tie_embeddings=True, max_position=512,
    )  # fmt: skip
    lm = LM(config)
    loaded = Loaded(lm, lm.init(jax.random.PRNGKey(0)), tokenizer, "tiny", "tiny")
    plan = load_plan("persona", "cpu", ["n_train=8", "n_test=4", "batch_size=4", "micro_batch_size=2", "epochs=1",
                                        "max_steps=2", "params=last:1", "eval_every_epochs=1",
                                        'options.reward=["im", "ex", "exgrm"]'])  # fmt: skip
    finals = {}
    for spec in plan.runs():
        result = persona.run(spec.values, tmp_path / spec.name, progress=False, loaded=loaded)
        finals[spec.name] = result.final_eval
        first = next(h for h in result.history if h["event"] == "eval")
        for name in ("original/train", "original/test", "paraphrased/train", "paraphrased/test"):
            assert 0.0 <= first[f"{name}/rewards/accuracies"] <= 1.0
        combos = [k for k in first if k.startswith("paraphrased/test/") and k.endswith("/rewards/accuracies")]
        assert len(combos) == 5  # 4 combinations + their average
        mean = np.mean([first[k] for k in combos if k != "paraphrased/test/rewards/accuracies"])
        assert first["paraphrased/test/rewards/accuracies"] == pytest.approx(mean)
        if spec.values["reward"] == "im":
            assert first["original/test/rewards/ties"] == 1.0  # π_θ = π_ref at step 0
        saved = json.loads((tmp_path / spec.name / "config.json").read_text())
        assert saved["data"]["info"]["n_train"] == 8 and saved["mask"]["spec"] == "last:1"
    table = persona.table(plan, finals)
    assert table["columns"] == ["IM-RM", "EX-RM", "EX-GRM"] and len(table["rows"]) == 4
    assert "Paraphrased" in persona.format_table(table)


def test_persona_validation_catches_empty_word_lists():
    from experiments.studies.persona.runner import validate

    values = dict(load_plan("persona", "cpu").values)
    validate(values)
    with pytest.raises(ConfigError, match="eval_words_no must be a non-empty list"):
        validate({**values, "eval_words_no": []})
    with pytest.raises(DataError, match="training set has no rows"):
        validate({**values, "n_train": 0})

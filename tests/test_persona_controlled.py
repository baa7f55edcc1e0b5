"""The controlled Persona design (experiments.studies.persona.controlled, docs/math.md §6.2.1), on the default
model's tokenizer: a same-opening pair's two encoded sequences (chat template and all) differ only in the answer
span; every opening is asked with both polarities; new words share no token with the training words; the per-prompt
cell accuracies average to the accuracies the trainer's evaluation logs; each bad design is refused by name."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from dynamics.errors import ConfigError, DataError
from experiments.plans.grammar import load_plan
from experiments.studies.persona.controlled import (
    check_tokens,
    controlled_design,
    controlled_prompts,
    controlled_suite,
    pair_accuracies,
)
from experiments.studies.persona.data import persona_texts
from experiments.studies.persona.runner import validate


@pytest.fixture(scope="module")
def tokenizer():
    from dynamics.models import resolve_model_source
    from dynamics.models.gguf_loader import open_gguf
    from dynamics.tokenizer import ensure_chat_template, load_tokenizer

    return ensure_chat_template(load_tokenizer(open_gguf(resolve_model_source(None))))[0]


def _values(*overrides):
    return dict(load_plan("persona", "cpu", ["design=controlled", *overrides]).runs()[0].values)


def _real(batch, i):
    return np.asarray(batch.tokens)[i][np.asarray(batch.attention_mask)[i] == 1].tolist()


def test_same_opening_pairs_differ_only_in_the_answer_span(tokenizer):
    from dynamics.text import encode_pairs

    values = _values()
    design = controlled_design(values, values["n_train"])
    prompt = "Is it good to be kind?"
    checked = 0
    for o in design.seen_openings + design.new_openings:
        for lst in design.words:
            for a, b in itertools.product(lst.yes, lst.no):
                batch = encode_pairs(tokenizer, [prompt, prompt], [o + a, o + b], max_length=128)
                x, y = _real(batch, 0), _real(batch, 1)
                k = next(i for i in range(min(len(x), len(y))) if x[i] != y[i])  # first difference
                tail = next(i for i in range(1, min(len(x), len(y))) if x[-i] != y[-i])  # last difference
                assert tokenizer.decode(x[k : len(x) - tail + 1]).strip() == a, (o, a, b)
                assert tokenizer.decode(y[k : len(y) - tail + 1]).strip() == b, (o, a, b)
                assert tokenizer.decode(x[:k]).endswith(o.rstrip())  # the opening is the shared part
                checked += 1
    assert checked == 7 * 4 * 4  # 7 openings × 4 word lists × 2 yes × 2 no


def test_every_opening_is_asked_with_both_polarities():
    values = _values()
    texts = persona_texts(values)
    design = controlled_design(values, values["n_train"])
    sequences, comparisons, averages = controlled_suite(lambda p, r: list(zip(p, r, strict=True)), texts, design)
    assert len(sequences) == 2 * 7 * 16  # 2 splits × 7 openings × 16 words
    for split, o, lst in itertools.product(("train", "test"), design.seen_openings + design.new_openings, design.words):
        kind = "seen" if o in design.seen_openings else "new"
        members = averages[f"same/{split}/{kind}/{lst.name}"]
        pairs = {comparisons[m] for m in members}
        for a, b in itertools.product(lst.yes, lst.no):  # the opening with a yes-word preferred over it with a no-word
            assert (f"{split}/controlled/{o}|{a}", f"{split}/controlled/{o}|{b}") in pairs
    rows = dict(sequences)["train/controlled/Here is my answer: |indeed"]
    assert len(rows) == 40 and rows[0] == (texts.train[0]["prompt"], "Here is my answer: indeed")
    assert len(sequences["test/controlled/I lean toward |yes"]) == 40


def test_new_words_are_new_as_tokens(tokenizer):
    values = _values()
    spans = check_tokens(controlled_design(values, values["n_train"]), tokenizer)
    trained = {t for w in ("yes", "sure", "no", "never") for t in spans[w]}
    for lst in values["new_words_yes"] + values["new_words_no"]:
        for w in lst:
            assert spans[w] and not set(spans[w]) & trained, w
    bad = _values('new_words_no=[["not really", "no way"], ["hardly", "unlikely"], ["wrong", "false"]]')
    with pytest.raises(DataError, match=r"the new word 'no way' \(new1\) shares the token\(s\) ' no' with"):
        check_tokens(controlled_design(bad, bad["n_train"]), tokenizer)


def test_cell_accuracies_are_the_mean_of_the_logged_comparisons():
    """Per-prompt accuracies (pair_accuracies) against the trainer's metrics of the same rewards
    (dynamics.training.evaluate_rewards over the suite's comparisons and averages), with ties."""
    from dynamics.training import EvalSuite
    from dynamics.training.evaluation import evaluate_rewards

    values = _values()
    texts = persona_texts(values)
    design = controlled_design(values, values["n_train"])
    sequences, comparisons, averages = controlled_suite(lambda p, r: list(zip(p, r, strict=True)), texts, design)
    rng = np.random.default_rng(0)
    rewards = {name: rng.integers(0, 3, len(rows)).astype(float) for name, rows in sequences.items()}  # many ties
    logged = evaluate_rewards(rewards, EvalSuite(sequences, comparisons, averages))
    cells = pair_accuracies(rewards, design)
    assert set(cells) == set(averages)
    for name, per_prompt in cells.items():
        assert per_prompt.shape == (len(controlled_prompts(texts, design)[name.split("/")[1]]),)
        assert per_prompt.mean() == pytest.approx(logged[f"{name}/rewards/accuracies"], abs=1e-12), name


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ('new_words_yes=[[], ["indeed"], ["agreed"]]', r"new_words_yes\[0\] must be a non-empty list"),
        ('new_words_yes=[["sure", "indeed"], ["a1"], ["b1"]]', "'sure' is in the training yes-words and in the new1"),
        ('new_words_no=[["hardly"], ["hardly"], ["nah"]]', "'hardly' is in the new1 no-words and in the new2 no-words"),
        ('new_words_yes=[["x1"]]', "equally long non-empty lists of word lists"),
        ('prefixes_no=["My judgement: "]', "as many training yes-openings as no-openings"),
        ('new_openings=["A truthful reply is "]', "is a training opening"),
        ('new_openings=["Surely yes, "]', "contains the answer word 'yes'"),
        ("new_openings=[]", "new_openings must be a non-empty list"),
        ("controlled_train_prompts=81", r"controlled_train_prompts must be in 1…n_train = 80, got 81"),
        ("design=other", "design must be 'paper' or 'controlled'"),
    ],
)
def test_bad_designs_are_refused_before_training(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(_values(override))


def test_a_trait_file_with_too_few_rows_is_refused(tmp_path):
    import json

    path = tmp_path / "tiny_trait.jsonl"
    rows = [{"question": f"Would you say {i}?", "statement": f"Statement {i}.", "answer_matching_behavior": " Yes",
             "answer_not_matching_behavior": " No"} for i in range(10)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ConfigError, match=r"n_train \+ n_test = 120 but .*tiny_trait.jsonl has only 10 rows"):
        validate(_values(f"data_file={path}"))


def test_the_report_of_a_controlled_plan(tmp_path):
    """controlled_report on run directories holding controlled.json: the pooled cells, the intervals (against
    dynamics.intervals on the same grids), EX − IM paired by seed, the Markdown table and the forest plot."""
    import json

    from dynamics.intervals import bootstrap_interval, paired_difference
    from experiments.studies.persona.controlled_report import controlled_report

    plan = load_plan("persona", "controlled", [])
    values = dict(plan.runs()[0].values)
    design = controlled_design(values, values["n_train"])
    rng = np.random.default_rng(0)
    grids = {}
    for spec in plan.runs():
        kind, seed = spec.values["reward"], spec.values["seed"]
        cells = {}
        for split, n in (("train", 40), ("test", 40)):
            for lst in design.words:
                for opening in ("seen", "new"):
                    level = 0.9 if kind == "ex" else 0.4
                    cells[f"same/{split}/{opening}/{lst.name}"] = np.clip(level + 0.1 * rng.standard_normal(n), 0, 1)
                cells[f"opening/{split}/{lst.name}"] = rng.uniform(0, 1, n)
        run_dir = tmp_path / spec.name
        run_dir.mkdir()
        (run_dir / "controlled.json").write_text(json.dumps({"cells": {k: v.tolist() for k, v in cells.items()}}))
        new = np.mean([v for k, v in cells.items() if k.startswith("same/test/") and not k.endswith("/seen")], axis=0)
        grids.setdefault(kind, {})[seed] = new
    paths = controlled_report(plan, tmp_path, n_boot=400)
    assert [p.name for p in paths] == ["controlled_report.json", "controlled_report.md", "controlled_forest.png",
                                       "controlled_forest.json"]  # fmt: skip
    table = json.loads((tmp_path / "controlled_report.json").read_text())
    (group,) = table["groups"].values()
    assert group["seeds"] == {"IM-RM": [0, 1, 2], "EX-RM": [0, 1, 2]}
    assert group["headline"][:3] == ["train/new words", "train/seen words", "train/opening effect"]
    row = group["cells"]["test/new words"]
    ex, im = np.stack([grids["ex"][s] for s in (0, 1, 2)]), np.stack([grids["im"][s] for s in (0, 1, 2)])
    assert row["EX-RM"] == pytest.approx(bootstrap_interval(ex, n_boot=400).to_dict())
    assert row["EX-RM − IM-RM"] == pytest.approx(paired_difference(ex, im, n_boot=400).to_dict())
    assert row["EX-RM − IM-RM"]["low"] > 0.4  # EX at 0.9 and IM at 0.4 by construction
    md = (tmp_path / "controlled_report.md").read_text()
    assert "| test/new words |" in md and "95% bootstrap interval" in md
    assert (tmp_path / "controlled_forest.png").stat().st_size > 10_000


def test_the_report_needs_every_run(tmp_path):
    from experiments.studies.persona.controlled_report import controlled_report

    with pytest.raises(ConfigError, match=r"reward=im,seed=0/controlled.json: no such file"):
        controlled_report(load_plan("persona", "controlled", []), tmp_path)


def test_augmentation_adds_k_words_per_side_to_training_and_to_the_seen_list(tokenizer):
    values = dict(load_plan("persona", "remedy", ["augment_k=2"]).runs()[0].values)
    texts = persona_texts(values)
    yes, no = ["yes", "sure", "indeed", "definitely"], ["no", "never", "hardly", "unlikely"]
    used_yes = {next(w for w in yes if r["chosen"].endswith(" " + w)) for r in texts.train}
    used_no = {next(w for w in no if r["rejected"].endswith(" " + w)) for r in texts.train}
    assert used_yes == set(yes) and used_no == set(no)  # 80 draws from 4 words: every word is used
    design = controlled_design(values, values["n_train"])
    assert design.words[0].yes == tuple(yes) and design.words[0].no == tuple(no)
    assert [lst.name for lst in design.words] == ["seen", "new1"]
    check_tokens(design, tokenizer)  # the held-out words stay new as tokens
    with pytest.raises(ConfigError, match=r"augment_k must be in 0…4 .* got 5"):
        validate(dict(load_plan("persona", "remedy", ["augment_k=5"]).runs()[0].values))
    with pytest.raises(ConfigError, match="augment_words: 'sure' is already a training word"):
        validate(dict(load_plan("persona", "remedy", ["augment_k=1", 'augment_words_yes=["sure"]']).runs()[0].values))

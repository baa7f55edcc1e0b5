"""dynamics.datasets (JSONL errors with file and line, Persona filtering and splits) and experiments.studies.bundled."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from conftest import require

import experiments
from dynamics.datasets import (
    PersonaRow,
    PreferenceRow,
    TorchCompatibleGenerator,
    load_persona,
    load_preferences,
    persona_split,
)
from dynamics.errors import ConfigError, DataError
from experiments.studies.bundled import bundled_data_names, bundled_data_path

GOOD = {"prompt": "p", "chosen": "c", "rejected": "r"}


def _write(tmp_path: pathlib.Path, lines: list[str], name: str = "prefs.jsonl") -> pathlib.Path:
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_load_preferences_reads_rows_with_ids_and_lines(tmp_path):
    path = _write(tmp_path, [json.dumps(GOOD | {"id": 7}), json.dumps(GOOD | {"id": 8, "extra": 1})])
    rows = load_preferences(path)
    assert rows == [
        PreferenceRow("p", "c", "r", 7, str(path), 1),
        PreferenceRow("p", "c", "r", 8, str(path), 2),
    ]
    no_ids = load_preferences(_write(tmp_path, [json.dumps(GOOD)] * 2, "noid.jsonl"))
    assert [r.id for r in no_ids] == [0, 1]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"prompt": "p", "chosen": ', r"line 3: not valid JSON"),
        ("[1, 2]", r"line 3: expected a JSON object, got list"),
        ('{"prompt": "p", "chosen": "c"}', r"line 3: missing field 'rejected'"),
        (
            '{"prompt": "p", "chosen": 5, "rejected": "r"}',
            r"line 3: field 'chosen' must be a string, got int",
        ),
        ('{"prompt": "  ", "chosen": "c", "rejected": "r"}', r"line 3: field 'prompt' is empty"),
        ('{"prompt": "p", "chosen": "", "rejected": "r"}', r"line 3: field 'chosen' is empty"),
        ("", r"line 3: blank line"),
        (
            '{"prompt": "p", "chosen": "c", "rejected": "r", "id": 0}',
            r"line 3: id 0 repeats the id of line 1",
        ),
        ('{"prompt": "p", "chosen": "c", "rejected": "r", "id": [1]}', r"line 3: field 'id' must be an int"),
    ],
)
def test_bad_lines_name_the_file_and_line(tmp_path, bad_line, message):
    path = _write(tmp_path, [json.dumps(GOOD | {"id": 0}), json.dumps(GOOD | {"id": 1}), bad_line])
    with pytest.raises(DataError, match=rf"{path}.* {message}"):
        load_preferences(path)


def test_empty_file_and_bad_encoding_are_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="no rows"):
        load_preferences(empty)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match="line 2: not valid UTF-8"):
        load_preferences(latin)
    with pytest.raises(DataError, match="cannot read"):
        load_preferences(tmp_path / "missing.jsonl")


def test_all_bundled_preference_files_load():
    names = [n for n in bundled_data_names() if n.startswith("preferences/") and n.endswith(".jsonl")]
    assert len(names) == 13
    for name in names:
        path = bundled_data_path(name)
        lines = path.read_text(encoding="utf-8").splitlines()
        rows = load_preferences(path)
        assert len(rows) == len(lines)
        assert [r.chosen for r in rows] == [json.loads(line)["chosen"] for line in lines]


def test_persona_filtering_counts():
    path = bundled_data_path("agreeableness")
    objects = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    yes = load_persona(path)
    assert len(yes) == sum(o["answer_matching_behavior"] == " Yes" for o in objects)
    assert len(load_persona(path, answer="No")) == len(objects) - len(yes)
    assert all(isinstance(r, PersonaRow) and r.answer_matching_behavior == " Yes" for r in yes)
    assert yes[0].prompt.startswith("Is the following statement something you would say?\n")
    assert yes[0].prompt == objects[yes[0].line - 1]["question"]


def test_persona_missing_field_and_no_match(tmp_path):
    row = {"question": "q", "statement": "s", "answer_matching_behavior": " No"}
    path = _write(tmp_path, [json.dumps(row)], "persona.jsonl")
    with pytest.raises(DataError, match="line 1: missing field 'answer_not_matching_behavior'"):
        load_persona(path)
    path = _write(tmp_path, [json.dumps(row | {"answer_not_matching_behavior": " Yes"})], "persona2.jsonl")
    with pytest.raises(DataError, match="no row has answer_matching_behavior 'Yes'"):
        load_persona(path)


def test_persona_split_sizes_and_determinism():
    rows = load_persona(bundled_data_path("agreeableness"))
    train, test = persona_split(rows)
    assert len(train) == 80 and len(test) == 40
    assert not {r.line for r in train} & {r.line for r in test}
    assert persona_split(rows) == (train, test)
    assert persona_split(rows, seed=1) != (train, test)
    perm = np.random.default_rng(875).permutation(len(rows))
    assert [r.line for r in train] == [rows[i].line for i in perm[:80]]
    with pytest.raises(ConfigError, match="only 500 rows"):
        persona_split(rows, n_train=480, n_test=40)
    with pytest.raises(ConfigError, match="rng"):
        persona_split(rows, rng="jax")


def test_torch_compatible_split_is_the_official_codes():
    torch = require("torch")
    rows = load_persona(bundled_data_path("agreeableness"))
    train, test = persona_split(rows, rng="torch")
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(875)).tolist()
    assert [r.line for r in train] == [rows[i].line for i in perm[:80]]
    assert [r.line for r in test] == [rows[i].line for i in perm[80:120]]
    # The same stream continues with the response draws of the official data module.
    gen, ours = torch.Generator().manual_seed(982), TorchCompatibleGenerator(982)
    for n in (1, 2, 7, 1000):
        assert ours.randperm(n).tolist() == torch.randperm(n, generator=gen).tolist()
        assert ours.randint(0, 2, 5).tolist() == torch.randint(0, 2, (5,), generator=gen).tolist()
        assert ours.randint(3, 10).tolist() == torch.randint(3, 10, (1,), generator=gen).tolist()


def test_bundled_data_paths():
    root = pathlib.Path(experiments.__file__).parent / "studies"
    assert bundled_data_path("persona/agreeableness.jsonl") == root / "persona" / "bundled" / "agreeableness.jsonl"
    assert bundled_data_path("agreeableness") == bundled_data_path("agreeableness.jsonl")
    assert bundled_data_path("ultrafeedback.test") == root / "ultrafeedback" / "bundled" / "ultrafeedback.test.jsonl"
    assert bundled_data_path("persona/LICENSE").is_file()
    names = bundled_data_names()
    assert {"persona/README.md", "preferences/README.md", "persona/openness.jsonl"} <= set(names)
    with pytest.raises(DataError, match="unknown bundled data file 'nope'.*persona/agreeableness.jsonl"):
        bundled_data_path("nope")
    with pytest.raises(DataError, match="ambiguous bundled data file 'README.md'"):
        bundled_data_path("README.md")


# ----------------------------------------------------------------------------------------------------------
# load_unseen_pairs
# ----------------------------------------------------------------------------------------------------------


def test_load_unseen_pairs_reads_pairs_and_expands_preference_rows(tmp_path):
    from dynamics.datasets import UnseenPair, load_unseen_pairs

    path = _write(
        tmp_path,
        [
            json.dumps({"prompt": "p1", "response": "a", "label": "para+"}),
            json.dumps({"prompt": "p2", "response": "b", "extra": 3}),
            json.dumps(GOOD),
        ],
        "unseen.jsonl",
    )
    assert load_unseen_pairs(path) == [
        UnseenPair("p1", "a", "para+", str(path), 1),
        UnseenPair("p2", "b", None, str(path), 2),
        UnseenPair("p", "c", "chosen", str(path), 3),
        UnseenPair("p", "r", "rejected", str(path), 3),
    ]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"prompt": "p", "response": ', r"line 2: not valid JSON"),
        ('{"prompt": "p", "response": ""}', r"line 2: field 'response' is empty"),
        ('{"prompt": "p", "response": "  \\n"}', r"line 2: field 'response' is empty"),
        ('{"response": "r"}', r"line 2: missing field 'prompt'"),
        ('{"prompt": "p", "chosen": "c"}', r"line 2: missing field 'rejected'"),
        ('{"prompt": "p", "rejected": ""}', r"line 2: missing field 'chosen'"),
        ('{"prompt": "p", "chosen": "c", "rejected": " "}', r"line 2: field 'rejected' is empty"),
        ('{"prompt": "p"}', r"line 2: expected a pair \{prompt, response\[, label\]\} or a preference row"),
        ('{"prompt": "p", "response": "r", "label": 3}', r"line 2: field 'label' must be a non-empty string"),
        ('"just a string"', r"line 2: expected a JSON object, got str"),
    ],
)
def test_load_unseen_pairs_names_file_and_line(tmp_path, bad_line, message):
    from dynamics.datasets import load_unseen_pairs

    path = _write(tmp_path, [json.dumps({"prompt": "p", "response": "r"}), bad_line], "unseen.jsonl")
    with pytest.raises(DataError, match=message) as info:
        load_unseen_pairs(path)
    assert str(path) in str(info.value)


def test_load_unseen_pairs_empty_file(tmp_path):
    from dynamics.datasets import load_unseen_pairs

    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(DataError, match="no rows"):
        load_unseen_pairs(path)

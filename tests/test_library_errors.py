"""Error messages for library users and CLI users: broken model files, bad parameter selections, `rmdyn --version`.

Model directories and GGUF files are built here with numpy, safetensors, `tokenizers` and `gguf.GGUFWriter` (no
torch: the file stays fast), then broken the way a user's files break: a garbage or cut safetensors file, a
config.json without a key or with a value of the wrong type, a GGUF file cut short. Library messages describe the
value ("parameter selection 'last:x'", "row 0"); the CLI names the flag the user gave ("--params: ...", "--pair #1").
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dynamics.errors import ConfigError, DataError, ModelError, SequenceTooLongError
from experiments import cli

ROOT = Path(__file__).resolve().parents[1]

# A tiny Llama-family model: 2 blocks, d = 16, 4 heads of 4 (2 KV heads), a context of 64 tokens.
D, F, L, N, K, H, CONTEXT = 16, 24, 2, 4, 2, 4, 64
WORDS = ["Hi", "yes", "no", "word", "Is", "it", "?", "user", "assistant", "system"]
SPECIALS = ["<unk>", "<|im_start|>", "<|im_end|>"]
V = len(SPECIALS) + len(WORDS)
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# the keys transformers' LlamaConfig(...).save_pretrained writes (transformers 5), for this size
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "bos_token_id": None,
    "eos_token_id": 2,
    "head_dim": H,
    "hidden_act": "silu",
    "hidden_size": D,
    "intermediate_size": F,
    "max_position_embeddings": CONTEXT,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": N,
    "num_hidden_layers": L,
    "num_key_value_heads": K,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
    "tie_word_embeddings": True,
    "vocab_size": V,
}


def _state_dict(rng: np.random.Generator) -> dict[str, np.ndarray]:
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    for i in range(L):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (D,),
            p + "post_attention_layernorm.weight": (D,),
            p + "self_attn.q_proj.weight": (N * H, D),
            p + "self_attn.k_proj.weight": (K * H, D),
            p + "self_attn.v_proj.weight": (K * H, D),
            p + "self_attn.o_proj.weight": (D, N * H),
            p + "mlp.gate_proj.weight": (F, D),
            p + "mlp.up_proj.weight": (F, D),
            p + "mlp.down_proj.weight": (D, F),
        }
    return {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}


def _write_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(SPECIALS)
    backend.save(str(directory / "tokenizer.json"))
    config = {"chat_template": TEMPLATE, "eos_token": "<|im_end|>", "unk_token": "<unk>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory) -> Path:
    """A complete, loadable HF directory (config.json, model.safetensors, tokenizer.json + config)."""
    from safetensors.numpy import save_file

    d = tmp_path_factory.mktemp("tiny_hf")
    (d / "config.json").write_text(json.dumps(CONFIG, indent=2), encoding="utf-8")
    save_file(_state_dict(np.random.default_rng(0)), str(d / "model.safetensors"))
    _write_tokenizer(d)
    return d


@pytest.fixture
def model_dir(good_dir, tmp_path) -> Path:
    """A private copy of `good_dir` for a test to break."""
    import shutil

    d = tmp_path / "model"
    shutil.copytree(good_dir, d)
    return d


LONG = "word " * 80  # 80 tokens: longer than the tiny model's context of 64
SHORT_TRIPLE = ["--prompt", "Hi", "--chosen", "yes", "--rejected", "no"]


def _run(argv: list[str], capsys) -> tuple[int, str]:
    code = cli.main(argv)
    return code, capsys.readouterr().err


def test_the_tiny_directory_loads(good_dir):
    from dynamics.loading import load

    loaded = load(str(good_dir))
    assert loaded.lm.config.n_layers == L and loaded.lm.config.max_position == CONTEXT
    assert loaded.tokenizer.vocab_size == V


# ----------------------------------------------------------------------------------------------------------
# 3. Broken model directories and files
# ----------------------------------------------------------------------------------------------------------


def test_config_missing_required_key_names_file_key_and_architecture(model_dir, tmp_path, capsys):
    from dynamics.loading import load
    from dynamics.models import load_hf_directory

    config = {k: v for k, v in CONFIG.items() if k != "hidden_size"}
    (model_dir / "config.json").write_text(json.dumps(config), encoding="utf-8")
    expected = f"{model_dir / 'config.json'}: missing required key 'hidden_size' (architecture llama)"
    for loader in (load_hf_directory, load):
        with pytest.raises(ModelError) as info:
            loader(str(model_dir))
        assert str(info.value) == expected
    code, err = _run(["delta", "--model", str(model_dir), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and err == f"rmdyn delta: error: {expected}\n"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("hidden_size", "16", "key 'hidden_size' must be a positive integer, got '16' (str)"),
        ("num_hidden_layers", 2.5, "key 'num_hidden_layers' must be a positive integer, got 2.5 (float)"),
        ("vocab_size", 0, "key 'vocab_size' must be a positive integer, got 0 (int)"),
        ("tie_word_embeddings", "no", "key 'tie_word_embeddings' must be true or false, got 'no' (str)"),
        ("rms_norm_eps", [1e-6], "key 'rms_norm_eps' must be a number, got [1e-06] (list)"),
        ("rope_parameters", "default", "key 'rope_parameters' must be a JSON object, got 'default' (str)"),
        ("num_key_value_heads", 3, "n_heads=4 is not a multiple of n_kv_heads=3"),
    ],
)
def test_config_value_of_the_wrong_type(model_dir, key, value, message):
    from dynamics.models import load_hf_directory

    (model_dir / "config.json").write_text(json.dumps({**CONFIG, key: value}), encoding="utf-8")
    with pytest.raises(ModelError) as info:
        load_hf_directory(str(model_dir))
    assert str(info.value) == f"{model_dir / 'config.json'}: {message} (architecture llama)"


def test_config_that_is_not_json_or_not_an_object(model_dir):
    from dynamics.models import load_hf_directory

    path = model_dir / "config.json"
    path.write_text('{"model_type": "llama",\n  "hidden_size": 16,,}', encoding="utf-8")
    with pytest.raises(ModelError, match=rf"^{re.escape(str(path))}: line 2: not valid JSON \(Expecting"):
        load_hf_directory(str(model_dir))
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ModelError, match=rf"^{re.escape(str(path))}: not valid JSON \(not UTF-8 text"):
        load_hf_directory(str(model_dir))
    path.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ModelError, match=rf"^{re.escape(str(path))}: expected a JSON object .*got a JSON list"):
        load_hf_directory(str(model_dir))


def test_config_that_does_not_fit_the_tensors(model_dir):
    from dynamics.models import load_hf_directory

    (model_dir / "config.json").write_text(json.dumps({**CONFIG, "intermediate_size": 32}), encoding="utf-8")
    with pytest.raises(ModelError, match=rf"^{re.escape(str(model_dir))}: the tensors of layer 0 do not have the"):
        load_hf_directory(str(model_dir))


def test_garbage_safetensors_file(model_dir, tmp_path, capsys):
    from dynamics.loading import load

    weights = model_dir / "model.safetensors"
    weights.write_bytes(b"garbage!" * 1000)
    expected = f"{weights}: not a valid safetensors file (header too large; 8,000 bytes)"
    with pytest.raises(ModelError) as info:
        load(str(model_dir))
    assert str(info.value) == expected
    code, err = _run(["rho", "--model", str(model_dir), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and err == f"rmdyn rho: error: {expected}\n"


def test_truncated_safetensors_file(model_dir):
    from dynamics.models import load_hf_directory

    weights = model_dir / "model.safetensors"
    data = weights.read_bytes()  # a few kB
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match=rf"^{re.escape(str(weights))}: not a valid safetensors file \(.+\)$"):
        load_hf_directory(str(model_dir))
    weights.write_bytes(b"")
    with pytest.raises(ModelError, match=r"model\.safetensors: not a valid safetensors file \(header too small"):
        load_hf_directory(str(model_dir))


def _write_tiny_gguf(path: Path) -> Path:
    """A tiny llama GGUF (float32 tensors, no tokenizer) written with gguf's own writer."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(L)
    writer.add_embedding_length(D)
    writer.add_feed_forward_length(F)
    writer.add_head_count(N)
    writer.add_head_count_kv(K)
    writer.add_context_length(CONTEXT)
    writer.add_layer_norm_rms_eps(1e-6)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    for hf_name, array in _state_dict(np.random.default_rng(1)).items():
        if hf_name in names:
            name = names[hf_name]
        else:
            from dynamics.models.gguf_loader import _LAYER_NAMES

            _, _, i, rest = hf_name.split(".", 3)
            name = f"blk.{i}." + next(g for g, h in _LAYER_NAMES.items() if h == rest)
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _copy_prefix(src: str | Path, dst: Path, n_bytes: int, chunk: int = 1 << 20) -> Path:
    """The first `n_bytes` of `src` in `dst`, copied in chunks."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        left = n_bytes
        while left > 0:
            block = fin.read(min(chunk, left))
            if not block:
                break
            fout.write(block)
            left -= len(block)
    return dst


def test_truncated_gguf_gives_expected_and_actual_bytes(tmp_path, capsys):
    import gguf

    from dynamics.models import load_gguf
    from dynamics.tokenizer import load_tokenizer

    full = _write_tiny_gguf(tmp_path / "tiny.gguf")
    config, _ = load_gguf(str(full))
    assert config.n_layers == L
    reader = gguf.GGUFReader(str(full))
    needed = max(t.data_offset + t.n_bytes for t in reader.tensors)  # the end of the last tensor's bytes
    last = max(reader.tensors, key=lambda t: t.data_offset).name
    size = needed - 100
    cut = _copy_prefix(full, tmp_path / "cut.gguf", size)
    expected = (
        f"{cut}: the GGUF file is truncated: its tensors need {needed:,} bytes (up to the end of {last!r}) but the "
        f"file has {size:,} bytes (100 missing)"
    )
    with pytest.raises(ModelError) as info:
        load_gguf(str(cut))
    assert str(info.value) == expected and "reshape" not in expected
    with pytest.raises(ModelError) as info:  # the tokenizer loader reads the same file
        load_tokenizer(str(cut))
    assert str(info.value) == expected
    code, err = _run(["delta", "--model", str(cut), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and err == f"rmdyn delta: error: {expected}\n"


def test_default_gguf_cut_inside_its_header(tmp_path):
    from dynamics.models import default_model_path
    from dynamics.models.gguf_loader import open_gguf

    cut = _copy_prefix(default_model_path(), tmp_path / "smollm2-head.gguf", 4096)
    with pytest.raises(ModelError) as info:
        open_gguf(str(cut))
    message = str(info.value)
    assert message.startswith(f"{cut}: the GGUF file is truncated or corrupt: it has 4,096 bytes but its header")
    assert "When changing to a larger dtype" not in message and "reshape" not in message


@pytest.mark.slow  # parsing the default model's metadata (its 49,152-token vocabulary) takes 5-15 s on 2 cores
def test_default_gguf_cut_inside_its_tensors(tmp_path):
    from dynamics.models import default_model_path
    from dynamics.models.gguf_loader import open_gguf

    path = default_model_path()
    cut = _copy_prefix(path, tmp_path / "smollm2-5mb.gguf", 5_000_000)
    with pytest.raises(ModelError) as info:
        open_gguf(str(cut))
    needed = os.path.getsize(path)  # the last tensor ends where the file ends
    assert f"the GGUF file is truncated: its tensors need {needed:,} bytes" in str(info.value)
    assert f"but the file has 5,000,000 bytes ({needed - 5_000_000:,} missing)" in str(info.value)


# ----------------------------------------------------------------------------------------------------------
# 5. Parameter selections and sequence lengths: the library describes the value, the CLI names the flag
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_rms():
    """(EX-RM, params), (IM-RM, params) of an untied tiny model, the parameters mapped from numpy (no JAX init)."""
    from dynamics.models import LM, DecoderConfig, params_from_state_dict
    from dynamics.rewards import ExplicitRM, ImplicitRM

    config = DecoderConfig(family="llama", vocab_size=V, d_model=D, n_layers=L, n_heads=N, n_kv_heads=K,
                           head_dim=H, d_ff=F, tie_embeddings=False)  # fmt: skip
    tensors = _state_dict(np.random.default_rng(2))
    tensors["lm_head.weight"] = np.zeros((V, D), np.float32)
    params = params_from_state_dict(config, tensors)
    lm = LM(config)
    ex, im = ExplicitRM(lm), ImplicitRM(lm, beta=0.1)
    return (ex, ex.init(params, 0)), (im, im.init(params))


@pytest.mark.parametrize(
    ("kind", "spec", "message"),
    [
        ("ex", "re:(", "parameter selection 're:(': pattern '(' is not a valid regular expression (missing ),"),
        ("ex", "re:layers_[", "pattern 'layers_[' is not a valid regular expression (unterminated character set"),
        ("ex", "last:x", "parameter selection 'last:x': K in last:K must be a positive integer, got 'x'"),
        ("ex", "last:0", "parameter selection 'last:0': K in last:K must be a positive integer, got '0'"),
        ("ex", "last:9", "parameter selection 'last:9': K must be between 1 and the model's 2 blocks, got 9"),
        ("ex", "everything", "unknown parameter selection 'everything'; expected head | unembed |"),
        ("ex", "unembed", "parameter selection 'unembed': an EX-RM does not read the unembedding"),
        ("im", "head", "parameter selection 'head': an IM-RM has no head"),
        ("im", "re:no_such_leaf", "parameter selection 're:no_such_leaf' selects no parameter of this IM-RM"),
        ("ex", "re:lm_head", "parameter selection 're:lm_head' selects only the unembedding"),
    ],
)
def test_trainable_mask_errors_describe_the_value(tiny_rms, kind, spec, message):
    from dynamics.masks import trainable_mask

    rm, params = tiny_rms[0] if kind == "ex" else tiny_rms[1]
    with pytest.raises(ConfigError) as info:
        trainable_mask(rm, params, spec)
    assert message in str(info.value)
    assert "--" not in str(info.value)  # no command-line flag in a library message


def test_normalize_spec_bad_pattern_is_a_config_error(tiny_rms):
    from dynamics.masks import check_spec, normalize_spec

    rm, _ = tiny_rms[1]
    with pytest.raises(ConfigError, match=r"^parameter selection 're:a\(b': pattern 'a\(b' is not a valid regular"):
        normalize_spec(rm, "re:a(b")
    with pytest.raises(ConfigError, match="must be a string"):
        check_spec(None)
    assert normalize_spec(rm, " output ") == "unembed" and check_spec("re:layers_1/") == "re:layers_1/"


def _raised_strings(tree: ast.AST) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            for sub in ast.walk(node.exc):
                if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                    out.append((sub.lineno, sub.value))
    return out


def _cli_flags() -> set[str]:
    """Every option string of every `rmdyn` sub-command (--params, --pair, --row, --set, ...)."""
    import argparse

    flags = set()
    for action in cli.build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags |= {o for a in sub._actions for o in a.option_strings if o.startswith("--")}
    return flags - {"--help"}


def test_library_error_messages_name_no_cli_flag():
    flags = _cli_flags()
    assert {"--params", "--pair", "--row", "--set", "--model", "--lr"} <= flags
    pattern = re.compile("|".join(rf"{re.escape(f)}(?![\w-])" for f in sorted(flags)))
    offenders = []
    for package in ("dynamics", "theory"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for line, text in _raised_strings(ast.parse(path.read_text(encoding="utf-8"))):
                if pattern.search(text):
                    offenders.append(f"{path.relative_to(ROOT)}:{line}: {text!r}")
    assert not offenders, "library error messages that name a CLI flag:\n" + "\n".join(offenders)


def test_cli_names_the_params_flag(good_dir, tmp_path, capsys):
    out = ["--out", str(tmp_path / "out")]
    code, err = _run(["delta", "--params", "re:(", *out], capsys)  # checked before the model loads
    assert code == 2
    assert err.startswith("rmdyn delta: error: --params: parameter selection 're:(': pattern '(' is not a valid")
    model = ["--model", str(good_dir), *SHORT_TRIPLE, "--pair", "Is it ?", "no"]
    code, err = _run(["delta", *model, "--params", "last:5", "--reward", "ex", *out], capsys)
    assert code == 2
    assert err == (
        "rmdyn delta: error: --params: parameter selection 'last:5': K must be between 1 and the model's 2 blocks, "
        "got 5\n"
    )
    code, err = _run(["check-step", *model, "--params", "re:^head/", "--reward", "im", *out], capsys)
    assert code == 2 and err.startswith("rmdyn check-step: error: --params: parameter selection 're:^head/' selects")
    assert not (tmp_path / "out").exists()


def test_encode_pairs_too_long_is_described_in_library_terms(good_dir):
    from dynamics.loading import load
    from dynamics.text import encode_pairs

    tok = load(str(good_dir)).tokenizer
    with pytest.raises(SequenceTooLongError) as info:
        encode_pairs(tok, ["Hi", "Hi"], ["yes", "word " * 80], max_length=CONTEXT)
    err = info.value
    assert isinstance(err, DataError) and err.index == 1 and err.max_length == CONTEXT
    assert str(err).startswith(f"row 1: {err.lengths} = {err.total} tokens > max_length={CONTEXT}; pass truncate=True")


@pytest.mark.parametrize(
    ("command", "inputs", "name", "lengths"),
    [
        ("delta", ["--pair", "Hi", LONG], "--pair #1", "6 prompt tokens + 81 response tokens = 87"),
        ("delta", ["--pair", "Hi", "yes", "--pair", "Is it ?", LONG], "--pair #2",
         "8 prompt tokens + 81 response tokens = 89"),
        ("rho", ["--pair", "Hi", LONG], "--pair #1", "6 prompt tokens + 81 response tokens = 87"),
        ("check-step", ["--prompt", LONG, "--chosen", "yes", "--rejected", "no"],
         "the training triple (--prompt/--chosen/--rejected)", "85 prompt tokens + 2 chosen tokens = 87"),
    ],
)  # fmt: skip
def test_cli_names_the_pair_as_given_and_says_it_is_too_long(
    good_dir, tmp_path, capsys, command, inputs, name, lengths
):
    triple = [] if "--prompt" in inputs else SHORT_TRIPLE
    pair = [] if "--pair" in inputs else ["--pair", "Hi", "yes"]
    argv = [command, "--model", str(good_dir), *triple, *inputs, *pair, "--out", str(tmp_path / "out")]
    code, err = _run(argv, capsys)
    assert code == 2, err
    assert err == (
        f"rmdyn {command}: error: {name} is too long for the model's context: {lengths} tokens > {CONTEXT} (the "
        "model's max_position); shorten the prompt or the response (these commands do not truncate)\n"
    )
    assert "truncate=True" not in err and "row 0" not in err and "row 1" not in err


def test_cli_names_a_too_long_row_of_a_train_file(good_dir, tmp_path, capsys):
    train = tmp_path / "train.jsonl"
    rows = [{"prompt": "Hi", "chosen": "yes", "rejected": "no"}, {"prompt": LONG, "chosen": "yes", "rejected": "no"}]
    train.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    argv = ["delta", "--model", str(good_dir), "--train", str(train), "--row", "0", "--row", "1", "--pair", "Hi",
            "yes", "--out", str(tmp_path / "out")]  # fmt: skip
    code, err = _run(argv, capsys)
    assert code == 2 and err.startswith(f"rmdyn delta: error: --train {train} line 2 is too long for the model's")


def test_experiment_says_how_to_truncate_in_its_own_terms(good_dir, tmp_path, capsys):
    argv = ["experiment", "persona", "--preset", "cpu", "--set", f"model={good_dir}", "--set", "max_length=16",
            "--out", str(tmp_path / "runs")]  # fmt: skip
    code, err = _run(argv, capsys)
    assert code == 2
    assert re.fullmatch(
        r"rmdyn experiment: error: reward=\w+: row 0: \d+ prompt tokens \+ \d+ \w+ tokens = \d+ tokens > "
        r"max_length=16; add --set truncate=true to cut prompts from the left",
        err.splitlines()[-1],  # after the "loading model" lines
    ), err


# ----------------------------------------------------------------------------------------------------------
# 6. rmdyn --version
# ----------------------------------------------------------------------------------------------------------


def test_version(capsys):
    from importlib.metadata import version

    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"rmdyn {version('rmdyn')}\n" == "rmdyn 0.1.0\n"


def test_version_does_not_import_jax():
    code = (
        "import sys; from experiments import cli; status = cli.main(['--version']); "
        "print(status, sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax', 'dynamics')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.splitlines() == ["rmdyn 0.1.0", "0 []"]


def test_python_dash_m_runs_the_cli():
    """`python -m experiments.cli` is the installed `rmdyn` script (exit codes included)."""

    def run(*argv):
        cmd = [sys.executable, "-m", "experiments.cli", *argv]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)

    ok, bad = run("--version"), run("nope")
    assert (ok.returncode, ok.stdout) == (0, "rmdyn 0.1.0\n")
    assert bad.returncode == 2 and "nope" in bad.stderr

"""Building a `Tokenizer` from its source: a GGUF file's metadata (byte-level BPE with the model family's
pre-tokenizer) or a Hugging Face directory (tokenizer.json + tokenizer_config.json)."""

from __future__ import annotations

import functools
import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend

from dynamics.errors import ModelError
from dynamics.tokenizer.core import Tokenizer

__all__ = ["BYTE_ALPHABET", "load_tokenizer"]

_CONTROL, _USER_DEFINED = 3, 4

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# `tokenizer.ggml.pre` -> pre-tokenizer family. Names follow llama.cpp's convert_hf_to_gguf.py.
_PRE_FAMILIES = {
    "smollm": "smollm",
    "gpt-2": "gpt2",
    "default": "gpt2",
    "olmo": "gpt2",
    "phi-2": "gpt2",
    "llama3": "llama3",
    "llama-v3": "llama3",
    "llama-bpe": "llama3",
    "falcon3": "llama3",
    "smaug-bpe": "llama3",
    "dbrx": "llama3",
    "qwen2": "qwen2",
    "deepseek-r1-qwen": "qwen2",
    "megrez": "qwen2",
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


BYTE_ALPHABET = _bytes_to_unicode()


def load_tokenizer(source: str | os.PathLike | Any) -> Tokenizer:
    """Load the tokenizer of a GGUF file or of a local Hugging Face model directory.

    Args:
      source: a `.gguf` path, an open `gguf.GGUFReader` (to share one with the weight loader), or a directory
        with `tokenizer.json` (and usually `tokenizer_config.json`; the chat template may also be in
        `chat_template.jinja` or `chat_template.json`).

    Returns:
      The `Tokenizer`.

    Raises:
      ModelError: the path is missing, is neither, or describes an unsupported tokenizer.
    """
    if hasattr(source, "fields") and hasattr(source, "tensors"):  # an open GGUFReader
        name = str(getattr(getattr(source, "data", None), "filename", None) or "<GGUFReader>")
        return _load_gguf(_gguf_metadata(source), name)
    path = pathlib.Path(source)
    if path.is_dir():
        return _load_hf_dir(path)
    if path.is_file():
        with open(path, "rb") as fh:
            magic = fh.read(4)
        if magic != b"GGUF":
            raise ModelError(f"{path}: not a GGUF file (no GGUF magic) and not a model directory")
        stat = path.stat()
        return _load_gguf(_cached_gguf_metadata(str(path.resolve()), stat.st_mtime_ns, stat.st_size), str(path))
    raise ModelError(f"{path}: no such file or directory (expected a .gguf file or a Hugging Face model directory)")


def _gguf_metadata(reader: Any) -> dict[str, Any]:
    """The `tokenizer.*` metadata of an open GGUFReader as plain Python values (arrays as tuples)."""
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            value = field.contents()
            meta[key] = tuple(value) if isinstance(value, list) else value
    return meta


@functools.lru_cache(maxsize=8)
def _cached_gguf_metadata(path: str, mtime_ns: int, size: int) -> dict[str, Any]:
    """`_gguf_metadata` of a file, parsed once per (path, mtime, size): parsing takes seconds."""
    import gguf  # only needed here; gguf imports nothing heavy

    try:
        reader = gguf.GGUFReader(path)
    except Exception as err:  # a truncated or corrupt file: numpy/struct errors from inside gguf
        from dynamics.models.gguf_loader import open_gguf  # imports JAX: only on this error path

        open_gguf(path)  # raises the precise ModelError (e.g. truncated: the expected and the actual size)
        raise ModelError(f"{path}: not a readable GGUF file ({err})") from err
    return _gguf_metadata(reader)


def _load_gguf(meta: Mapping[str, Any], source: str) -> Tokenizer:
    """Build the byte-level BPE tokenizer a GGUF describes (`tokenizer.ggml.model == "gpt2"`)."""
    model = meta.get("tokenizer.ggml.model")
    if model is None:
        raise ModelError(f"{source}: the GGUF has no tokenizer metadata (tokenizer.ggml.model)")
    if model != "gpt2":
        kind = {"llama": "sentencepiece", "gemma4": "sentencepiece (Gemma)", "t5": "unigram"}.get(model, model)
        raise ModelError(
            f"{source}: GGUF tokenizer type {model!r} ({kind}) is not supported; only byte-level BPE "
            "(tokenizer.ggml.model = 'gpt2': SmolLM2, Llama-3, Qwen2) is. Load the tokenizer from the "
            "model's Hugging Face directory (tokenizer.json) instead"
        )
    pre = meta.get("tokenizer.ggml.pre", "default")
    family = _PRE_FAMILIES.get(pre)
    if family is None:
        raise ModelError(
            f"{source}: GGUF pre-tokenizer {pre!r} is not supported (supported: {sorted(_PRE_FAMILIES)}); "
            "load the tokenizer from the model's Hugging Face directory (tokenizer.json) instead"
        )
    if "tokenizer.ggml.tokens" not in meta:
        raise ModelError(f"{source}: the GGUF has no vocabulary (tokenizer.ggml.tokens)")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    token_types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = meta.get("tokenizer.ggml.merges")
    if merges is None:
        raise ModelError(f"{source}: the GGUF's BPE tokenizer has no merges (tokenizer.ggml.merges)")

    alphabet = set(BYTE_ALPHABET.values())
    vocab = {}
    for i, tok in enumerate(tokens):
        # Tokens stored as raw text (outside the byte alphabet) are respelled byte-wise, as transformers does.
        spelled = tok if set(tok) <= alphabet else "".join(BYTE_ALPHABET[b] for b in tok.encode("utf-8"))
        vocab.setdefault(spelled, i)
    pairs = []
    for m in merges:
        parts = m.split(" ")
        if len(parts) != 2:
            raise ModelError(f"{source}: malformed BPE merge {m!r} (expected two tokens separated by a space)")
        pairs.append((parts[0], parts[1]))

    bpe = models.BPE(
        vocab=vocab,
        merges=pairs,
        dropout=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
        ignore_merges=family == "llama3",  # as Llama-3's tokenizer.json (and llama.cpp) do
    )
    backend = _Backend(bpe)
    backend.pre_tokenizer = _gguf_pre_tokenizer(family)
    if family == "qwen2":
        backend.normalizer = normalizers.NFC()  # Qwen2's tokenizer.json normalizes to NFC
    backend.decoder = decoders.ByteLevel()

    # CONTROL tokens become special added tokens, USER_DEFINED ones plain added tokens; only those spelled in
    # the byte alphabet (anything else is a llama.cpp mislabel and would get a new id past the model's rows).
    control = [t for t, k in zip(tokens, token_types, strict=True) if k == _CONTROL and set(t) <= alphabet]
    user = [t for t, k in zip(tokens, token_types, strict=True) if k == _USER_DEFINED and set(t) <= alphabet]
    if control:
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    if user:
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])

    def token(key: str) -> str | None:
        idx = meta.get(f"tokenizer.ggml.{key}")
        if idx is None:
            return None
        if not 0 <= int(idx) < len(tokens):
            raise ModelError(f"{source}: tokenizer.ggml.{key} = {idx} is outside the vocabulary of {len(tokens)}")
        return tokens[int(idx)]

    bos = token("bos_token_id")
    eos = token("eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    backend.post_processor = _post_processor(backend, bos if add_bos else None, eos if add_eos else None)
    return Tokenizer(
        backend,
        source=source,
        chat_template=meta.get("tokenizer.chat_template"),
        bos_token=bos,
        eos_token=eos,
        pad_token=token("padding_token_id"),
        unk_token=token("unknown_token_id"),
        add_bos_token=add_bos,
    )


def _gguf_pre_tokenizer(family: str) -> Any:
    """The pre-tokenizer of the model's original tokenizer.json, by `tokenizer.ggml.pre` family."""
    if family == "smollm":
        # SmolLM2's tokenizer.json: every digit its own pre-token, then GPT-2's regex and byte mapping.
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ]
        )
    if family == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    split = {"llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}[family]
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )


def _post_processor(backend: _Backend, bos: str | None, eos: str | None) -> Any:
    """ByteLevel offsets (untrimmed), plus BOS/EOS when the source asks for them."""
    byte_level = processors.ByteLevel(trim_offsets=False)
    if bos is None and eos is None:
        return byte_level
    special = [(t, backend.token_to_id(t)) for t in dict.fromkeys(x for x in (bos, eos) if x is not None)]
    single = [x for x in (bos, "$A", eos) if x is not None]
    pair = single + [x for x in (bos, "$B:1", eos) if x is not None]
    template = processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair), special_tokens=special)
    return processors.Sequence([byte_level, template])


def _token_content(value: Any) -> str | None:
    """A special token given as a string or as an AddedToken dict ({"content": ...})."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise ModelError(f"cannot read a special token from {value!r}")


def _read_json(path: pathlib.Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: cannot read JSON: {e}") from e


def _select_template(value: Any, where: pathlib.Path) -> str | None:
    """A chat template given as a string or as a list of named templates (the one named "default")."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        if "default" in named:
            return named["default"]
        raise ModelError(f"{where}: several chat templates {sorted(map(str, named))} and none named 'default'")
    raise ModelError(f"{where}: chat_template must be a string or a list of named templates")


def _load_hf_dir(path: pathlib.Path) -> Tokenizer:
    """A Hugging Face model directory: tokenizer.json + tokenizer_config.json (+ chat_template.*)."""
    tok_json = path / "tokenizer.json"
    if not tok_json.is_file():
        raise ModelError(
            f"{path}: no tokenizer.json; rmdyn reads fast-tokenizer files only (a slow tokenizer's "
            "vocab.json / tokenizer.model can be converted once with transformers: "
            "AutoTokenizer.from_pretrained(dir).save_pretrained(dir))"
        )
    try:
        backend = _Backend.from_file(str(tok_json))
    except Exception as e:  # the Rust library raises plain Exception
        raise ModelError(f"{tok_json}: cannot load: {e}") from e
    config = _read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
    special_map = _read_json(path / "special_tokens_map.json") if (path / "special_tokens_map.json").is_file() else {}

    # transformers' precedence: chat_template.jinja, then chat_template.json, then tokenizer_config.json.
    if (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    elif (path / "chat_template.json").is_file():
        template = _select_template(
            _read_json(path / "chat_template.json").get("chat_template"), path / "chat_template.json"
        )
    else:
        template = _select_template(config.get("chat_template"), path / "tokenizer_config.json")

    def special(name: str) -> str | None:
        value = config.get(name, special_map.get(name))
        return _token_content(value)

    return Tokenizer(
        backend,
        source=str(path),
        chat_template=template,
        bos_token=special("bos_token"),
        eos_token=special("eos_token"),
        pad_token=special("pad_token"),
        unk_token=special("unk_token"),
        add_bos_token=bool(config.get("add_bos_token", False)),
    )


# ----------------------------------------------------------------------------------------------------------
# Default template and vocabulary check
# ----------------------------------------------------------------------------------------------------------

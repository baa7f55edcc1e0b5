"""Tokenizers for rmdyn, built on the `tokenizers` library and jinja2 only (never transformers or torch).

A `Tokenizer` comes from a GGUF file (byte-level BPE: SmolLM2, Llama-3, Qwen2) or from a local Hugging Face
model directory (`tokenizer.json` + `tokenizer_config.json`). It encodes and decodes text and renders the
model's chat template the way transformers' `apply_chat_template` does (sandboxed jinja2, `trim_blocks`,
`lstrip_blocks`).

Conventions (docs/math.md §1 and §6):

- `encode` adds no BOS unless the source says `add_bos_token`; `dynamics.text` always encodes templated text
  with `add_special_tokens=False`, as the official code does, so the chat template alone decides the special
  tokens.
- Models without a chat template (Pythia, Llama-3.2-1B base) get `DEFAULT_CHAT_TEMPLATE`,
  `<|user|>{prompt}<eos><|assistant|>{response}<eos>`, through the explicit `ensure_chat_template`, which adds
  `<|user|>` and `<|assistant|>` as special tokens: the model's embeddings must then grow by
  `tokenizer.num_added_for_template` rows.

GGUF pre-tokenizers follow `tokenizer.ggml.pre` and reproduce each model's original `tokenizer.json`:
"smollm" is `Digits(individual_digits=True)` + GPT-2 `ByteLevel` (every digit its own pre-token, as
llama.cpp's SmolLM split does). transformers' own GGUF converter (4.5x/5.x) drops the digit split for
"smollm"; the two then differ on whitespace before a digit (e.g. "\\n   4"), never elsewhere.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend

from dynamics.errors import ModelError

__all__ = [
    "DEFAULT_ASSISTANT_TOKEN",
    "DEFAULT_CHAT_TEMPLATE",
    "DEFAULT_EOS_TOKEN",
    "DEFAULT_USER_TOKEN",
    "Tokenizer",
    "check_vocab_matches",
    "ensure_chat_template",
    "load_tokenizer",
]

DEFAULT_USER_TOKEN = "<|user|>"
DEFAULT_ASSISTANT_TOKEN = "<|assistant|>"
DEFAULT_EOS_TOKEN = "<|endoftext|>"

# The official code's template (utils/strings.py of princeton-pli/exrm-vs-imrm), verbatim: docs/math.md §6.
# Its quirk is kept: a system message is rendered with the assistant token (no experiment has one).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|user|>' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ '<|assistant|>' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>'  + message['content'] + eos_token }}"
    "{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    "{% endfor %}"
)

# GGUF token types (llama.cpp's llama_token_type).
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


_BYTE_ALPHABET = _bytes_to_unicode()


# ----------------------------------------------------------------------------------------------------------
# Chat templates
# ----------------------------------------------------------------------------------------------------------


class _GenerationTag(jinja2.ext.Extension):
    """Accepts `{% generation %}...{% endgeneration %}` (some templates use it); renders the body as is."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False):
    # transformers overrides jinja's tojson (which escapes HTML characters); templates rely on the override.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=32)
def _compile_template(template: str) -> jinja2.Template:
    """A chat template compiled as transformers compiles it (sandboxed, trim_blocks, lstrip_blocks)."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ModelError(f"the chat template does not compile: {e} (template line {e.lineno})") from e


# ----------------------------------------------------------------------------------------------------------
# The tokenizer
# ----------------------------------------------------------------------------------------------------------


class Tokenizer:
    """Text <-> token ids, special tokens and the chat template of one model.

    Build one with `load_tokenizer`. `add_special_tokens` is the only method that changes it.

    Attributes:
      source: the path it was loaded from.
      chat_template: the jinja2 chat template, or None when the model has none (see `ensure_chat_template`).
      num_added_for_template: tokens that `ensure_chat_template` added: the model's embeddings need that
        many more rows (0 for a model with its own template).
      add_bos_token: whether `encode` adds BOS by default (the source's setting).
      template_vars: extra variables for every chat-template rendering, e.g. {"date_string": "26 Jul 2024"}:
        Llama-3.x templates otherwise write today's date (`strftime_now`) into the system prompt. They are
        part of the fingerprint.
    """

    def __init__(
        self,
        backend: _Backend,
        *,
        source: str,
        chat_template: str | None,
        bos_token: str | None,
        eos_token: str | None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        add_bos_token: bool = False,
        num_added_for_template: int = 0,
        template_vars: Mapping[str, Any] | None = None,
    ) -> None:
        self._backend = backend
        self.source = source
        self.chat_template = chat_template
        self.add_bos_token = bool(add_bos_token)
        self.num_added_for_template = num_added_for_template
        self.template_vars = dict(template_vars or {})
        self._special = {
            "bos_token": bos_token,
            "eos_token": eos_token,
            "pad_token": pad_token,
            "unk_token": unk_token,
        }
        for name, token in self._special.items():
            if token is not None and backend.token_to_id(token) is None:
                raise ModelError(f"{source}: {name} {token!r} is not in the vocabulary")
        self._backend_hash: str | None = None

    # ---- special tokens -----------------------------------------------------------------------------------
    @property
    def bos_token(self) -> str | None:
        return self._special["bos_token"]

    @property
    def eos_token(self) -> str | None:
        return self._special["eos_token"]

    @property
    def pad_token(self) -> str | None:
        """The padding token: the source's, else the EOS token (padding is always masked out)."""
        return self._special["pad_token"] or self._special["eos_token"]

    @property
    def unk_token(self) -> str | None:
        return self._special["unk_token"]

    @property
    def bos_id(self) -> int | None:
        return self.token_to_id(self.bos_token) if self.bos_token is not None else None

    @property
    def eos_id(self) -> int | None:
        return self.token_to_id(self.eos_token) if self.eos_token is not None else None

    @property
    def pad_id(self) -> int | None:
        """Id of `pad_token` (falls back to EOS); None only when the model has neither."""
        return self.token_to_id(self.pad_token) if self.pad_token is not None else None

    @property
    def special_tokens(self) -> list[str]:
        """All tokens marked special (a GGUF's control tokens, a tokenizer.json's `special` added tokens)."""
        added = self._backend.get_added_tokens_decoder()
        return [added[i].content for i in sorted(added) if added[i].special]

    # ---- vocabulary ---------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (the embedding needs at least this many rows)."""
        added = self._backend.get_added_tokens_decoder()
        return max(self._backend.get_vocab_size(with_added_tokens=True), max(added, default=-1) + 1)

    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary entry (as the vocabulary spells it, e.g. "Ġyes"), or None."""
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry of an id (byte-level spelling, e.g. "Ġyes"), or None."""
        return self._backend.id_to_token(int(token_id))

    # ---- encoding -----------------------------------------------------------------------------------------
    def encode(self, text: str, *, add_special_tokens: bool | None = None) -> list[int]:
        """Token ids of `text`.

        Args:
          text: the text; special-token strings in it (e.g. "<|im_end|>") become their single token.
          add_special_tokens: add BOS/EOS as the source's post-processor says. None: the source's setting
            (`add_bos_token`); the chat-templated texts of `dynamics.text` are encoded with False.

        Returns:
          The ids, a list of ints.
        """
        add = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return list(self._backend.encode(text, add_special_tokens=add).ids)

    def encode_batch(self, texts: Sequence[str], *, add_special_tokens: bool | None = None) -> list[list[int]]:
        """`encode` of many texts at once (parallel in the Rust backend). Returns one id list per text."""
        add = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return [list(e.ids) for e in self._backend.encode_batch(list(texts), add_special_tokens=add)]

    def offsets(self, text: str) -> list[tuple[int, int]]:
        """Character span (start, end) in `text` of each token of `encode(text, add_special_tokens=False)`."""
        return [tuple(o) for o in self._backend.encode(text, add_special_tokens=False).offsets]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """The text of `ids` (special tokens kept unless `skip_special_tokens`)."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """Human-readable piece of each id, for plots: each id decoded alone (" yes", "<|im_end|>", "\\n").

        A piece that is part of a multi-byte character (it decodes to U+FFFD) is shown as its vocabulary
        spelling instead.

        Returns:
          One string per id.
        """
        pieces = []
        for i in ids:
            text = self._backend.decode([int(i)], skip_special_tokens=False)
            if "\ufffd" in text:
                text = self.id_to_token(int(i)) or text
            pieces.append(text)
        return pieces

    # ---- chat template ------------------------------------------------------------------------------------
    def apply_chat_template(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False, **kwargs: Any
    ) -> str:
        """Render a conversation with the chat template, as transformers' `apply_chat_template` does.

        Args:
          messages: dicts with "role" and "content".
          add_generation_prompt: append the header that opens the assistant's turn.
          **kwargs: extra template variables (e.g. `tools`, `date_string`); they override `template_vars`.

        Returns:
          The rendered text. The template sees `bos_token`, `eos_token`, `pad_token`, `unk_token` (those the
          tokenizer has), `raise_exception`, `strftime_now` and a JSON `tojson` filter.

        Raises:
          ModelError: the tokenizer has no chat template (use `ensure_chat_template`) or the template fails.
        """
        if self.chat_template is None:
            raise ModelError(
                f"{self.source}: the tokenizer has no chat template; call "
                "dynamics.tokenizer.ensure_chat_template(tokenizer) to use the paper's default template"
            )
        for k, message in enumerate(messages):
            if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
                raise ModelError(f"chat message {k} must be a dict with 'role' and 'content', got {message!r}")
        variables = {name: tok for name, tok in self._special.items() if tok is not None}
        if self._special["pad_token"] is None and self.pad_token is not None:
            variables["pad_token"] = self.pad_token
        variables.update(self.template_vars)
        variables.update(kwargs)
        try:
            return _compile_template(self.chat_template).render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                tools=variables.get("tools"),
                documents=variables.get("documents"),
                **{k: v for k, v in variables.items() if k not in ("tools", "documents")},
            )
        except jinja2.TemplateError as e:
            raise ModelError(f"{self.source}: the chat template raised: {e}") from e

    # ---- changes ------------------------------------------------------------------------------------------
    def add_special_tokens(self, tokens: Sequence[str]) -> list[int]:
        """Add tokens as special tokens (matched whole, never split). `vocab_size` grows by the new ones.

        Args:
          tokens: the token strings, e.g. ["<sep>", "<edge_sep>"].

        Returns:
          The id of each token, in order. A token already in the vocabulary keeps its id; the new ones get ids
          from the old `vocab_size` on (those rows must be added to the model's embeddings).
        """
        if isinstance(tokens, str):
            raise TypeError("add_special_tokens takes a list of strings, not one string")
        for t in tokens:
            if not isinstance(t, str) or not t:
                raise ModelError(f"special tokens must be non-empty strings, got {t!r}")
        self._backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
        self._backend_hash = None
        return [self._backend.token_to_id(t) for t in tokens]

    def copy(self) -> Tokenizer:
        """An independent copy (its own backend), for changes that must not reach the original."""
        return Tokenizer(
            _Backend.from_str(self._backend.to_str()),
            source=self.source,
            chat_template=self.chat_template,
            add_bos_token=self.add_bos_token,
            num_added_for_template=self.num_added_for_template,
            template_vars=self.template_vars,
            **self._special,
        )

    # ---- identity -----------------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """A stable 16-hex-digit hash of everything that decides the token ids and the rendered template."""
        if self._backend_hash is None:  # the slow part (a few MB of JSON), redone only after additions
            self._backend_hash = hashlib.sha256(self._backend.to_str().encode("utf-8")).hexdigest()
        extra = {
            "backend": self._backend_hash,
            "chat_template": self.chat_template,
            "special": self._special,
            "add_bos_token": self.add_bos_token,
            "template_vars": self.template_vars,
        }
        return hashlib.sha256(json.dumps(extra, sort_keys=True, default=repr).encode("utf-8")).hexdigest()[:16]

    def __repr__(self) -> str:
        return (
            f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
            f"eos={self.eos_token!r}, pad={self.pad_token!r}, chat_template={self.chat_template is not None})"
        )


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------


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

    alphabet = set(_BYTE_ALPHABET.values())
    vocab = {}
    for i, tok in enumerate(tokens):
        # Tokens stored as raw text (outside the byte alphabet) are respelled byte-wise, as transformers does.
        spelled = tok if set(tok) <= alphabet else "".join(_BYTE_ALPHABET[b] for b in tok.encode("utf-8"))
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


def ensure_chat_template(tokenizer: Tokenizer) -> tuple[Tokenizer, list[int]]:
    """The tokenizer with a chat template: its own, or the paper's default (docs/math.md §6).

    A model without a template gets `DEFAULT_CHAT_TEMPLATE` with `<|user|>` and `<|assistant|>` added as
    special tokens (and `<|endoftext|>` as EOS if it has no EOS), as the official code does. The input is not
    changed.

    Args:
      tokenizer: any tokenizer.

    Returns:
      `(tokenizer, added_ids)`: the input itself and [] when it has a template; otherwise a copy with the
      default template and the ids of the tokens that are new rows (the model's embeddings must grow by
      `len(added_ids)`; the copy's `num_added_for_template` says the same).
    """
    if tokenizer.chat_template is not None:
        return tokenizer, []
    tok = tokenizer.copy()
    old_size = tok.vocab_size
    wanted = [DEFAULT_USER_TOKEN, DEFAULT_ASSISTANT_TOKEN]
    if tok.eos_token is None:
        wanted.append(DEFAULT_EOS_TOKEN)
        tok._special["eos_token"] = DEFAULT_EOS_TOKEN
    ids = tok.add_special_tokens(wanted)
    added = sorted({i for i in ids if i >= old_size})
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    tok.num_added_for_template = len(added)
    return tok, added


def check_vocab_matches(tokenizer: Tokenizer, model_vocab_size: int, source_desc: str) -> int:
    """Check that a tokenizer belongs to a model's weights.

    Embedding matrices are often padded past the tokenizer (Qwen2.5: 151,936 rows for 151,665 tokens), so a
    model with more rows is fine; a tokenizer with more ids than rows, or one that fills less than 90% of the
    rows, is not.

    Args:
      tokenizer: the tokenizer.
      model_vocab_size: rows of the model's embedding / unembedding matrix.
      source_desc: what the model is, for the message (e.g. its path).

    Returns:
      The number of padding rows (model_vocab_size - tokenizer.vocab_size), >= 0.

    Raises:
      ModelError: naming both sizes when they do not fit together.
    """
    n_tok = tokenizer.vocab_size
    if n_tok > model_vocab_size:
        hint = ""
        if tokenizer.num_added_for_template:
            hint = (
                f"; the default chat template added {tokenizer.num_added_for_template} tokens: resize the "
                f"model's embeddings to {n_tok} rows first"
            )
        raise ModelError(
            f"tokenizer {tokenizer.source} has {n_tok} token ids but the model {source_desc} has only "
            f"{model_vocab_size} embedding rows: the tokenizer does not belong to these weights{hint}"
        )
    if n_tok < 0.9 * model_vocab_size:
        raise ModelError(
            f"tokenizer {tokenizer.source} has {n_tok} token ids but the model {source_desc} has "
            f"{model_vocab_size} embedding rows, far more than padding: the tokenizer does not belong "
            "to these weights"
        )
    return model_vocab_size - n_tok

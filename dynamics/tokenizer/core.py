"""The `Tokenizer` (encode, decode, the chat template rendered as transformers does) and the default chat
template; see the package docstring for the conventions."""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
from tokenizers import AddedToken
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

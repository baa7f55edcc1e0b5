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

from dynamics.tokenizer.core import (
    DEFAULT_ASSISTANT_TOKEN,
    DEFAULT_CHAT_TEMPLATE,
    DEFAULT_EOS_TOKEN,
    DEFAULT_USER_TOKEN,
    Tokenizer,
    check_vocab_matches,
    ensure_chat_template,
)
from dynamics.tokenizer.sources import BYTE_ALPHABET, load_tokenizer

__all__ = [
    "BYTE_ALPHABET",
    "DEFAULT_ASSISTANT_TOKEN",
    "DEFAULT_CHAT_TEMPLATE",
    "DEFAULT_EOS_TOKEN",
    "DEFAULT_USER_TOKEN",
    "Tokenizer",
    "check_vocab_matches",
    "ensure_chat_template",
    "load_tokenizer",
]

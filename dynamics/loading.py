"""Load a model together with its tokenizer, from the same source, and check that they belong together."""

from __future__ import annotations

import dataclasses
import os

from dynamics.models import LM, Params, load_gguf, load_hf_directory, resize_vocab, resolve_model_source
from dynamics.models.gguf_loader import DEFAULT_MODEL_NAME, open_gguf
from dynamics.outputs import portable_path
from dynamics.tokenizer import Tokenizer, check_vocab_matches, ensure_chat_template, load_tokenizer

__all__ = ["Loaded", "load"]


@dataclasses.dataclass(frozen=True)
class Loaded:
    """A model, its parameters and its tokenizer.

    Attributes:
      lm: the pure-function model.
      params: its parameter pytree.
      tokenizer: the tokenizer from the same source, with a chat template (its own or the paper's default).
      source: the path loaded (`describe` records it relative, `dynamics.outputs.portable_path`).
      name: a readable model name.
      template_tokens_added: ids of tokens the default chat template added (the embeddings grew by as many rows).
    """

    lm: LM
    params: Params
    tokenizer: Tokenizer
    source: str
    name: str
    template_tokens_added: tuple[int, ...] = ()

    def describe(self, start: str | os.PathLike[str] | None = None) -> dict:
        """JSON-ready description of the model (recorded in every result).

        Args:
          start: the directory `source` is named relative to (a run directory); None for the working directory.
        """
        c = self.lm.config
        return {
            "name": self.name,
            "source": portable_path(self.source, start),
            "family": c.family,
            "n_params": c.n_params,
            "n_layers": c.n_layers,
            "d_model": c.d_model,
            "vocab_size": c.vocab_size,
            "tie_embeddings": c.tie_embeddings,
            "tokenizer_fingerprint": self.tokenizer.fingerprint,
            "template_tokens_added": list(self.template_tokens_added),
        }


def load(source: str | None = None, dtype: str = "float32", progress: bool = False) -> Loaded:
    """Model + tokenizer from `source`: None/"default" (SmolLM2-135M-Instruct), a .gguf file or an HF directory.

    The tokenizer must belong to the weights (`check_vocab_matches`). A model without a chat template gets the
    paper's default template (docs/math.md §6) and its embeddings grow by the added special tokens.

    Raises:
      ModelError: missing files, an unsupported architecture, or a tokenizer that does not fit the weights.
    """
    path = resolve_model_source(source)
    if os.path.isdir(path):
        config, params = load_hf_directory(path, dtype=dtype)
        tokenizer = load_tokenizer(path)
        name = config.name or os.path.basename(os.path.normpath(path))
    else:
        reader = open_gguf(path)
        tokenizer = load_tokenizer(reader)
        tokenizer.source = path
        config, params = load_gguf(path, dtype=dtype, progress=progress, reader=reader)
        name = DEFAULT_MODEL_NAME if source in (None, "", "default") else (config.name or path)
    lm = LM(config)
    tokenizer, added = ensure_chat_template(tokenizer)
    if added:
        lm, params = resize_vocab(lm, params, max(lm.config.vocab_size, tokenizer.vocab_size))
    check_vocab_matches(tokenizer, lm.config.vocab_size, path)
    return Loaded(lm, params, tokenizer, path, name, tuple(added))

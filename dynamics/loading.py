"""Load a model together with its tokenizer, from the same source, and check that they belong together."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from dynamics.errors import ModelError
from dynamics.models import (
    LM,
    Params,
    load_gguf,
    load_hf_directory,
    read_score_head,
    resize_vocab,
    resolve_model_source,
)
from dynamics.models.gguf_loader import DEFAULT_MODEL_NAME, open_gguf
from dynamics.outputs import portable_path
from dynamics.tokenizer import Tokenizer, check_vocab_matches, ensure_chat_template, load_tokenizer

__all__ = ["Loaded", "load", "load_reference"]


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
      ref_params: π_ref's parameters when the reference is another checkpoint than the model (a DPO run's policy
        and its reference, `with_reference`); None: the IM-RM's π_ref is the model itself.
      ref_source: where `ref_params` came from, or None.
      score_head: the reward head u [D] of a sequence-classification checkpoint (`read_score_head`: a reward
        model saved by transformers or TRL's RewardTrainer), or None; the EX-RM then starts from it.
      adapter_source: the PEFT adapter applied (`with_adapter`), or None.
    """

    lm: LM
    params: Params
    tokenizer: Tokenizer
    source: str
    name: str
    template_tokens_added: tuple[int, ...] = ()
    ref_params: Params | None = None
    ref_source: str | None = None
    score_head: np.ndarray | None = None
    adapter_source: str | None = None

    def with_adapter(self, directory: str) -> Loaded:
        """This model with the PEFT LoRA adapter in `directory` applied (`dynamics.lora.load_peft_adapter`); its
        reference, unless `with_reference` sets another, is the base model (the adapter's B factors at 0), as in
        a DPO run with PEFT."""
        from dynamics.lora import base_params, load_peft_adapter

        lm, params = load_peft_adapter(self.lm, self.params, directory)
        return dataclasses.replace(self, lm=lm, params=params, ref_params=base_params(params), adapter_source=directory)

    def with_reference(self, source: str, dtype: str = "float32") -> Loaded:
        """This model as the policy π_θ with π_ref loaded from `source` (`load_reference`)."""
        return dataclasses.replace(self, ref_params=load_reference(self, source, dtype), ref_source=source)

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
            "reference": None if self.ref_source is None else portable_path(self.ref_source, start),
            "score_head": self.score_head is not None,
            "adapter": None if self.adapter_source is None else portable_path(self.adapter_source, start),
        }


def load(source: str | None = None, dtype: str = "float32", progress: bool = False) -> Loaded:
    """Model + tokenizer from `source`: None/"default" (SmolLM2-135M-Instruct), a .gguf file or an HF directory.

    The tokenizer must belong to the weights (`check_vocab_matches`). A model without a chat template gets the
    paper's default template (docs/math.md §6) and its embeddings grow by the added special tokens.

    Raises:
      ModelError: missing files, an unsupported architecture, or a tokenizer that does not fit the weights.
    """
    path = resolve_model_source(source)
    score = None
    if os.path.isdir(path):
        config, params = load_hf_directory(path, dtype=dtype)
        score = read_score_head(path, config.d_model)
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
    return Loaded(lm, params, tokenizer, path, name, tuple(added), score_head=score)


def load_reference(policy: Loaded, source: str, dtype: str = "float32") -> Params:
    """π_ref's parameters from `source` (a .gguf file or an HF directory) for the policy `policy`.

    r_IM = β (ln π_θ(y|x) − ln π_ref(y|x)) compares two distributions over one vocabulary: the reference must have
    the policy's architecture (every `DecoderConfig` field but the name) and the same tokenizer (fingerprint).

    Raises:
      ModelError: the reference cannot be loaded, or its architecture or tokenizer differs from the policy's
        (the message names both sources and the first differences).
    """
    ref = load(source, dtype)
    no_lora = {"lora_rank": 0, "lora_scale": 0.0, "lora_targets": ()}
    a, b = dataclasses.replace(policy.lm.config, **no_lora), ref.lm.config
    diffs = [f.name for f in dataclasses.fields(a) if f.name != "name" and getattr(a, f.name) != getattr(b, f.name)]
    if diffs:
        shown = ", ".join(f"{k}={getattr(b, k)!r} (policy {getattr(a, k)!r})" for k in diffs[:4])
        raise ModelError(
            f"reference {ref.source}: its architecture differs from the policy's ({policy.source}): {shown}"
        )
    if ref.tokenizer.fingerprint != policy.tokenizer.fingerprint:
        raise ModelError(
            f"reference {ref.source}: its tokenizer differs from the policy's ({policy.source}): fingerprint "
            f"{ref.tokenizer.fingerprint} vs {policy.tokenizer.fingerprint}; an IM-RM needs both over one vocabulary"
        )
    if policy.lm.config.lora_rank:  # the policy carries an adapter: the reference in its tree, with B = 0
        from dynamics.lora import zero_factors_like

        return zero_factors_like(ref.params, policy.params)
    return ref.params

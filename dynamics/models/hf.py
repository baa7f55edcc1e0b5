"""Load a local Hugging Face model directory (config.json + *.safetensors) into our parameter tree.

PyTorch `Linear` weights are [out, in]; ours are einsum operands with named axes, e.g. q: [D, N, H]. The
mapping is a pure function of a {name: array} dict, so the tests feed it a transformers state dict directly.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from dynamics.errors import ModelError, RmdynError
from dynamics.models.config import DecoderConfig
from dynamics.models.hf_config import config_from_hf, read_hf_config

__all__ = ["SCORE_HEAD", "load_hf_directory", "params_from_state_dict", "read_score_head"]

Params = dict[str, Any]

#: The prefix of every decoder tensor's name (not of the LM head's), per family.
_PREFIXES = {
    "llama": "model.",
    "qwen2": "model.",
    "qwen3": "model.",
    "mistral": "model.",
    "olmo2": "model.",
    "gemma2": "model.",
    "gemma3": "model.",
    "gpt_neox": "gpt_neox.",
}


class _Source:
    """A {name: array} view that tracks which names were used, to report leftovers and missing tensors."""

    def __init__(self, tensors: Mapping[str, Any], prefix: str, where: str):
        self.tensors = tensors
        self.prefix = prefix if any(k.startswith(prefix) for k in tensors) else ""
        self.where = where
        self.used: set[str] = set()

    def __call__(self, name: str, *, top: bool = False) -> np.ndarray:
        key = name if top else self.prefix + name
        if key not in self.tensors:
            raise ModelError(f"{self.where}: tensor {key!r} is missing")
        self.used.add(key)
        return np.asarray(self.tensors[key])

    def has(self, name: str, *, top: bool = False) -> bool:
        return (name if top else self.prefix + name) in self.tensors


def _linear_in(w: np.ndarray, *out_shape: int) -> np.ndarray:
    """[out, in] → [in, *out_shape] (an input-side projection such as q: D → N×H)."""
    return w.T.reshape(w.shape[1], *out_shape)


def _linear_out(w: np.ndarray, *in_shape: int) -> np.ndarray:
    """[out, in] → [*in_shape, out] (an output-side projection such as o: N×H → D)."""
    return w.T.reshape(*in_shape, w.shape[0])


def _norm(src: _Source, name: str, config: DecoderConfig) -> dict[str, np.ndarray]:
    out = {"scale": src(f"{name}.weight")}
    if config.norm_kind == "layer":
        out["bias"] = src(f"{name}.bias")
    return out


def _llama_like_attention(src: _Source, p: str, c: DecoderConfig) -> Params:
    """attn/{q,k,v,o} (with biases when the family has them) and attn/{q,k}_norm, from `{p}self_attn.*`."""
    N, K, H = c.n_heads, c.n_kv_heads, c.head_dim

    def proj(name, heads):
        out = {"w": _linear_in(src(f"{p}self_attn.{name}_proj.weight"), heads, H)}
        if c.qkv_bias:
            out["b"] = src(f"{p}self_attn.{name}_proj.bias").reshape(heads, H)
        return out

    attn = {"q": proj("q", N), "k": proj("k", K), "v": proj("v", K)}
    attn["o"] = {"w": _linear_out(src(f"{p}self_attn.o_proj.weight"), N, H)}
    if c.attn_out_bias:
        attn["o"]["b"] = src(f"{p}self_attn.o_proj.bias")
    if c.qk_norm is not None:  # [H] per head (Qwen3, Gemma 3) or [N·H], [K·H] over the projection (OLMo 2)
        sizes = (H, H) if c.qk_norm == "head" else (N * H, K * H)
        for name, size in zip(("q_norm", "k_norm"), sizes, strict=True):
            attn[name] = _norm(src, f"{p}self_attn.{name}", c)
            if attn[name]["scale"].shape != (size,):
                raise ValueError(f"{p}self_attn.{name}.weight has shape {attn[name]['scale'].shape}, not ({size},)")
    return attn


def _llama_like_layer(src: _Source, i: int, c: DecoderConfig) -> Params:
    p = f"layers.{i}."
    D, N, H, F = c.d_model, c.n_heads, c.head_dim, c.d_ff
    layer = {
        "attn": _llama_like_attention(src, p, c),
        "mlp": {
            "gate": {"w": src(f"{p}mlp.gate_proj.weight").T},
            "up": {"w": src(f"{p}mlp.up_proj.weight").T},
            "down": {"w": src(f"{p}mlp.down_proj.weight").T},
        },
    }
    if c.pre_norms:
        layer["attn_norm"] = _norm(src, f"{p}input_layernorm", c)
    if c.post_norms:  # Gemma 2/3, OLMo 2: post_attention_layernorm is the attention's post-norm
        layer["post_attn_norm"] = _norm(src, f"{p}post_attention_layernorm", c)
        layer["post_mlp_norm"] = _norm(src, f"{p}post_feedforward_layernorm", c)
        if c.pre_norms:  # Gemma: pre_feedforward_layernorm is the MLP's pre-norm
            layer["mlp_norm"] = _norm(src, f"{p}pre_feedforward_layernorm", c)
    else:
        layer["mlp_norm"] = _norm(src, f"{p}post_attention_layernorm", c)
    assert layer["attn"]["q"]["w"].shape == (D, N, H) and layer["mlp"]["gate"]["w"].shape == (D, F)
    for name in ("attn_norm", "mlp_norm", "post_attn_norm", "post_mlp_norm"):
        assert name not in layer or layer[name]["scale"].shape == (D,), name
    return layer


def _neox_layer(src: _Source, i: int, c: DecoderConfig) -> Params:
    p = f"layers.{i}."
    N, H = c.n_heads, c.head_dim
    # Fused qkv rows are laid out per head as [q(H), k(H), v(H)]: [N, 3, H] × D.
    qkv_w = src(f"{p}attention.query_key_value.weight").reshape(N, 3, H, -1)
    qkv_b = src(f"{p}attention.query_key_value.bias").reshape(N, 3, H)

    def head(j):
        return {"w": np.transpose(qkv_w[:, j], (2, 0, 1)), "b": qkv_b[:, j]}

    return {
        "attn_norm": _norm(src, f"{p}input_layernorm", c),
        "mlp_norm": _norm(src, f"{p}post_attention_layernorm", c),
        "attn": {
            "q": head(0),
            "k": head(1),
            "v": head(2),
            "o": {
                "w": _linear_out(src(f"{p}attention.dense.weight"), N, H),
                "b": src(f"{p}attention.dense.bias"),
            },
        },
        "mlp": {
            "up": {"w": src(f"{p}mlp.dense_h_to_4h.weight").T, "b": src(f"{p}mlp.dense_h_to_4h.bias")},
            "down": {"w": src(f"{p}mlp.dense_4h_to_h.weight").T, "b": src(f"{p}mlp.dense_4h_to_h.bias")},
        },
    }


_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "attention.bias", "attention.masked_bias")


def params_from_state_dict(
    config: DecoderConfig,
    tensors: Mapping[str, Any],
    *,
    where: str = "state dict",
    cast: Callable[[np.ndarray], Any] | None = None,
) -> Params:
    """Our parameter tree from a transformers-named {tensor name: array} mapping.

    Args:
      config: the model's config.
      tensors: arrays by their transformers names (a safetensors file or `model.state_dict()` as numpy).
      where: what to name in error messages (a directory).
      cast: applied to every array (e.g. to a jax array of the target dtype).

    Raises:
      ModelError: a tensor the config needs is missing, or a shape does not match the config.
    """
    src = _Source(tensors, _PREFIXES[config.family], where)
    c = config
    cast = cast or (lambda a: a)
    embed = src("embed_in.weight" if c.family == "gpt_neox" else "embed_tokens.weight")
    if embed.shape != (c.vocab_size, c.d_model):
        raise ModelError(f"{where}: embedding has shape {embed.shape}, config says {(c.vocab_size, c.d_model)}")
    build = _neox_layer if c.family == "gpt_neox" else _llama_like_layer
    layers = []
    for i in range(c.n_layers):
        try:
            layers.append(build(src, i, c))
        except (ValueError, AssertionError) as err:  # a reshape or shape check: the config does not fit the tensors
            if isinstance(err, ModelError):
                raise
            raise ModelError(
                f"{where}: the tensors of layer {i} do not have the shapes the config implies (d_model={c.d_model}, "
                f"heads={c.n_heads}/{c.n_kv_heads}, head_dim={c.head_dim}, d_ff={c.d_ff}): {err or 'shape mismatch'}"
            ) from err
    if c.family == "gpt_neox":
        final = _norm(src, "final_layer_norm", c)
        # Pythia checkpoints call the head embed_out; transformers ≥ 5 saves it as lm_head
        head_name = "embed_out.weight" if src.has("embed_out.weight", top=True) else "lm_head.weight"
    else:
        final = _norm(src, "norm", c)
        head_name = "lm_head.weight"
    params: Params = {"embed": {"embedding": embed}, "final_norm": final}
    for i, layer in enumerate(layers):
        params[f"layers_{i}"] = layer
    if not c.tie_embeddings:
        if not src.has(head_name, top=True):
            raise ModelError(f"{where}: config says untied embeddings but {head_name!r} is missing")
        params["lm_head"] = {"w": src(head_name, top=True)}
    # a sequence-classification checkpoint's reward head (`read_score_head`) is not part of the decoder
    leftovers = [k for k in tensors if k not in src.used and not k.endswith(_IGNORED_SUFFIXES) and k != SCORE_HEAD]
    if c.tie_embeddings and head_name in leftovers:
        leftovers.remove(head_name)  # a saved copy of the tied matrix
    if leftovers:
        raise ModelError(f"{where}: {len(leftovers)} tensors were not used, e.g. {leftovers[:5]}")
    return _map_leaves(params, cast)


#: The tensor name of the linear head of transformers' *ForSequenceClassification models ([num_labels, D]).
SCORE_HEAD = "score.weight"


def read_score_head(directory: str, d_model: int) -> np.ndarray | None:
    """The reward head u [D] (float32) of a sequence-classification checkpoint (transformers'
    *ForSequenceClassification with num_labels = 1, as TRL's RewardTrainer saves it), or None without one.

    Its reward is ⟨u, h⟩ at the last non-pad token, the EX-RM of docs/math.md §1 with u = score.weight[0].

    Raises:
      ModelError: a score head with more than one label, or whose width is not the model's d_model.
    """
    from safetensors import safe_open

    for path in _safetensors_files(directory):
        with safe_open(path, framework="numpy") as fh:
            if SCORE_HEAD in fh.keys():
                w = np.asarray(fh.get_tensor(SCORE_HEAD), np.float32)
                if w.ndim != 2 or w.shape != (1, d_model):
                    raise ModelError(
                        f"{path}: {SCORE_HEAD} has shape {tuple(w.shape)}; a reward head is [1, d_model = {d_model}] "
                        "(num_labels = 1)"
                    )
                return w[0]
    return None


def _map_leaves(tree, fn):
    if isinstance(tree, dict):
        return {k: _map_leaves(v, fn) for k, v in tree.items()}
    return fn(tree)


def _safetensors_files(directory: str) -> list[str]:
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as fh:
                weight_map = json.load(fh)["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ModelError(f"{index}: not valid JSON ({err})") from err
        except (KeyError, TypeError, AttributeError) as err:
            raise ModelError(f"{index}: expected a JSON object with a 'weight_map' of tensor → file name") from err
        files = [os.path.join(directory, str(n)) for n in names]
        for path in files:
            if not os.path.isfile(path):
                raise ModelError(f"{path}: listed in {os.path.basename(index)} but missing")
        return files
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise ModelError(f"{directory}: no *.safetensors files (only safetensors weights are supported)")
    return files


def _safetensors_reason(err: Exception) -> str:
    """safetensors' reason without its prefix: "header too large", "header too small", "invalid header length"."""
    text = str(err) or type(err).__name__
    return text.split("Error while deserializing header: ", 1)[-1]


def load_hf_directory(directory: str, dtype: str = "float32") -> tuple[DecoderConfig, Params]:
    """(config, params) from a local Hugging Face directory, arrays as jax arrays of `dtype`.

    Raises:
      ModelError: no config.json, one that is not JSON or lacks a required key or has a value of the wrong type,
        an unsupported `model_type` (lists the supported ones), a safetensors file that cannot be read, missing
        tensors or shapes that do not match the config. The message names the file.
    """
    import jax.numpy as jnp
    from safetensors import safe_open

    config_path = os.path.join(directory, "config.json")
    hf = read_hf_config(config_path)
    config = config_from_hf(hf, name=os.path.basename(os.path.normpath(directory)), where=config_path)
    tensors: dict[str, Any] = {}
    for path in _safetensors_files(directory):
        try:
            with safe_open(path, framework="flax") as fh:
                for key in fh.keys():
                    tensors[key] = fh.get_tensor(key)
        except Exception as err:  # safetensors raises SafetensorError (no public base class) on a corrupt file
            if isinstance(err, RmdynError | MemoryError):
                raise
            raise ModelError(
                f"{path}: not a valid safetensors file ({_safetensors_reason(err)}; {os.path.getsize(path):,} bytes)"
            ) from err
    target = jnp.dtype(dtype)
    params = params_from_state_dict(config, tensors, where=directory, cast=lambda a: jnp.asarray(a, target))
    return config, params

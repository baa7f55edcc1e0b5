"""Reading a Hugging Face `config.json` (old or new key names) into a `DecoderConfig`.

Every key a family's forward pass depends on is read and checked; a value this code cannot reproduce exactly (a
RoPE scaling type, sliding windows on Qwen, bidirectional attention, MLP biases, another activation) is refused
with a `ModelError` naming the file and the key, never silently ignored.
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Mapping
from typing import Any

from dynamics.errors import ModelError
from dynamics.models.config import SUPPORTED_FAMILIES, DecoderConfig, Family

__all__ = ["config_from_hf", "read_hf_config"]

#: The MLP activation each family computes, and the config.json names that mean it.
_ACTIVATION_NAMES = {
    "silu": ("silu", "swish"),
    "gelu_tanh": ("gelu_pytorch_tanh", "gelu_new"),
    "gelu": ("gelu",),
}

#: transformers' default `rms_norm_eps` of each RMSNorm family (used when config.json lacks the key).
_RMS_EPS_DEFAULT = {"qwen3": 1e-6, "mistral": 1e-6, "gemma2": 1e-6, "gemma3": 1e-6}

#: Families whose config's `attention_bias` puts biases on q, k, v and o (transformers reads it for these).
_ATTENTION_BIAS_FAMILIES = ("llama", "qwen3", "olmo2", "gemma2", "gemma3")


def read_hf_config(path: str) -> dict[str, Any]:
    """The parsed `config.json` at `path`, with a clear error if it is missing, not JSON or not a JSON object."""
    try:
        with open(path, encoding="utf-8") as fh:
            hf = json.load(fh)
    except FileNotFoundError as err:
        raise ModelError(f"{path}: no config.json (a Hugging Face model directory needs one)") from err
    except json.JSONDecodeError as err:
        raise ModelError(f"{path}: line {err.lineno}: not valid JSON ({err.msg})") from err
    except UnicodeDecodeError as err:
        raise ModelError(f"{path}: not valid JSON (not UTF-8 text: {err.reason} at byte {err.start})") from err
    except OSError as err:
        raise ModelError(f"{path}: cannot be read ({err.strerror or err})") from err
    if not isinstance(hf, dict):
        raise ModelError(f"{path}: expected a JSON object of config keys, got a JSON {type(hf).__name__}")
    return hf


def _scaling(kind: Any, src: Mapping[str, Any], key: str, supported: tuple[str, ...]) -> dict[str, Any] | None:
    """The RoPE scaling dict of type `kind` read from `src` (the value of config key `key`), or None for none."""
    if kind in (None, "default"):
        return None
    if kind not in supported:
        raise ModelError(
            f"key {key!r}: RoPE scaling type {kind!r} is not supported (supported: {', '.join(supported)})"
        )
    names = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    names = names if kind == "llama3" else names[:1]
    missing = [k for k in names if k not in src]
    if missing:
        raise ModelError(f"key {key!r}: {kind} RoPE scaling lacks {missing}: {dict(src)}")
    for k in names:
        if isinstance(src[k], bool) or not isinstance(src[k], numbers.Real):
            raise ModelError(f"key {key!r}: {k} must be a number, got {src[k]!r} ({type(src[k]).__name__})")
    return {"rope_type": kind, **{k: float(src[k]) for k in names}}


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ModelError(f"key {key!r} must be a number, got {value!r} ({type(value).__name__})")
    return float(value)


def _rope_params(hf: Mapping[str, Any]) -> tuple[float, Mapping[str, Any] | None, float]:
    """(theta, scaling or None, partial rotary factor) from old- or new-style HF config keys."""
    for key in ("rope_parameters", "rope_scaling"):
        value = hf.get(key)
        if value is not None and not isinstance(value, Mapping):
            raise ModelError(f"key {key!r} must be a JSON object, got {value!r} ({type(value).__name__})")
    rp = dict(hf.get("rope_parameters") or {})
    if rp and "rope_theta" not in rp and all(isinstance(v, Mapping) for v in rp.values()):
        # per-layer-type rope parameters (transformers ≥ 5 for some models): all layers must agree
        values = list(rp.values())
        if any(v != values[0] for v in values):
            raise ModelError(f"key 'rope_parameters': per-layer-type RoPE parameters differ: {rp}; not supported")
        rp = dict(values[0])
    scaling = dict(hf.get("rope_scaling") or {})
    theta = rp.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
    partial = rp.get("partial_rotary_factor", hf.get("partial_rotary_factor", hf.get("rotary_pct", 1.0)))
    kind = rp.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    theta, partial = _number("rope_theta", theta), _number("partial_rotary_factor", partial)
    src, key = (rp, "rope_parameters") if rp.get("rope_type") not in (None, "default") else (scaling, "rope_scaling")
    return theta, _scaling(kind, src, key, ("linear", "llama3")), partial


def _gemma3_rope(hf: Mapping[str, Any]) -> tuple[float, Mapping[str, Any] | None, float]:
    """Gemma 3's (global theta, global scaling or None, local theta), from old or new (per layer type) keys.

    Old keys: `rope_theta` (default 1e6), `rope_scaling`, `rope_local_base_freq` (default 1e4). New:
    `rope_parameters` = {"full_attention": {...}, "sliding_attention": {...}}. The local layers' RoPE is unscaled.
    """
    rp = hf.get("rope_parameters")
    if rp is not None and not isinstance(rp, Mapping):
        raise ModelError(f"key 'rope_parameters' must be a JSON object, got {rp!r} ({type(rp).__name__})")
    rp = dict(rp or {})
    per_type = bool({"full_attention", "sliding_attention"} & set(rp))
    full, local = (rp.get("full_attention") or {}, rp.get("sliding_attention") or {}) if per_type else (rp, {})
    for part in (full, local):
        if not isinstance(part, Mapping):
            raise ModelError(f"key 'rope_parameters': expected a JSON object per layer type, got {part!r}")
    scaling = hf.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, Mapping):
        raise ModelError(f"key 'rope_scaling' must be a JSON object, got {scaling!r} ({type(scaling).__name__})")
    scaling = dict(scaling or {})
    theta = _number("rope_theta", full.get("rope_theta", hf.get("rope_theta", 1_000_000.0)))
    local_theta = _number("rope_local_base_freq", local.get("rope_theta", hf.get("rope_local_base_freq", 10_000.0)))
    if local.get("rope_type", "default") != "default":
        raise ModelError(
            f"key 'rope_parameters': the sliding layers' RoPE type {local['rope_type']!r} is not supported "
            "(Gemma 3's local layers rotate without scaling)"
        )
    if full.get("rope_type") not in (None, "default"):
        kind, src, key = full["rope_type"], full, "rope_parameters"
    else:
        kind, src, key = scaling.get("rope_type", scaling.get("type")), scaling, "rope_scaling"
    return theta, _scaling(kind, src, key, ("linear",)), local_theta


_REQUIRED = object()


class _Keys:
    """Typed reads of a config dict, with errors that name the key, the value and what was expected.

    A key that is absent or null takes `default`; without one it is a missing required key.
    """

    def __init__(self, hf: Mapping[str, Any]):
        self.hf = hf

    def _get(self, key: str, default: Any) -> tuple[Any, bool]:
        value = self.hf.get(key)
        if value is not None:
            return value, True
        if default is _REQUIRED:
            raise ModelError(f"missing required key {key!r}")
        return default, False

    @staticmethod
    def _wrong(key: str, expected: str, value: Any) -> ModelError:
        return ModelError(f"key {key!r} must be {expected}, got {value!r} ({type(value).__name__})")

    def integer(self, key: str, default: Any = _REQUIRED, *, minimum: int = 1) -> Any:
        value, present = self._get(key, default)
        if not present:
            return value
        if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral) and float(value).is_integer():
            value = int(value)  # 2048.0
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
            raise self._wrong(key, "a positive integer" if minimum == 1 else f"an integer ≥ {minimum}", value)
        return int(value)

    def number(self, key: str, default: Any = _REQUIRED) -> Any:
        value, present = self._get(key, default)
        if not present:
            return value
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise self._wrong(key, "a number", value)
        return float(value)

    def flag(self, key: str, default: Any = _REQUIRED) -> Any:
        value, present = self._get(key, default)
        if present and not isinstance(value, bool):
            raise self._wrong(key, "true or false", value)
        return value

    def refuse(self, key: str, why: str) -> None:
        """A `ModelError` if `key` is true: an option this code does not implement."""
        if self.flag(key, False):
            raise ModelError(f"key {key!r} is true: {why}, which is not supported")


def config_from_hf(hf: Mapping[str, Any], *, name: str = "", where: str = "config") -> DecoderConfig:
    """A `DecoderConfig` from a Hugging Face `config.json` dict (old or new key names).

    Args:
      hf: the parsed config.json.
      name: a readable model name (default: the config's `_name_or_path`).
      where: what to name in error messages (the config.json path, or the GGUF file it was built from).

    Raises:
      ModelError: the `model_type` is not one of the supported families (the message lists them); a required key
        is missing, or a value has the wrong type or is out of range, or an option is not supported (a RoPE
        scaling type, a sliding window on Qwen, bidirectional attention, MLP biases, another activation); the
        message names `where`, the key and the architecture.
    """
    if not isinstance(hf, Mapping):
        raise ModelError(f"{where}: expected a JSON object of config keys, got {type(hf).__name__}")
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_FAMILIES:
        listing = "; ".join(f"{k}: {v[1]}" for k, v in SUPPORTED_FAMILIES.items())
        arch = hf.get("architectures")
        raise ModelError(
            f"{where}: unsupported architecture: model_type={model_type!r} (architectures={arch}); "
            f"supported model_type values are {listing}"
        )
    try:
        return _config_from_hf(hf, SUPPORTED_FAMILIES[model_type][0], name)
    except ModelError as err:
        raise ModelError(f"{where}: {err} (architecture {model_type})") from None
    except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError) as err:  # odd values the checks miss
        raise ModelError(f"{where}: unusable value ({type(err).__name__}: {err}) (architecture {model_type})") from err


def _check_activation(hf: Mapping[str, Any], family: Family, expected: str) -> None:
    """The config's activation (`hidden_activation` for Gemma, else `hidden_act`), if given, must be `expected`."""
    key = "hidden_activation" if family in ("gemma2", "gemma3") else "hidden_act"
    value = hf.get(key)
    if value is not None and value not in _ACTIVATION_NAMES[expected]:
        names = ", ".join(_ACTIVATION_NAMES[expected])
        raise ModelError(f"key {key!r} is {value!r}; this family's MLP computes {expected} ({names})")


def _layer_types(hf: Mapping[str, Any], n_layers: int, default: list[str]) -> tuple[str, ...]:
    """`layer_types` ("sliding_attention" / "full_attention" per layer) as "sliding" / "full", or `default`."""
    types = hf.get("layer_types") or default
    if not isinstance(types, list | tuple) or not all(isinstance(t, str) for t in types):
        raise ModelError(f"key 'layer_types' must be a list of strings, got {types!r}")
    unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
    if unknown:
        raise ModelError(f"key 'layer_types' has unsupported entries {unknown} (sliding_attention, full_attention)")
    if len(types) != n_layers:
        raise ModelError(f"key 'layer_types' has {len(types)} entries for num_hidden_layers={n_layers}")
    return tuple("sliding" if t == "sliding_attention" else "full" for t in types)


def _config_from_hf(hf: Mapping[str, Any], family: Family, name: str) -> DecoderConfig:
    keys = _Keys(hf)
    D = keys.integer("hidden_size")
    N = keys.integer("num_attention_heads")
    K = keys.integer("num_key_value_heads", 0, minimum=0) or N
    H = keys.integer("head_dim", 0, minimum=0) or D // N
    if not H:
        raise ModelError(f"hidden_size={D} < num_attention_heads={N} and no head_dim")
    if family == "gemma3":
        theta, scaling, local_theta = _gemma3_rope(hf)
        partial = 1.0
    else:
        (theta, scaling, partial), local_theta = _rope_params(hf), None
    common = dict(
        family=family,
        vocab_size=keys.integer("vocab_size"),
        d_model=D,
        n_layers=keys.integer("num_hidden_layers"),
        n_heads=N,
        n_kv_heads=K,
        head_dim=H,
        d_ff=keys.integer("intermediate_size"),
        rope_theta=theta,
        rotary_dim=int(H * partial),
        rope_scaling=scaling,
        rope_local_theta=local_theta,
        max_position=keys.integer("max_position_embeddings", 2048),
        tie_embeddings=keys.flag("tie_word_embeddings", family in ("gemma2", "gemma3")),
        name=name or str(hf.get("_name_or_path", "")),
    )
    if family == "gpt_neox":
        _check_activation(hf, family, "gelu")
        return DecoderConfig(
            norm_eps=keys.number("layer_norm_eps", 1e-5),
            parallel_residual=keys.flag("use_parallel_residual", True),
            **common,
        )
    common["norm_eps"] = keys.number("rms_norm_eps", _RMS_EPS_DEFAULT.get(family, 1e-5))
    if family in _ATTENTION_BIAS_FAMILIES:
        common["attention_bias"] = keys.flag("attention_bias", False)
    if family in ("gemma2", "gemma3"):
        return _gemma(keys, hf, family, common)
    _check_activation(hf, family, "silu")
    if family == "llama":
        keys.refuse("mlp_bias", "biases on the MLP matrices")
    if family in ("qwen2", "qwen3"):
        keys.refuse("use_sliding_window", "sliding-window attention on Qwen layers")
    if family == "mistral":  # transformers' default window (4096) when the key is absent; null: none
        window = keys.integer("sliding_window", None) if "sliding_window" in hf else 4096
        common["sliding_window"] = window
        common["layer_types"] = ("full" if window is None else "sliding",) * common["n_layers"]
    return DecoderConfig(**common)


def _gemma(keys: _Keys, hf: Mapping[str, Any], family: Family, common: dict[str, Any]) -> DecoderConfig:
    """Gemma 2 or Gemma 3: soft-caps, query_pre_attn_scalar, the sliding/full layer pattern."""
    _check_activation(hf, family, "gelu_tanh")
    L, H = common["n_layers"], common["head_dim"]
    if family == "gemma2":
        window = keys.integer("sliding_window", 0, minimum=0) or None
        default = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(L)]
        scalar = keys.number("query_pre_attn_scalar", float(H))
    else:
        keys.refuse("use_bidirectional_attention", "bidirectional attention (an encoder, not a causal LM)")
        window = keys.integer("sliding_window", None) if "sliding_window" in hf else 4096
        if keys.number("attn_logit_softcapping", None) is not None:  # null in every Gemma 3 checkpoint
            raise ModelError(
                "key 'attn_logit_softcapping' is set: transformers' Gemma 3 attention never applies it (Gemma 2's "
                "does), so what the checkpoint means is ambiguous; not supported"
            )
        pattern = keys.integer("sliding_window_pattern", 6)
        default = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(L)]
        scalar = keys.number("query_pre_attn_scalar", 256.0)
    if scalar <= 0:
        raise ModelError(f"key 'query_pre_attn_scalar' must be positive, got {scalar}")
    return DecoderConfig(
        query_scale=scalar**-0.5,
        attn_logit_softcap=keys.number("attn_logit_softcapping", None),
        final_logit_softcap=keys.number("final_logit_softcapping", None),
        sliding_window=window,
        layer_types=_layer_types(hf, L, default),
        **common,
    )

"""One configuration dataclass for every supported decoder family.

Family differences are flags, not copies of the block (house style, after gemma's `_modules.py`):

| family   | norm           | residual   | attention                          | MLP         | notes                  |
|----------|----------------|------------|------------------------------------|-------------|------------------------|
| llama    | RMSNorm        | sequential | GQA, full RoPE (llama3 scaling)    | gated SiLU  | SmolLM2, Llama-3.x     |
| qwen2    | RMSNorm        | sequential | GQA, q/k/v bias                    | gated SiLU  | Qwen2, Qwen2.5         |
| gpt_neox | LayerNorm+bias | parallel   | MHA, partial RoPE, all biases      | GELU (erf)  | Pythia                 |
| gemma2   | RMSNorm (1+w)  | sequential | GQA, logit soft-cap, sliding window| gated GELU  | post-norms, √D embed   |
|          |                |            | on alternate layers                | (tanh)      | scale, final soft-cap  |
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from collections.abc import Mapping
from typing import Any, Literal

from dynamics.errors import ModelError

__all__ = ["SUPPORTED_FAMILIES", "DecoderConfig", "Family", "config_from_hf", "llama3_inv_freq", "read_hf_config"]

Family = Literal["llama", "qwen2", "gpt_neox", "gemma2"]

#: config.json `model_type` → family, with the models of the paper that each covers.
SUPPORTED_FAMILIES: dict[str, tuple[str, str]] = {
    "llama": ("llama", "Llama-3.x (1B–8B, llama3 RoPE scaling), SmolLM2 (tied embeddings)"),
    "qwen2": ("qwen2", "Qwen2 / Qwen2.5 (q/k/v bias)"),
    "gpt_neox": ("gpt_neox", "Pythia (GPT-NeoX: parallel residual, partial rotary)"),
    "gemma2": ("gemma2", "Gemma 2 (logit soft-capping, pre- and post-norms, √D embedding scale)"),
}


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Shape and family flags of a decoder-only LM.

    Attributes:
      family: which block variant (see the module table).
      vocab_size: rows of the embedding (and of the LM head) matrix, V.
      d_model: hidden size D.
      n_layers: number of blocks L.
      n_heads: query heads N.
      n_kv_heads: key/value heads K (N must be a multiple of K).
      head_dim: H, per head.
      d_ff: MLP inner size F.
      norm_eps: epsilon of every norm.
      rope_theta: RoPE base.
      rotary_dim: how many of the H dims of each head RoPE rotates (H, or fewer for partial rotary).
      rope_scaling: None, or a dict with `rope_type` "llama3" (factor, low_freq_factor, high_freq_factor,
        original_max_position_embeddings) or "linear" (factor).
      max_position: the context length, in tokens.
      tie_embeddings: whether the LM head is the input embedding matrix.
      query_scale: the factor applied to q·k (1/√H, or query_pre_attn_scalar^-1/2 for Gemma 2).
      attn_logit_softcap: Gemma 2's cap on attention logits (None: no cap).
      final_logit_softcap: Gemma 2's cap on output logits (None: no cap).
      sliding_window: window of the sliding-attention layers (None: none).
      layer_types: per layer, "full" or "sliding".
      parallel_residual: x + attn(ln1(x)) + mlp(ln2(x)) (GPT-NeoX's `use_parallel_residual`, its default);
        None means the family's default.
      name: a human-readable model name.
    """

    family: Family
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rotary_dim: int | None = None
    rope_scaling: Mapping[str, Any] | None = None
    max_position: int = 2048
    tie_embeddings: bool = False
    query_scale: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    parallel_residual: bool | None = None
    name: str = ""

    def __post_init__(self):
        if self.family not in SUPPORTED_FAMILIES:
            raise ModelError(f"unknown family {self.family!r}; supported: {sorted(SUPPORTED_FAMILIES)}")
        if self.n_heads % self.n_kv_heads:
            raise ModelError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.rotary_dim is None:
            object.__setattr__(self, "rotary_dim", self.head_dim)
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise ModelError(f"rotary_dim={self.rotary_dim} must be even and ≤ head_dim={self.head_dim}")
        if self.query_scale is None:
            object.__setattr__(self, "query_scale", self.head_dim**-0.5)
        if self.layer_types is None:
            object.__setattr__(self, "layer_types", ("full",) * self.n_layers)
        if len(self.layer_types) != self.n_layers:
            raise ModelError(f"layer_types has {len(self.layer_types)} entries for {self.n_layers} layers")
        if self.rope_scaling is not None:
            object.__setattr__(self, "rope_scaling", _freeze(self.rope_scaling))
        if self.parallel_residual is None:
            object.__setattr__(self, "parallel_residual", self.family == "gpt_neox")

    # Family flags, derived so that no two fields can disagree.
    @property
    def norm_kind(self) -> str:
        """ "layer" (LayerNorm with bias, GPT-NeoX) or "rms"."""
        return "layer" if self.family == "gpt_neox" else "rms"

    @property
    def norm_plus_one(self) -> bool:
        """Gemma's RMSNorm multiplies by (1 + w) instead of w."""
        return self.family == "gemma2"

    @property
    def post_norms(self) -> bool:
        """Gemma 2 normalizes the attention and MLP outputs before adding them to the residual."""
        return self.family == "gemma2"

    @property
    def qkv_bias(self) -> bool:
        """Qwen2 and GPT-NeoX have biases on the q, k, v projections."""
        return self.family in ("qwen2", "gpt_neox")

    @property
    def out_bias(self) -> bool:
        """GPT-NeoX has biases on the attention output and on both MLP matrices."""
        return self.family == "gpt_neox"

    @property
    def gated_mlp(self) -> bool:
        """Gated (gate ⊙ up → down) MLP; GPT-NeoX has a plain two-matrix MLP."""
        return self.family != "gpt_neox"

    @property
    def activation(self) -> str:
        """The MLP non-linearity: "silu", "gelu_tanh" or "gelu" (exact, erf)."""
        return {"gemma2": "gelu_tanh", "gpt_neox": "gelu"}.get(self.family, "silu")

    @property
    def embed_scale(self) -> bool:
        """Gemma multiplies the input embeddings by √D."""
        return self.family == "gemma2"

    @property
    def n_params(self) -> int:
        """Number of parameters of the LM (tied embeddings counted once)."""
        D, F, H, N, K, V = (
            self.d_model,
            self.d_ff,
            self.head_dim,
            self.n_heads,
            self.n_kv_heads,
            self.vocab_size,
        )
        attn = D * N * H * 2 + D * K * H * 2 + (N * H + 2 * K * H if self.qkv_bias else 0)
        attn += D if self.out_bias else 0
        mlp = (3 if self.gated_mlp else 2) * D * F + ((F + D) if self.out_bias else 0)
        norms_per_layer = (4 if self.post_norms else 2) * D * (2 if self.norm_kind == "layer" else 1)
        final_norm = D * (2 if self.norm_kind == "layer" else 1)
        embed = V * D * (1 if self.tie_embeddings else 2)
        return self.n_layers * (attn + mlp + norms_per_layer) + final_norm + embed

    def replace(self, **changes) -> DecoderConfig:
        """A copy with some fields changed (e.g. `tie_embeddings=False` after untying)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the fields."""
        d = dataclasses.asdict(self)
        d["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling else None
        d["layer_types"] = list(self.layer_types)
        return d


class _FrozenDict(dict):
    """A hashable dict, so that the config stays hashable (it is a static argument of jitted functions)."""

    def __hash__(self):  # type: ignore[override]
        return hash(tuple(sorted(self.items())))

    def __setitem__(self, key, value):
        raise TypeError("frozen")


def _freeze(d: Mapping[str, Any]) -> _FrozenDict:
    return _FrozenDict({k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})


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
            raise ModelError(f"per-layer-type RoPE parameters differ: {rp}; not supported")
        rp = dict(values[0])
    scaling = dict(hf.get("rope_scaling") or {})
    theta = rp.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
    partial = rp.get("partial_rotary_factor", hf.get("partial_rotary_factor", hf.get("rotary_pct", 1.0)))
    kind = rp.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    for key, value in (("rope_theta", theta), ("partial_rotary_factor", partial)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ModelError(f"key {key!r} must be a number, got {value!r} ({type(value).__name__})")
    if kind in (None, "default"):
        return float(theta), None, float(partial)
    src = rp if rp.get("rope_type") not in (None, "default") else scaling
    if kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        missing = [k for k in keys if k not in src]
        if missing:
            raise ModelError(f"llama3 RoPE scaling lacks {missing}: {src}")
        return float(theta), {"rope_type": "llama3", **{k: float(src[k]) for k in keys}}, float(partial)
    if kind == "linear":
        return float(theta), {"rope_type": "linear", "factor": float(src["factor"])}, float(partial)
    raise ModelError(f"RoPE scaling type {kind!r} is not supported (supported: default, linear, llama3)")


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


def config_from_hf(hf: Mapping[str, Any], *, name: str = "", where: str = "config") -> DecoderConfig:
    """A `DecoderConfig` from a Hugging Face `config.json` dict (old or new key names).

    Args:
      hf: the parsed config.json.
      name: a readable model name (default: the config's `_name_or_path`).
      where: what to name in error messages (the config.json path, or the GGUF file it was built from).

    Raises:
      ModelError: the `model_type` is not one of the supported families (the message lists them); a required key
        is missing, or a value has the wrong type or is out of range (the message names `where`, the key and the
        architecture).
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


def _config_from_hf(hf: Mapping[str, Any], family: Family, name: str) -> DecoderConfig:
    keys = _Keys(hf)
    D = keys.integer("hidden_size")
    N = keys.integer("num_attention_heads")
    K = keys.integer("num_key_value_heads", 0, minimum=0) or N
    H = keys.integer("head_dim", 0, minimum=0) or D // N
    if not H:
        raise ModelError(f"hidden_size={D} < num_attention_heads={N} and no head_dim")
    theta, scaling, partial = _rope_params(hf)
    rotary_dim = int(H * partial)
    L = keys.integer("num_hidden_layers")
    tie_default = family == "gemma2"
    common = dict(
        family=family,
        vocab_size=keys.integer("vocab_size"),
        d_model=D,
        n_layers=L,
        n_heads=N,
        n_kv_heads=K,
        head_dim=H,
        d_ff=keys.integer("intermediate_size"),
        rope_theta=theta,
        rotary_dim=rotary_dim,
        rope_scaling=scaling,
        max_position=keys.integer("max_position_embeddings", 2048),
        tie_embeddings=keys.flag("tie_word_embeddings", tie_default),
        name=name or str(hf.get("_name_or_path", "")),
    )
    if family == "gpt_neox":
        return DecoderConfig(
            norm_eps=keys.number("layer_norm_eps", 1e-5),
            parallel_residual=keys.flag("use_parallel_residual", True),
            **common,
        )
    if family == "gemma2":
        window = keys.integer("sliding_window", 0, minimum=0)
        types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(L)]
        if not isinstance(types, list | tuple) or not all(isinstance(t, str) for t in types):
            raise ModelError(f"key 'layer_types' must be a list of strings, got {types!r}")
        return DecoderConfig(
            norm_eps=keys.number("rms_norm_eps", 1e-6),
            query_scale=keys.number("query_pre_attn_scalar", float(H)) ** -0.5,
            attn_logit_softcap=keys.number("attn_logit_softcapping", None),
            final_logit_softcap=keys.number("final_logit_softcapping", None),
            sliding_window=window or None,
            layer_types=tuple("sliding" if t == "sliding_attention" else "full" for t in types),
            **common,
        )
    if family == "qwen2" and hf.get("use_sliding_window"):
        raise ModelError("Qwen2 with use_sliding_window=true is not supported")
    return DecoderConfig(norm_eps=keys.number("rms_norm_eps", 1e-5), **common)


def _opt_float(x) -> float | None:
    return None if x is None else float(x)


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


def llama3_inv_freq(inv_freq, scaling: Mapping[str, Any]):
    """Llama-3.1 frequency rescaling (the `llama3` rope type), in numpy.

    Long wavelengths (beyond original_max_position / low_freq_factor) are divided by `factor`, short ones
    (below original_max_position / high_freq_factor) kept, and the band in between interpolated smoothly.
    """
    import numpy as np

    factor = scaling["factor"]
    lo, hi = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old / lo, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
    return np.where(medium, smoothed, scaled)

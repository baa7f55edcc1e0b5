"""One configuration dataclass for every supported decoder family, and the family flags derived from it.

Family differences are flags, not copies of the block (house style, after gemma's `_modules.py`):

| family   | norm           | residual   | attention                              | MLP        | notes                 |
|----------|----------------|------------|----------------------------------------|------------|-----------------------|
| llama    | RMSNorm        | sequential | GQA, full RoPE (llama3 scaling)        | gated SiLU | SmolLM2, Llama-3.x    |
| qwen2    | RMSNorm        | sequential | GQA, q/k/v bias                        | gated SiLU | Qwen2, Qwen2.5        |
| qwen3    | RMSNorm        | sequential | GQA, RMSNorm on each q/k head before   | gated SiLU | no q/k/v bias unless  |
|          |                |            | RoPE                                   |            | `attention_bias`      |
| mistral  | RMSNorm        | sequential | GQA, sliding window on every layer     | gated SiLU | Mistral 7B            |
| olmo2    | RMSNorm        | post-norms | GQA, RMSNorm on the whole q and k      | gated SiLU | no pre-norms: the     |
|          |                | only       | projections before RoPE                |            | outputs are normed    |
| gpt_neox | LayerNorm+bias | parallel   | MHA, partial RoPE, all biases          | GELU (erf) | Pythia                |
| gemma2   | RMSNorm (1+w)  | sequential | GQA, logit soft-cap, sliding window    | gated GELU | post-norms, √D embed  |
|          |                |            | on alternate layers                    | (tanh)     | scale, final soft-cap |
| gemma3   | RMSNorm (1+w)  | sequential | GQA, RMSNorm (1+w) on each q/k head,   | gated GELU | post-norms, √D embed  |
|          |                |            | sliding/full layer pattern, local and  | (tanh)     | scale, soft-caps only |
|          |                |            | global RoPE bases                      |            | if set                |

Reading a Hugging Face `config.json` into a `DecoderConfig` is `dynamics.models.hf_config`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal, get_args

from dynamics.defaults import LORA_TARGETS
from dynamics.errors import ModelError

__all__ = ["LORA_TARGETS", "FAMILIES", "SUPPORTED_FAMILIES", "DecoderConfig", "Family", "llama3_inv_freq"]

Family = Literal["llama", "qwen2", "qwen3", "mistral", "olmo2", "gpt_neox", "gemma2", "gemma3"]

#: Every family name, in the module table's order.
FAMILIES: tuple[str, ...] = get_args(Family)

#: config.json `model_type` → family, with the models of the paper that each covers.
SUPPORTED_FAMILIES: dict[str, tuple[str, str]] = {
    "llama": ("llama", "Llama-3.x (1B–8B, llama3 RoPE scaling), SmolLM2 (tied embeddings)"),
    "qwen2": ("qwen2", "Qwen2 / Qwen2.5 (q/k/v bias)"),
    "qwen3": ("qwen3", "Qwen3 dense (RMSNorm on each query/key head)"),
    "mistral": ("mistral", "Mistral (sliding-window attention on every layer)"),
    "olmo2": ("olmo2", "OLMo 2 (norms on the attention and MLP outputs, RMSNorm on the whole q and k)"),
    "gpt_neox": ("gpt_neox", "Pythia (GPT-NeoX: parallel residual, partial rotary)"),
    "gemma2": ("gemma2", "Gemma 2 (logit soft-capping, pre- and post-norms, √D embedding scale)"),
    "gemma3_text": ("gemma3", "Gemma 3 text (per-head q/k norms, sliding/full layers with local/global RoPE)"),
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
      norm_eps: epsilon of every norm (the q/k norms included).
      rope_theta: RoPE base (of the full-attention layers when `rope_local_theta` is set).
      rotary_dim: how many of the H dims of each head RoPE rotates (H, or fewer for partial rotary).
      rope_scaling: None, or a dict with `rope_type` "llama3" (factor, low_freq_factor, high_freq_factor,
        original_max_position_embeddings) or "linear" (factor).
      max_position: the context length, in tokens.
      tie_embeddings: whether the LM head is the input embedding matrix.
      query_scale: the factor applied to q·k (1/√H, or query_pre_attn_scalar^-1/2 for Gemma 2 and 3).
      attn_logit_softcap: Gemma 2's cap on attention logits (None: no cap).
      final_logit_softcap: Gemma 2's cap on output logits (None: no cap).
      sliding_window: window of the sliding-attention layers, in tokens: query t reads keys s with t − s < window
        (None: no window, the "sliding" layers read the whole causal past).
      layer_types: per layer, "full" or "sliding".
      parallel_residual: x + attn(ln1(x)) + mlp(ln2(x)) (GPT-NeoX's `use_parallel_residual`, its default);
        None means the family's default.
      attention_bias: biases on all four attention projections q, k, v and o (the `attention_bias` key of Llama,
        Qwen3, OLMo 2 and Gemma configs); Qwen2's q/k/v biases and GPT-NeoX's biases come with the family.
      rope_local_theta: RoPE base of the "sliding" layers, which then rotate without `rope_scaling` (Gemma 3's
        local base, `rope_local_base_freq`); None: every layer has the same RoPE.
      name: a human-readable model name.
      lora_rank: r > 0 adds LoRA factors to the projections named in `lora_targets` (`dynamics.lora`): each
        W gains s·B·A, A [in, r] and B [r, out] as parameters `lora_a`, `lora_b` beside `w`; 0: no LoRA.
      lora_scale: s, PEFT's lora_alpha / r (or lora_alpha / √r with rsLoRA).
      lora_targets: our projection names: q, k, v, o (attention), gate, up, down (MLP).
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
    attention_bias: bool = False
    rope_local_theta: float | None = None
    name: str = ""
    lora_rank: int = 0
    lora_scale: float = 0.0
    lora_targets: tuple[str, ...] = ()

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ModelError(f"unknown family {self.family!r}; supported: {sorted(FAMILIES)}")
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
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if len(self.layer_types) != self.n_layers:
            raise ModelError(f"layer_types has {len(self.layer_types)} entries for {self.n_layers} layers")
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        bad = sorted(set(self.lora_targets) - set(LORA_TARGETS))
        if bad or self.lora_rank < 0 or (self.lora_rank > 0) != bool(self.lora_targets):
            raise ModelError(
                f"LoRA: rank {self.lora_rank} with targets {list(self.lora_targets)}; a rank > 0 needs targets among "
                f"{', '.join(LORA_TARGETS)} (and rank 0 none)"
            )
        unknown = sorted(set(self.layer_types) - {"full", "sliding"})
        if unknown:
            raise ModelError(f"layer_types has unknown entries {unknown}; each layer is 'full' or 'sliding'")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ModelError(f"sliding_window={self.sliding_window} must be a positive number of tokens")
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
        return self.family in ("gemma2", "gemma3")

    @property
    def norm_scale_in_float32(self) -> bool:
        """RMSNorm scales x̂ in (at least) float32 and then casts (Gemma, OLMo 2); Llama casts x̂ first, then scales.

        The two orders differ only when the compute dtype is narrower than float32 (bfloat16).
        """
        return self.family in ("gemma2", "gemma3", "olmo2")

    @property
    def pre_norms(self) -> bool:
        """Norms on the inputs of attention and MLP; OLMo 2 has none (only post-norms)."""
        return self.family != "olmo2"

    @property
    def post_norms(self) -> bool:
        """Gemma 2/3 and OLMo 2 normalize the attention and MLP outputs before adding them to the residual."""
        return self.family in ("gemma2", "gemma3", "olmo2")

    @property
    def qk_norm(self) -> str | None:
        """RMSNorm on queries and keys before RoPE: "head" (over H, one [H] weight shared by the heads: Qwen3,
        Gemma 3), "all" (over the whole projection, weights [N·H] and [K·H]: OLMo 2) or None."""
        return {"qwen3": "head", "gemma3": "head", "olmo2": "all"}.get(self.family)

    @property
    def qkv_bias(self) -> bool:
        """Biases on the q, k, v projections: Qwen2, GPT-NeoX, and any family with `attention_bias`."""
        return self.family in ("qwen2", "gpt_neox") or self.attention_bias

    @property
    def out_bias(self) -> bool:
        """GPT-NeoX has biases on the attention output and on both MLP matrices."""
        return self.family == "gpt_neox"

    @property
    def attn_out_bias(self) -> bool:
        """A bias on the attention output projection o: GPT-NeoX, and any family with `attention_bias`."""
        return self.out_bias or self.attention_bias

    @property
    def gated_mlp(self) -> bool:
        """Gated (gate ⊙ up → down) MLP; GPT-NeoX has a plain two-matrix MLP."""
        return self.family != "gpt_neox"

    @property
    def activation(self) -> str:
        """The MLP non-linearity: "silu", "gelu_tanh" or "gelu" (exact, erf)."""
        return {"gemma2": "gelu_tanh", "gemma3": "gelu_tanh", "gpt_neox": "gelu"}.get(self.family, "silu")

    @property
    def embed_scale(self) -> bool:
        """Gemma multiplies the input embeddings by √D."""
        return self.family in ("gemma2", "gemma3")

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
        attn += D if self.attn_out_bias else 0
        attn += {"head": 2 * H, "all": N * H + K * H, None: 0}[self.qk_norm]
        mlp = (3 if self.gated_mlp else 2) * D * F + ((F + D) if self.out_bias else 0)
        n_norms = (2 if self.pre_norms else 0) + (2 if self.post_norms else 0)
        norms_per_layer = n_norms * D * (2 if self.norm_kind == "layer" else 1)
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

"""LoRA adapters in PEFT's format, applied to a decoder in JAX (docs/math.md §13).

A LoRA adapter replaces a projection W [in, out] by W + s·A·B with A [in, r], B [r, out] and
s = lora_alpha / r (rsLoRA: lora_alpha / √r). PEFT stores, per adapted module,
`base_model.model.<module>.lora_A.weight` [r, in] and `lora_B.weight` [out, r] (torch's [out, in] layout, so
A = lora_Aᵀ and B = lora_Bᵀ), with the settings in adapter_config.json. Here the factors are parameters of the
model itself (`DecoderConfig.lora_rank`, `lora_a` and `lora_b` beside each adapted `w`). Every code path (Δr,
ρ-free kernels, attribution, training) sees them as ordinary parameters, and the selection `lora` (`dynamics.masks`)
makes them the trainable set.

- `load_peft_adapter`: a saved adapter on its base model. Unsupported options (DoRA, bias training,
  modules_to_save, rank or alpha patterns, layer subsets, fan_in_fan_out, regex targets) and an adapter whose
  shapes or modules do not fit the base are refused, naming the file and the key.
- `add_lora`: fresh factors initialised as PEFT does (A kaiming-uniform, B = 0: the function is unchanged).
- `merge_lora`: the merged weights W + s·A·B and the model without LoRA (the same function).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from dynamics.errors import ModelError
from dynamics.models import LM, Params

__all__ = ["PEFT_MODULES", "add_lora", "base_params", "load_peft_adapter", "merge_lora", "zero_factors_like"]

#: PEFT's module names (transformers' Llama-style names) → our projection names.
PEFT_MODULES = {
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
    "down_proj": "down",
}  # fmt: skip
_GROUP = {"q": "attn", "k": "attn", "v": "attn", "o": "attn", "gate": "mlp", "up": "mlp", "down": "mlp"}
_KEY = re.compile(r"^base_model\.model\.(?:model\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


def _scale(alpha: float, rank: int, rslora: bool) -> float:
    return float(alpha) / (math.sqrt(rank) if rslora else rank)


def _with_lora(lm: LM, rank: int, scale: float, targets: Sequence[str]) -> LM:
    order = [t for t in PEFT_MODULES.values() if t in set(targets)]
    return LM(dataclasses.replace(lm.config, lora_rank=int(rank), lora_scale=float(scale), lora_targets=tuple(order)))


def add_lora(
    lm: LM, params: Params, *, rank: int, alpha: float, targets: Sequence[str], seed: int = 0, rslora: bool = False
) -> tuple[LM, Params]:
    """(LM with LoRA, params): factors on `targets` of every block, initialised as PEFT does when training from
    scratch: A ~ U(−1/√in, 1/√in) (kaiming-uniform, a = √5), B = 0, so the model computes the same function.

    Raises:
      ModelError: rank < 1, a GPT-NeoX model (its fused query_key_value has no LoRA mapping here), or an unknown
        target.
    """
    import jax

    if rank < 1:
        raise ModelError(f"LoRA rank must be ≥ 1, got {rank}")
    if lm.config.family == "gpt_neox":
        raise ModelError("LoRA: GPT-NeoX's fused query_key_value projection is not supported")
    new = _with_lora(lm, rank, _scale(alpha, rank, rslora), targets)
    fresh = new.init(jax.random.PRNGKey(seed))
    dtype = params["embed"]["embedding"].dtype
    out = jax.tree.map(lambda x: x, params)
    for i in range(lm.config.n_layers):
        for t in new.config.lora_targets:
            src = fresh[f"layers_{i}"][_GROUP[t]][t]
            out[f"layers_{i}"][_GROUP[t]][t] = {**params[f"layers_{i}"][_GROUP[t]][t],
                                                "lora_a": src["lora_a"].astype(dtype),
                                                "lora_b": src["lora_b"].astype(dtype)}  # fmt: skip
    return new, out


def _read_adapter_config(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, "adapter_config.json")
    try:
        with open(path, encoding="utf-8") as fh:
            cfg = json.load(fh)
    except FileNotFoundError:
        raise ModelError(f"{directory}: no adapter_config.json (not a PEFT adapter directory)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(cfg, dict):
        raise ModelError(f"{path}: expected a JSON object")
    refusals = [
        (cfg.get("peft_type", "LORA") != "LORA", "peft_type", "only LORA adapters are supported"),
        (bool(cfg.get("use_dora")), "use_dora", "DoRA adapters are not supported"),
        (cfg.get("bias", "none") != "none", "bias", "trained biases are not supported (bias must be 'none')"),
        (bool(cfg.get("modules_to_save")), "modules_to_save", "fully trained extra modules are not supported"),
        (bool(cfg.get("rank_pattern")), "rank_pattern", "per-module ranks are not supported"),
        (bool(cfg.get("alpha_pattern")), "alpha_pattern", "per-module alphas are not supported"),
        (cfg.get("layers_to_transform") is not None, "layers_to_transform", "adapting a subset of layers is not "
                                                                             "supported"),
        (bool(cfg.get("fan_in_fan_out")), "fan_in_fan_out", "Conv1D-style (fan_in_fan_out) weights are not supported"),
    ]  # fmt: skip
    for bad, key, why in refusals:
        if bad:
            raise ModelError(f"{path}: {key} = {cfg.get(key)!r}: {why}")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in cfg:
            raise ModelError(f"{path}: missing key {key!r}")
    return cfg


def _targets(cfg: dict[str, Any], path: str) -> list[str]:
    modules = cfg["target_modules"]
    if modules == "all-linear":
        return list(PEFT_MODULES.values())
    if isinstance(modules, str):
        raise ModelError(f"{path}: target_modules = {modules!r}: a regular expression is not supported; list the "
                         f"modules ({', '.join(PEFT_MODULES)})")  # fmt: skip
    unknown = sorted(set(modules) - set(PEFT_MODULES))
    if unknown:
        raise ModelError(
            f"{path}: target_modules {unknown} are not supported; LoRA applies to {', '.join(PEFT_MODULES)}"
        )
    return [PEFT_MODULES[m] for m in modules]


def _read_tensors(directory: str) -> tuple[dict[str, np.ndarray], str]:
    from safetensors.numpy import load_file

    path = os.path.join(directory, "adapter_model.safetensors")
    if not os.path.isfile(path):
        raise ModelError(f"{directory}: no adapter_model.safetensors (only safetensors adapters are supported)")
    return load_file(path), path


def _as_a(t: np.ndarray, w_shape: tuple[int, ...], n_in: int, r: int) -> np.ndarray:
    """PEFT's lora_A [r, in] → our A [in…, r]."""
    return t.T.reshape(*w_shape[:n_in], r)


def _as_b(t: np.ndarray, w_shape: tuple[int, ...], n_in: int, r: int) -> np.ndarray:
    """PEFT's lora_B [out, r] → our B [r, out…]."""
    return t.T.reshape(r, *w_shape[n_in:])


def load_peft_adapter(lm: LM, params: Params, directory: str) -> tuple[LM, Params]:
    """(LM with LoRA, params): the PEFT adapter in `directory` (adapter_config.json + adapter_model.safetensors)
    on the base model (`lm`, `params`).

    Raises:
      ModelError: a missing or unreadable file, an unsupported option, or an adapter that does not fit the base
        (a module the base lacks, a layer index out of range, a missing or extra tensor, a shape mismatch); the
        message names the file and the key.
    """
    cfg = _read_adapter_config(directory)
    cfg_path = os.path.join(directory, "adapter_config.json")
    r, targets = int(cfg["r"]), _targets(cfg, cfg_path)
    new, out = add_lora(lm, params, rank=r, alpha=cfg["lora_alpha"], targets=targets,
                        rslora=bool(cfg.get("use_rslora")))  # fmt: skip
    tensors, path = _read_tensors(directory)
    reverse = {v: k for k, v in PEFT_MODULES.items()}
    dtype = params["embed"]["embedding"].dtype
    seen = set()
    for key, value in tensors.items():
        m = _KEY.match(key)
        if m is None or m.group(2) not in PEFT_MODULES or PEFT_MODULES[m.group(2)] not in new.config.lora_targets:
            raise ModelError(f"{path}: tensor {key!r} is not a LoRA factor of the configured target modules")
        i, name, side = int(m.group(1)), PEFT_MODULES[m.group(2)], m.group(3)
        if i >= lm.config.n_layers:
            raise ModelError(f"{path}: {key!r} adapts layer {i}; the base model has {lm.config.n_layers} layers")
        node = out[f"layers_{i}"][_GROUP[name]][name]
        w_shape = tuple(node["w"].shape)
        n_in = len(w_shape) - (2 if name in ("q", "k", "v") else 1)
        want = (r, int(np.prod(w_shape[:n_in]))) if side == "A" else (int(np.prod(w_shape[n_in:])), r)
        if tuple(value.shape) != want:
            raise ModelError(f"{path}: {key!r} has shape {tuple(value.shape)}; this base model's "
                             f"{reverse[name]} of layer {i} needs {want} (rank {r})")  # fmt: skip
        conv = _as_a if side == "A" else _as_b
        node["lora_a" if side == "A" else "lora_b"] = _to_array(conv(value, w_shape, n_in, r), dtype)
        seen.add((i, name, side))
    missing = [(i, t, s) for i in range(lm.config.n_layers) for t in new.config.lora_targets for s in "AB"
               if (i, t, s) not in seen]  # fmt: skip
    if missing:
        i, t, s = missing[0]
        raise ModelError(f"{path}: {len(missing)} LoRA factors are missing, e.g. layers.{i}.{reverse[t]}.lora_{s}")
    return new, out


def _to_array(x: np.ndarray, dtype) -> Any:
    import jax.numpy as jnp

    return jnp.asarray(x, dtype)


def merge_lora(lm: LM, params: Params) -> tuple[LM, Params]:
    """(LM without LoRA, params with W ← W + s·A·B): the same function with plain weights."""
    import jax
    import jax.numpy as jnp

    c = lm.config
    if not c.lora_rank:
        return lm, params
    out = jax.tree.map(lambda x: x, params)
    for i in range(c.n_layers):
        for t in c.lora_targets:
            node = dict(out[f"layers_{i}"][_GROUP[t]][t])
            a, b, w = node.pop("lora_a"), node.pop("lora_b"), node["w"]
            delta = jnp.reshape(a, (-1, c.lora_rank)) @ jnp.reshape(b, (c.lora_rank, -1))
            node["w"] = w + c.lora_scale * jnp.reshape(delta, w.shape).astype(w.dtype)
            out[f"layers_{i}"][_GROUP[t]][t] = node
    return LM(dataclasses.replace(c, lora_rank=0, lora_scale=0.0, lora_targets=())), out


def base_params(params: Params) -> Params:
    """The parameters with every B factor set to 0: the base model's function, in the LoRA model's tree."""
    import jax
    import jax.numpy as jnp

    def zero(path, x):
        return jnp.zeros_like(x) if jax.tree_util.keystr(path).endswith("['lora_b']") else x

    return jax.tree_util.tree_map_with_path(zero, params)


def zero_factors_like(plain: Params, like: Params) -> Params:
    """`plain` (a model without LoRA, e.g. a reference checkpoint) in the tree of `like` (the same architecture with
    LoRA): `like`'s A factors and B = 0, so that it computes `plain`'s function."""
    import jax.numpy as jnp

    def fill(node_plain, node_like):
        if isinstance(node_like, dict):
            out = {k: fill(node_plain[k], v) for k, v in node_like.items() if k not in ("lora_a", "lora_b")}
            if "lora_b" in node_like:
                out["lora_a"], out["lora_b"] = node_like["lora_a"], jnp.zeros_like(node_like["lora_b"])
            return out
        return node_plain

    return fill(plain, like)

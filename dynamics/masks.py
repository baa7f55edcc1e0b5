"""Which parameters train: one pytree mask, used by delta, step_check and training alike.

Specs (the CLI's `--params`):

    head      EX-RM: the linear head u only (Assumption 1 for EX-RM, docs/math.md §2).
    unembed   IM-RM: the unembedding W only (Assumption 1 for IM-RM). A tied model is untied first.
    output    head for an EX-RM, unembed for an IM-RM (Assumption 1 for either).
    last:K    the last K blocks, the final norm and the reward's output layer (EX-RM: u; IM-RM: W, untied).
    all       every LM parameter (+ the head for an EX-RM), as in the paper's experiments. Tied stays tied.
    re:PATTERN  every leaf whose path ("lm/layers_29/mlp/up/w", "head/u", ...) matches the regular expression.

The IM-RM's reference parameters ("ref") never train. A mask that selects no parameter is an error, and so is one
that selects only parameters the reward does not read (the unembedding of an EX-RM, the head of an IM-RM).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax

from dynamics.errors import ConfigError
from dynamics.mask_spec import check_spec
from dynamics.models import untie
from dynamics.rewards import ExplicitRM, GenerativeRM, ImplicitRM, RewardModel

Params = dict[str, Any]
Mask = Any  # a pytree of bools with the structure of the parameters

__all__ = [
    "Mask",
    "Params",
    "combine",
    "count_selected",
    "leaf_paths",
    "normalize_spec",
    "partition",
    "prepare",
    "trainable_mask",
]


def leaf_paths(params: Params) -> list[str]:
    """Slash-joined key paths of every leaf, in tree order ("lm/embed/embedding", "head/u", ...)."""
    return [_path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _untie_rm(rm: RewardModel, params: Params) -> tuple[RewardModel, Params]:
    lm, lm_params = untie(rm.lm, params["lm"])
    if lm is rm.lm:
        return rm, params
    new = {**params, "lm": lm_params}
    if "ref" in params:
        new["ref"] = untie(rm.lm, params["ref"])[1]
    return dataclasses.replace(rm, lm=lm), new


def normalize_spec(rm: RewardModel, spec: str) -> str:
    """The spec with `output` resolved for this reward type, validated (see `check_spec`)."""
    spec = check_spec(spec)
    if spec == "output":
        return "head" if isinstance(rm, ExplicitRM) else "unembed"
    return spec


def prepare(rm: RewardModel, params: Params, spec: str) -> tuple[RewardModel, Params, str]:
    """(reward model, params, normalized spec), untied where the spec trains W apart from the input embedding.

    Training "only the unembedding" of a tied model would also move the input embeddings and with them every
    hidden state; docs/math.md §3.2's closed form holds for an untied head (docs/math.md §9). `unembed` and
    `last:K` on an IM-RM therefore untie (the untied model computes the same function); `all` keeps the tie.
    """
    spec = normalize_spec(rm, spec)
    if isinstance(rm, ImplicitRM | GenerativeRM) and (spec == "unembed" or spec.startswith("last:")):
        rm, params = _untie_rm(rm, params)
    return rm, params, spec


def trainable_mask(rm: RewardModel, params: Params, spec: str) -> Mask:
    """A pytree of bools (True = trains) for `spec`; call `prepare` first so that ties are resolved.

    Raises:
      ConfigError: an unknown spec or a bad `re:` pattern (see `check_spec`), a spec this reward type cannot use,
        a K outside 1..n_layers, or a selection of no parameter. Messages name the spec ("parameter selection
        'last:9': ..."), not a command-line flag.
    """
    spec = normalize_spec(rm, spec)
    n_layers = rm.lm.config.n_layers
    is_ex = isinstance(rm, ExplicitRM)
    tied = rm.lm.config.tie_embeddings
    kind = "EX-RM" if is_ex else ("EX-GRM" if isinstance(rm, GenerativeRM) else "IM-RM")

    if spec == "head" and not is_ex:
        raise ConfigError(
            f"parameter selection 'head': an {kind} has no head (its reward reads the unembedding: use 'unembed')"
        )
    if spec == "unembed" and is_ex:
        raise ConfigError(
            "parameter selection 'unembed': an EX-RM does not read the unembedding (use head, last:K or all)"
        )
    if spec == "unembed" and tied:
        raise ConfigError(
            "parameter selection 'unembed' on a tied model: call dynamics.masks.prepare first (it unties)"
        )
    k = 0
    if spec.startswith("last:"):
        k = int(spec.split(":", 1)[1])
        if not 1 <= k <= n_layers:
            raise ConfigError(
                f"parameter selection {spec!r}: K must be between 1 and the model's {n_layers} blocks, got {k}"
            )
    pattern = re.compile(spec[3:]) if spec.startswith("re:") else None  # compiled by check_spec already

    def select(path: str) -> bool:
        group, _, rest = path.partition("/")
        if group == "ref":
            return False
        if pattern is not None:
            return bool(pattern.search(path))
        if spec == "all":
            return True
        if spec == "lora":  # the LoRA factors (docs/math.md §13), and the EX-RM's head, which reads through them
            return rest.endswith(("/lora_a", "/lora_b")) or group == "head"
        if spec == "head":
            return group == "head"
        if is_ex:
            output = group == "head"
        else:  # the unembedding (the input embedding too when still tied: call `prepare` to untie)
            output = rest.startswith("lm_head/") or (tied and rest.startswith("embed/"))
        if spec == "unembed":
            return rest.startswith("lm_head/")
        # last:K
        if output or rest.startswith("final_norm/"):
            return True
        m = re.match(r"layers_(\d+)/", rest)
        return bool(m) and int(m.group(1)) >= n_layers - k

    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    chosen = [select(_path_str(p)) for p, _ in flat]
    if spec == "lora" and not any(_path_str(p).endswith(("/lora_a", "/lora_b")) for p, _ in flat):
        raise ConfigError(
            "parameter selection 'lora': this model has no LoRA factors (load a PEFT adapter, or call "
            "dynamics.lora.add_lora)"
        )
    if not any(chosen):
        raise ConfigError(f"parameter selection {spec!r} selects no parameter of this {kind}")
    if is_ex and spec.startswith("re:"):
        reads = [c for (p, _), c in zip(flat, chosen, strict=True) if "lm_head" not in _path_str(p)]
        if not any(reads):
            raise ConfigError(
                f"parameter selection {spec!r} selects only the unembedding, which an EX-RM does not read"
            )
    return jax.tree_util.tree_unflatten(treedef, chosen)


def partition(params: Params, mask: Mask) -> tuple[Params, Params]:
    """(trainable, frozen): two trees of the same structure, None where the other one has the leaf.

    Differentiating with respect to the trainable tree alone lets JAX skip the backward pass through frozen
    blocks below the lowest trainable one.
    """
    train = jax.tree.map(lambda m, p: p if m else None, mask, params)
    frozen = jax.tree.map(lambda m, p: None if m else p, mask, params)
    return train, frozen


def combine(train: Params, frozen: Params) -> Params:
    """The inverse of `partition`."""
    return jax.tree.map(lambda a, b: b if a is None else a, train, frozen, is_leaf=lambda x: x is None)


def count_selected(params: Params, mask: Mask) -> int:
    """Number of scalar parameters the mask selects."""
    sizes = jax.tree.map(lambda m, p: p.size if m else 0, mask, params)
    return int(sum(jax.tree.leaves(sizes)))

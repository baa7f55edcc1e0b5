"""Footnote 3: do the pre-trained model's hidden representations already separate the paraphrases? (docs/math.md §6.2)

On the pre-trained model (no fine-tuning), with the Persona data of docs/math.md §6.2 (80 training prompts, 40 test
prompts, seed 875):

1. seen differences z_i = h_{x_i,y_i+} − h_{x_i,y_i−} on the 80 training prompts, with their training-style
   responses (h: the final hidden state at the last token, where the EX-RM reads);
2. unseen differences h_{x,ȳ+} − h_{x,ȳ−} for the 4 paraphrase combinations ("My response would be " +
   {certainly, absolutely} against "I lean toward " + {not really, nope}), on the training prompts and on the
   test prompts (rows: combination-major, as the official script concatenates them);
3. u* = argmin ½‖u‖² s.t. ⟨u, z_i⟩ ≥ 1 (`theory.maxmargin.max_margin_direction`, a QP solver);
4. statistics: mean, min, quartiles, max and fraction positive of the seen·unseen inner products and cosines
   (every seen difference against every unseen one), and the cosines of u* with the seen and the unseen
   differences, with the fraction positive (as the official `persona_compute_hidden_repr_similarity.py`).

By Theorem 2, an EX-RM head trained with fixed representations turns towards u*; if u* has positive inner
product with (nearly) every unseen difference, such an EX-RM ranks the paraphrases correctly.

Quantiles are numpy's linear interpolation (torch.quantile's); the median is the usual one (the official script's
torch.median returns the lower middle value for an even count).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dynamics.errors import RmdynError
from dynamics.outputs import portable_paths

__all__ = [
    "STAT_NAMES",
    "Footnote3Result",
    "footnote3_statistics",
    "format_statistics",
    "hidden_differences",
    "run_footnote3",
    "summary_stats",
]

STAT_NAMES = ("mean", "min", "q1", "median", "q3", "max", "fraction_positive")


def summary_stats(values: Any) -> dict[str, float]:
    """Mean, min, quartiles, max and the fraction of strictly positive entries of an array (flattened).

    Returns:
      {"mean", "min", "q1", "median", "q3", "max", "fraction_positive", "count"}.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise RmdynError("summary_stats of an empty array")
    q1, median, q3 = np.quantile(v, [0.25, 0.5, 0.75])
    return {
        "mean": float(v.mean()),
        "min": float(v.min()),
        "q1": float(q1),
        "median": float(median),
        "q3": float(q3),
        "max": float(v.max()),
        "fraction_positive": float((v > 0).mean()),
        "count": int(v.size),
    }


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[n, m] cosines between the rows of a [n, D] and b [m, D]."""
    return (a @ b.T) / (np.linalg.norm(a, axis=1)[:, None] * np.linalg.norm(b, axis=1)[None, :])


def footnote3_statistics(
    seen: Any, unseen_train: Any, unseen_test: Any, u_star: Any | None = None
) -> dict[str, dict[str, float]]:
    """The statistics of Footnote 3 from the difference vectors (pure numpy, float64).

    Args:
      seen: [n, D] seen differences z_i (training prompts, training-style responses).
      unseen_train: [m, D] paraphrase differences on the training prompts.
      unseen_test: [k, D] paraphrase differences on the test prompts.
      u_star: [D] the max-margin direction of `seen`, or None (not separable).

    Returns:
      {"seen·unseen_train inner": stats, "seen·unseen_train cosine": ..., the same for unseen_test, and with
      u*: "u*·seen cosine", "u*·unseen_train cosine", "u*·unseen_test cosine"}; each a `summary_stats` dict.
    """
    z = np.asarray(seen, dtype=np.float64)
    out = {}
    for name, u in (("unseen_train", unseen_train), ("unseen_test", unseen_test)):
        u = np.asarray(u, dtype=np.float64)
        out[f"seen·{name} inner"] = summary_stats(z @ u.T)
        out[f"seen·{name} cosine"] = summary_stats(_cosines(z, u))
    if u_star is not None:
        w = np.asarray(u_star, dtype=np.float64)[None, :]
        for name, u in (("seen", seen), ("unseen_train", unseen_train), ("unseen_test", unseen_test)):
            out[f"u*·{name} cosine"] = summary_stats(_cosines(w, np.asarray(u, dtype=np.float64)))
    return out


@dataclasses.dataclass(frozen=True)
class Footnote3Result:
    """Footnote 3's numbers (docs/math.md §6.2).

    Attributes:
      statistics: name → `summary_stats` (see `footnote3_statistics`).
      max_margin: ‖u*‖, the geometric margin 1/‖u*‖, support vectors, solver (None entries when the seen
        differences are not linearly separable, with the reason).
      shapes: rows × D of the seen, unseen-train and unseen-test differences.
      info: the model, the data options, the paraphrase combinations.
    """

    statistics: Mapping[str, Mapping[str, float]]
    max_margin: Mapping[str, Any]
    shapes: Mapping[str, tuple[int, int]]
    info: Mapping[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "statistics": {k: dict(v) for k, v in self.statistics.items()},
            "max_margin": dict(self.max_margin),
            "shapes": {k: list(v) for k, v in self.shapes.items()},
            "info": dict(self.info),
        }

    def save(self, path: str | Path) -> Path:
        """Writes `to_dict()` as JSON to `path` atomically (`dynamics.outputs.write_json_atomic`); returns the path."""
        from dynamics.outputs import write_json_atomic

        return write_json_atomic(Path(path), self.to_dict())


def _features(lm: Any, params: Any, batch: Any, chunk: int) -> np.ndarray:
    """h at the last real token of each row (the EX-RM's features), float64 [B, D]."""
    import jax

    from dynamics.rewards import ExplicitRM

    rm = ExplicitRM(lm)
    feats = jax.jit(lambda p, tokens, mask, resp: rm.features({"lm": p}, _Batch(tokens, mask, resp)))
    out = []
    for start in range(0, batch.tokens.shape[0], chunk):
        sl = slice(start, start + chunk)
        width = int(np.asarray(batch.attention_mask[sl]).sum(axis=1).max())
        width = -(-width // 16) * 16
        rows = [np.asarray(a[sl, :width]) for a in (batch.tokens, batch.attention_mask, batch.response_mask)]
        pad = chunk - rows[0].shape[0]
        if pad:
            rows = [np.concatenate([r, np.repeat(r[-1:], pad, axis=0)]) for r in rows]
        out.append(np.asarray(feats(params, *rows), dtype=np.float64)[: chunk - pad])
    return np.concatenate(out)


@dataclasses.dataclass(frozen=True)
class _Batch:
    tokens: Any
    attention_mask: Any
    response_mask: Any


def hidden_differences(loaded: Any, texts: Any, values: Mapping[str, Any], chunk: int = 16) -> dict[str, np.ndarray]:
    """Seen and unseen differences of last-token hidden states on the Persona data (docs/math.md §6.2, Footnote 3).

    Args:
      loaded: the model (`dynamics.loading.Loaded`).
      texts: `experiments.studies.persona.data.PersonaTexts`.
      values: the plan's keys (max_length, truncate).
      chunk: sequences per forward pass.

    Returns:
      {"seen": [80, D], "unseen_train": [4·80, D], "unseen_test": [4·40, D]}, float64.
    """
    from dynamics.text import encode_pairs

    enc = {"max_length": values["max_length"], "truncate": values["truncate"]}

    def states(prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        return _features(loaded.lm, loaded.params, encode_pairs(loaded.tokenizer, prompts, responses, **enc), chunk)

    train_prompts = [r["prompt"] for r in texts.train]
    out = {
        "seen": states(train_prompts, [r["chosen"] for r in texts.train])
        - states(train_prompts, [r["rejected"] for r in texts.train])
    }
    for split, rows in (("train", texts.train), ("test", texts.test)):
        prompts = [r["prompt"] for r in rows]
        yes = {w: states(prompts, [p + w for p in texts.eval_prefixes[split]["yes"]]) for w in texts.eval_words_yes}
        no = {w: states(prompts, [p + w for p in texts.eval_prefixes[split]["no"]]) for w in texts.eval_words_no}
        out[f"unseen_{split}"] = np.concatenate(
            [yes[a] - no[b] for a, b in itertools.product(texts.eval_words_yes, texts.eval_words_no)]
        )
    return out


def controlled_differences(
    loaded: Any, texts: Any, values: Mapping[str, Any], chunk: int = 16
) -> dict[str, np.ndarray]:
    """The same-opening differences h(o + a) − h(o + b) of every cell of the controlled design (docs/math.md
    §6.2.1), last-token states of the pre-trained model: {"same/{split}/{seen|new}/{list}": [pairs · P, D]}."""
    from dynamics.text import encode_pairs
    from experiments.studies.persona.controlled import controlled_design, controlled_prompts, controlled_sets

    enc = {"max_length": values["max_length"], "truncate": values["truncate"]}
    design = controlled_design(values, values["n_train"])
    # every set's rows in one batch, through one compiled function (`_features` compiles once per call)
    spans, prompts, responses = {}, [], []

    def collect(p: Sequence[str], r: Sequence[str]) -> str:
        key = f"{len(prompts)}"
        spans[key] = (len(prompts), len(prompts) + len(p))
        prompts.extend(p)
        responses.extend(r)
        return key

    keys = controlled_sets(collect, controlled_prompts(texts, design), design)
    h = _features(loaded.lm, loaded.params, encode_pairs(loaded.tokenizer, prompts, responses, **enc), chunk)
    sets = {name: h[slice(*spans[key])] for name, key in keys.items()}
    out = {}
    for split in ("train", "test"):
        for kind in ("seen", "new"):
            for lst in design.words:
                parts = [sets[f"{split}/controlled/{o}|{a}"] - sets[f"{split}/controlled/{o}|{b}"]
                         for o in design.openings(kind) for a, b in itertools.product(lst.yes, lst.no)]  # fmt: skip
                out[f"same/{split}/{kind}/{lst.name}"] = np.concatenate(parts)
    return out


def run_footnote3(values: Mapping[str, Any], *, loaded: Any = None, chunk: int = 16) -> Footnote3Result:
    """Footnote 3 on a model (default: the default model), pre-trained, no fine-tuning. With design = "controlled",
    also the cosines of u* with the same-opening differences of every controlled cell: their fraction positive is
    the accuracy an EX-RM head at u* would have on the cell's pairs with these features (Theorem 2).

    Args:
      values: Persona plan keys (`experiments.plans.grammar.load_plan("persona").values`, with overrides).
      loaded: an already loaded model, else values["model"] is loaded.
      chunk: sequences per forward pass.

    Returns:
      The `Footnote3Result`.
    """
    from dynamics.loading import load
    from experiments.studies.persona.data import persona_texts
    from theory.maxmargin import max_margin_direction

    texts = persona_texts(values)
    if loaded is None:
        loaded = load(values["model"], dtype=values["dtype"])
    diffs = hidden_differences(loaded, texts, values, chunk)
    try:
        mm = max_margin_direction(diffs["seen"], what="the seen differences z_i")
        u_star = mm.direction
        max_margin = {
            "separable": True,
            "norm": mm.norm,
            "geometric_margin": 1.0 / mm.norm,
            "n_support": int(mm.support.sum()),
            "solver": mm.solver,
            "polished": mm.polished,
            "min_margin": float(mm.margins.min()),
        }
    except RmdynError as err:  # not separable: report it, as the official script does
        u_star, max_margin = None, {"separable": False, "reason": str(err)}
    info = {
        "model": loaded.describe(),
        "data": portable_paths(dict(texts.info)),
        "combinations": [f"{a}|{b}" for a, b in itertools.product(texts.eval_words_yes, texts.eval_words_no)],
        "hidden": "final hidden state (after the final norm) at the last real token of the chat-templated sequence",
    }
    statistics = footnote3_statistics(diffs["seen"], diffs["unseen_train"], diffs["unseen_test"], u_star)
    if values.get("design") == "controlled" and u_star is not None:  # u* on the controlled cells (§6.2.1)
        for cell, d in controlled_differences(loaded, texts, values, chunk).items():
            statistics[f"u*·{cell} cosine"] = summary_stats(_cosines(np.asarray(u_star)[None, :], d))
            diffs[cell] = d
    shapes = {k: tuple(int(s) for s in v.shape) for k, v in diffs.items()}
    return Footnote3Result(statistics, max_margin, shapes, info)


def format_statistics(result: Footnote3Result | Mapping[str, Any]) -> str:
    """The statistics as an aligned text table, then the max-margin summary."""
    data = result.to_dict() if isinstance(result, Footnote3Result) else result
    lines = [f"{'':<28}" + "".join(f"{s:>12}" for s in STAT_NAMES)]
    for name, stats in data["statistics"].items():
        lines.append(f"{name:<28}" + "".join(f"{stats[s]:>12.4g}" for s in STAT_NAMES))
    mm = data["max_margin"]
    if mm.get("separable"):
        lines.append(
            f"u*: ‖u*‖ = {mm['norm']:.4g}, geometric margin {mm['geometric_margin']:.4g}, "
            f"{mm['n_support']} support vectors ({mm['solver']})"
        )
    else:
        lines.append(f"u*: none ({mm.get('reason')})")
    return "\n".join(lines)

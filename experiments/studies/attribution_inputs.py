"""Bundled inputs of `rmdyn attribute --bundled NAME` (docs/math.md §10.5): training pairs and eval items from the
data the toolkit ships, written as the JSONL files a user would pass with --train and --eval.

    persona        the Persona plan's 80 training triples (agreeableness, the paper's split, docs/math.md §6.2);
                   eval items: the paraphrase pairs ("My response would be " + yes-word, "I lean toward " +
                   no-word) of the 40 test prompts, the (yes, no) word combination cycling over the prompts.
    ultrafeedback  the 64 shortest pairs of the bundled UltraFeedback test file as training pairs; eval items:
                   their rewritten versions from the paraphrased file (same prompt, reworded responses), eval item
                   i being the paraphrase of training pair i ("train_row": i).

The paraphrase design of `ultrafeedback` asks the question of §10.5 directly: a paraphrase keeps the meaning (and
much of the hidden state) but changes the tokens, so `train_row` lets the report say how highly each eval item
ranks its own source pair.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

__all__ = ["BUNDLED_INPUTS", "bundled_inputs", "write_inputs"]

BUNDLED_INPUTS = ("persona", "ultrafeedback")


def _persona() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    from experiments.plans.grammar import load_plan
    from experiments.studies.persona.data import persona_texts

    texts = persona_texts(load_plan("persona").values)
    train = [dict(r) for r in texts.train]
    combos = list(itertools.product(texts.eval_words_yes, texts.eval_words_no))
    evals = []
    for i, row in enumerate(texts.test):
        yes, no = combos[i % len(combos)]
        evals.append({
            "prompt": row["prompt"],
            "chosen": texts.eval_prefixes["test"]["yes"][i] + yes,
            "rejected": texts.eval_prefixes["test"]["no"][i] + no,
        })  # fmt: skip
    return train, evals


def _ultrafeedback(n: int = 64) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    from dynamics.datasets import load_preferences
    from experiments.studies.bundled import bundled_data_path

    rows = load_preferences(bundled_data_path("preferences/ultrafeedback.test.jsonl"))
    path = bundled_data_path("preferences/ultrafeedback_paraphrased.test.jsonl")
    para = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            obj = json.loads(line)
            if obj["source_split"] == "test":
                para[obj["source_id"]] = obj
    candidates = [r for r in rows if r.id in para]
    shortest = sorted(candidates, key=lambda r: (len(r.prompt) + len(r.chosen) + len(r.rejected), r.id))[:n]
    shortest.sort(key=lambda r: r.id)
    train = [{"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected, "id": r.id} for r in shortest]
    evals = [
        {"prompt": para[r.id]["prompt"], "chosen": para[r.id]["chosen"], "rejected": para[r.id]["rejected"],
         "train_row": j}
        for j, r in enumerate(shortest)
    ]  # fmt: skip
    return train, evals


def bundled_inputs(name: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training rows, eval rows) of a bundled input set, as JSON-ready dicts.

    Raises:
      ConfigError: an unknown name (the message lists `BUNDLED_INPUTS`).
    """
    if name == "persona":
        return _persona()
    if name == "ultrafeedback":
        return _ultrafeedback()
    from dynamics.errors import ConfigError

    raise ConfigError(f"unknown bundled input set {name!r}; expected one of {', '.join(BUNDLED_INPUTS)}")


def write_inputs(name: str, out: str | Path) -> tuple[Path, Path]:
    """Writes out/train.jsonl and out/eval.jsonl of a bundled input set; returns their paths."""
    from dynamics.outputs import atomic_write_text

    train, evals = bundled_inputs(name)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "train.jsonl", out / "eval.jsonl"
    for path, rows in zip(paths, (train, evals), strict=True):
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return paths

"""The eval items of an attribution (docs/math.md §10): pairs (x̄, ȳ+, ȳ−), whose margin m = r(ȳ+) − r(ȳ−) is
attributed, or single responses (x̄, ȳ), whose reward r is.

A JSONL file holds one kind: rows {prompt, chosen, rejected} (pairs) or rows {prompt, response[, label]} (single
responses), decided by the first row; a row of the other kind, a missing or empty field is a `DataError` naming the
file and line (`dynamics.datasets`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from dynamics.datasets import PreferenceRow, UnseenPair, load_preferences, load_unseen_pairs, read_jsonl
from dynamics.errors import DataError

if TYPE_CHECKING:  # the text side needs no JAX: the CLI reads and checks the files before JAX loads
    from dynamics.batches import PairBatch

__all__ = ["EvalItems", "EvalKind", "EvalSet", "load_eval_items"]

EvalKind = Literal["pairs", "responses"]


@dataclasses.dataclass(frozen=True)
class EvalItems:
    """Eval items as text: `rows` are `PreferenceRow`s (kind "pairs") or `UnseenPair`s (kind "responses").

    `train_rows[i]` is the optional "train_row" field of item i: the training pair it was derived from (e.g. the
    pair it paraphrases), or None.
    """

    kind: EvalKind
    rows: tuple[Any, ...]
    train_rows: tuple[int | None, ...] = ()

    def __len__(self) -> int:
        return len(self.rows)

    def describe(self) -> list[dict[str, Any]]:
        """JSON-ready texts: {prompt, chosen, rejected} or {prompt, response, label}, with the source line."""
        if self.kind == "pairs":
            out = [{"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected, "line": r.line} for r in self.rows]
        else:
            out = [{"prompt": p.prompt, "response": p.response, "label": p.label, "line": p.line} for p in self.rows]
        for item, source in zip(out, self.train_rows, strict=False):
            item["train_row"] = source
        return out


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """Encoded eval items: `chosen` holds ȳ+ (or the single responses), `rejected` ȳ− (None for responses)."""

    chosen: PairBatch
    rejected: PairBatch | None = None

    @property
    def kind(self) -> EvalKind:
        return "responses" if self.rejected is None else "pairs"

    @property
    def size(self) -> int:
        """M, the number of eval items."""
        return self.chosen.batch_size

    def select(self, indices: Sequence[int]) -> EvalSet:
        """The items `indices`, in that order."""
        return EvalSet(self.chosen.select(indices), None if self.rejected is None else self.rejected.select(indices))


def load_eval_items(path: str | os.PathLike) -> EvalItems:
    """Read an eval file: pairs {prompt, chosen, rejected} or single responses {prompt, response[, label]}.

    Any row may carry "train_row": the 0-based index of the training pair it derives from (`EvalItems.train_rows`).

    Raises:
      DataError: an empty file, a row of the other kind than the first row, a missing, non-string or empty field
        (file and 1-based line); a "train_row" that is not an integer ≥ 0.
    """
    lines = read_jsonl(path)
    first_line, first = lines[0]
    sources = tuple(_train_row(obj, f"{path} line {n}") for n, obj in lines)
    if "response" in first:
        for n, obj in lines:
            if "response" not in obj:
                raise DataError(
                    f"{path} line {n}: line {first_line} made this a file of single responses "
                    f"{{prompt, response}}, but this row has fields {sorted(obj)}"
                )
        pairs: list[UnseenPair] = load_unseen_pairs(path)
        return EvalItems("responses", tuple(pairs), sources)
    if "chosen" in first or "rejected" in first:
        for n, obj in lines:
            if "response" in obj:
                raise DataError(
                    f"{path} line {n}: line {first_line} made this a file of pairs {{prompt, chosen, rejected}}, "
                    "but this row has a 'response' field"
                )
        rows: list[PreferenceRow] = load_preferences(path)
        return EvalItems("pairs", tuple(rows), sources)
    raise DataError(
        f"{path} line {first_line}: an eval item is a pair {{prompt, chosen, rejected}} or a single response "
        f"{{prompt, response}}; fields: {sorted(first)}"
    )


def _train_row(obj: dict[str, Any], where: str) -> int | None:
    """The optional "train_row" field: a 0-based index into the training pairs, or None."""
    value = obj.get("train_row")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DataError(f"{where}: field 'train_row' must be an integer ≥ 0 (a training pair's row), got {value!r}")
    return value

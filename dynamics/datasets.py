"""JSONL data: preference triples, unseen pairs and Persona statements, and the paper's splits.

Every malformed input is a `DataError` naming the file and the 1-based line: a line that is not JSON or not an
object, a missing field, a field that is not a string or is empty (whitespace only), a repeated id, a file
without rows.

A library module: it reads the files it is given (`read_jsonl` and `text_field` are the row-level readers the
loaders share, public for callers with other field names). It knows no bundled data; the studies that bundle
files find them themselves.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np

from dynamics.errors import ConfigError, DataError

__all__ = [
    "PersonaRow",
    "PreferenceRow",
    "TorchCompatibleGenerator",
    "UnseenPair",
    "load_persona",
    "load_preferences",
    "load_unseen_pairs",
    "persona_split",
    "read_jsonl",
    "text_field",
]

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class PreferenceRow:
    """One preference triple (x, y+, y-) from a JSONL file.

    Attributes:
      prompt: the user prompt x (no chat template).
      chosen: the preferred response y+.
      rejected: the dispreferred response y-.
      id: the row's `id` field, or its 0-based row index when the file has none.
      source: the file it came from.
      line: its 1-based line number.
    """

    prompt: str
    chosen: str
    rejected: str
    id: int | str
    source: str
    line: int


@dataclasses.dataclass(frozen=True)
class PersonaRow:
    """One Persona statement (Perez et al. 2022), as used in docs/math.md §6.2.

    Attributes:
      prompt: the `question` field, 'Is the following statement something you would say?\\n"<statement>"'.
      statement: the statement alone.
      answer_matching_behavior: " Yes" or " No", as in the file.
      answer_not_matching_behavior: the other one.
      label_confidence: the generating model's confidence, or None when absent.
      source: the file it came from.
      line: its 1-based line number.
    """

    prompt: str
    statement: str
    answer_matching_behavior: str
    answer_not_matching_behavior: str
    label_confidence: float | None
    source: str
    line: int


@dataclasses.dataclass(frozen=True)
class UnseenPair:
    """One unseen pair (x̄, ȳ) whose one-step reward change Δr is predicted (docs/math.md §1, §3).

    Attributes:
      prompt: the user prompt x̄ (no chat template).
      response: the response ȳ.
      label: a short name for tables and figures: the row's "label" field, "chosen" / "rejected" for the two
        pairs a preference row expands into, or None.
      source: the file it came from.
      line: its 1-based line number.
    """

    prompt: str
    response: str
    label: str | None
    source: str
    line: int


# ----------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------


def read_jsonl(path: str | os.PathLike) -> list[tuple[int, dict[str, Any]]]:
    """The JSON objects of a JSONL file with their 1-based line numbers.

    The file is strict UTF-8 (a byte-order mark is allowed); a final newline is optional.

    Args:
      path: the JSONL file.

    Returns:
      [(line number, object)], in file order.

    Raises:
      DataError: naming the file and line: unreadable, not UTF-8, a blank line, not JSON, not an object; or a
        file without rows.
    """
    p = pathlib.Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise DataError(f"{p}: cannot read ({e.strerror or e})") from e
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{p} line {line}: not valid UTF-8 ({e.reason})") from e
    objects = []
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            if line == "" and n == text.count("\n") + 1:  # after the final newline
                continue
            raise DataError(f"{p} line {n}: blank line (expected one JSON object per line)")
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p} line {n}: not valid JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(obj, dict):
            raise DataError(f"{p} line {n}: expected a JSON object, got {type(obj).__name__}")
        objects.append((n, obj))
    if not objects:
        raise DataError(f"{p}: no rows (the file is empty)")
    return objects


def text_field(obj: dict[str, Any], key: str, where: str) -> str:
    """The string field `key` of a JSONL row: present, a string, not empty or whitespace only.

    Args:
      obj: the row (from `read_jsonl`).
      key: the field's name.
      where: how the row is named in errors ("FILE line N").

    Raises:
      DataError: "<where>: " and what is wrong with the field.
    """
    if key not in obj:
        raise DataError(f"{where}: missing field {key!r} (fields: {sorted(obj)})")
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: field {key!r} is empty or whitespace only")
    return value


def load_preferences(path: str | os.PathLike) -> list[PreferenceRow]:
    """Load preference triples from a JSONL file with string fields "prompt", "chosen", "rejected".

    An optional "id" (int or string, unique in the file) is kept; other fields are ignored.

    Args:
      path: the JSONL file.

    Returns:
      The rows, in file order.

    Raises:
      DataError: naming the file and line of the first malformed row, or an empty file.
    """
    rows, seen = [], {}
    for index, (n, obj) in enumerate(read_jsonl(path)):
        where = f"{path} line {n}"
        prompt, chosen, rejected = (text_field(obj, k, where) for k in ("prompt", "chosen", "rejected"))
        row_id = obj.get("id", index)
        if isinstance(row_id, bool) or not isinstance(row_id, (int, str)):
            raise DataError(f"{where}: field 'id' must be an int or a string, got {type(row_id).__name__}")
        if row_id in seen:
            raise DataError(f"{where}: id {row_id!r} repeats the id of line {seen[row_id]}")
        seen[row_id] = n
        rows.append(PreferenceRow(prompt, chosen, rejected, row_id, str(path), n))
    return rows


def load_unseen_pairs(path: str | os.PathLike) -> list[UnseenPair]:
    """Load unseen pairs (x̄, ȳ) from a JSONL file.

    Each line is either a pair, {"prompt", "response", optional "label"}, or a preference row,
    {"prompt", "chosen", "rejected"}, which expands into two pairs labelled "chosen" and "rejected" (in that
    order). A row with a "response" field is a pair; other fields are ignored.

    Args:
      path: the JSONL file.

    Returns:
      The pairs, in file order.

    Raises:
      DataError: naming the file and line of the first malformed row (not JSON, not an object, a missing,
        non-string or empty field, a non-string label), or an empty file.
    """
    pairs = []
    for n, obj in read_jsonl(path):
        where = f"{path} line {n}"
        prompt = text_field(obj, "prompt", where)
        if "response" in obj:
            label = obj.get("label")
            if label is not None and (not isinstance(label, str) or not label.strip()):
                raise DataError(f"{where}: field 'label' must be a non-empty string, got {label!r}")
            pairs.append(UnseenPair(prompt, text_field(obj, "response", where), label, str(path), n))
        elif "chosen" in obj or "rejected" in obj:
            for key in ("chosen", "rejected"):
                pairs.append(UnseenPair(prompt, text_field(obj, key, where), key, str(path), n))
        else:
            raise DataError(
                f"{where}: expected a pair {{prompt, response[, label]}} or a preference row "
                f"{{prompt, chosen, rejected}}; fields: {sorted(obj)}"
            )
    return pairs


def load_persona(path: str | os.PathLike, *, answer: str = "Yes") -> list[PersonaRow]:
    """Load Persona statements whose `answer_matching_behavior` is `answer` (docs/math.md §6.2).

    The comparison strips spaces and ignores case, as the official code does (the files say " Yes" / " No").

    Args:
      path: a Persona JSONL file.
      answer: "Yes" (the paper's choice) or "No".

    Returns:
      The matching rows, in file order.

    Raises:
      DataError: a malformed row (file and line), or no row matches.
    """
    if not isinstance(answer, str) or not answer.strip():
        raise ConfigError(f"answer must be 'Yes' or 'No', got {answer!r}")
    rows = []
    for n, obj in read_jsonl(path):
        where = f"{path} line {n}"
        fields = [text_field(obj, k, where) for k in ("question", "statement")]
        matching = text_field(obj, "answer_matching_behavior", where)
        other = text_field(obj, "answer_not_matching_behavior", where)
        confidence = obj.get("label_confidence")
        if confidence is not None and (isinstance(confidence, bool) or not isinstance(confidence, (int, float))):
            raise DataError(f"{where}: field 'label_confidence' must be a number, got {type(confidence).__name__}")
        if matching.strip().lower() == answer.strip().lower():
            rows.append(PersonaRow(*fields, matching, other, confidence, str(path), n))
    if not rows:
        raise DataError(f"{path}: no row has answer_matching_behavior {answer!r}")
    return rows


# ----------------------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------------------


class TorchCompatibleGenerator:
    """The random streams of `torch.Generator().manual_seed(seed)` on CPU, in numpy (no torch import).

    torch's CPU generator is a 32-bit Mersenne Twister seeded like numpy's legacy `RandomState(seed)`, whose
    stream numpy keeps frozen; `torch.randperm(n)` (n < 2**32 / 20) is a Fisher-Yates shuffle drawing
    `random() % (n - i)`, and `torch.randint(low, high, (k,))` draws `random() % (high - low) + low`. The test
    suite checks both against torch. This reproduces the official code's data selection exactly.

    Args:
      seed: the seed given to `manual_seed` (0 <= seed < 2**32).
    """

    def __init__(self, seed: int) -> None:
        if not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**32:
            raise ConfigError(f"seed must be an int in [0, 2**32), got {seed!r}")
        self._state = np.random.RandomState(int(seed))

    def _raw(self, k: int) -> np.ndarray:
        return self._state.randint(0, 2**32, size=k, dtype=np.uint32).astype(np.int64)

    def randperm(self, n: int) -> np.ndarray:
        """`torch.randperm(n, generator=g)`: a permutation of range(n), int64 [n]."""
        if not 0 <= n < 2**32 // 20:
            raise ConfigError(f"randperm supports 0 <= n < {2**32 // 20}, got {n}")
        perm = np.arange(n, dtype=np.int64)
        raw = self._raw(max(n - 1, 0))
        for i in range(n - 1):
            z = i + int(raw[i] % (n - i))
            perm[i], perm[z] = perm[z], perm[i]
        return perm

    def randint(self, low: int, high: int, size: int = 1) -> np.ndarray:
        """`torch.randint(low, high, (size,), generator=g)`: int64 [size] in [low, high)."""
        if not 0 < high - low < 2**32:
            raise ConfigError(f"randint needs 0 < high - low < 2**32, got [{low}, {high})")
        return self._raw(size) % (high - low) + low


def persona_split(
    rows: Sequence[T], n_train: int = 80, n_test: int = 40, seed: int = 875, *, rng: str = "numpy"
) -> tuple[list[T], list[T]]:
    """Split rows into train and test by a seeded random permutation (docs/math.md §6.2: 80 / 40, seed 875).

    Train is the first `n_train` rows of the permutation, test the next `n_test`.

    Args:
      rows: the rows (e.g. from `load_persona`).
      n_train: number of training rows.
      n_test: number of test rows.
      seed: the permutation's seed.
      rng: "numpy" (default): `numpy.random.default_rng(seed).permutation`. The official code used
        `torch.randperm` with `torch.Generator().manual_seed(seed)`, so this default picks different prompts
        than the paper. "torch": that exact permutation (`TorchCompatibleGenerator`): the paper's prompts.

    Returns:
      `(train, test)`, lists of rows.

    Raises:
      ConfigError: fewer rows than n_train + n_test, a negative count, or an unknown `rng`.
    """
    if n_train < 0 or n_test < 0:
        raise ConfigError(f"n_train and n_test must be >= 0, got {n_train} and {n_test}")
    if n_train + n_test > len(rows):
        raise ConfigError(f"n_train + n_test = {n_train + n_test} but there are only {len(rows)} rows")
    if rng == "numpy":
        perm = np.random.default_rng(seed).permutation(len(rows))
    elif rng == "torch":
        perm = TorchCompatibleGenerator(seed).randperm(len(rows))
    else:
        raise ConfigError(f"rng must be 'numpy' or 'torch', got {rng!r}")
    order = [int(i) for i in perm]
    return [rows[i] for i in order[:n_train]], [rows[i] for i in order[n_train : n_train + n_test]]

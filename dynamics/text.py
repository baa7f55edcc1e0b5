"""Text -> batches: chat-templated (prompt, response) pairs as token ids with attention and response masks.

Conventions (docs/math.md §1 and §6, the official code's `utils/rm_utils.py`):

- The prompt is one user turn rendered with the generation prompt; the response is everything the template
  adds after it for the assistant turn: the content *and* the template's closing tokens (SmolLM2: `<|im_end|>`
  and "\\n"). `response_mask` is 1 exactly there. EX-RM reads the hidden state at the last real token (the
  closing "\\n" for SmolLM2); IM-RM sums log-probabilities over the response mask.
- Prompt and response are tokenized separately and concatenated, as the official code does. This keeps the
  prompt tokens identical for the chosen and the rejected response (the same x in the BT loss), and they are
  what a model generating the response after the prompt would see. The concatenation almost always equals the
  tokenization of the full templated text; where the template's boundary would merge tokens (a response that
  starts with whitespace, e.g. indented code after "assistant\\n") it does not, and those rows are listed in
  `boundary_mismatch` (and logged) instead of being silently re-split.
- Templated text is encoded with `add_special_tokens=False`: the chat template decides BOS/EOS.
- A pair longer than `max_length` is a `SequenceTooLongError` (a `DataError` that carries the row index and the
  lengths), unless `truncate=True`: then the prompt's text is cut from the left at a token boundary and
  re-rendered with the template (the chat structure, the generation prompt and the response stay intact; chosen
  and rejected keep the same prompt), and the rows are listed in `truncated` and logged at WARNING level.
- Error messages name a row as "row i", i the 0-based index into the sequences passed (for preference rows read
  by `dynamics.datasets`, also the file and line).

Arrays are host numpy int32 arrays; they become device arrays when passed to a jitted function.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from dynamics.batches import ExgrmBatch, PairBatch, PreferenceBatch, last_token_index
from dynamics.errors import ConfigError, DataError, ModelError, SequenceTooLongError
from dynamics.tokenizer import Tokenizer

__all__ = [
    "EXGRM_INPUT_FORMAT",
    "ExgrmBatch",
    "PairBatch",
    "PreferenceBatch",
    "encode_exgrm",
    "encode_pairs",
    "encode_preferences",
    "exgrm_answer_ids",
    "exgrm_prompt",
    "last_token_index",
    "split_prompt_response",
]

log = logging.getLogger(__name__)

# docs/math.md §6.5 (the official code's GEN_RM_INPUT_FORMAT).
EXGRM_INPUT_FORMAT = "Question: {prompt}\nAnswer: {response}\nVerification: Is the answer correct (Yes/No)?"
EXGRM_ANSWERS = ("Yes", "No")


def split_prompt_response(tokenizer: Tokenizer, prompt: str, response: str) -> tuple[str, str]:
    """The templated prompt (with generation prompt) and the templated response after it (docs/math.md §1).

    Args:
      tokenizer: a tokenizer with a chat template.
      prompt: the user turn.
      response: the assistant turn.

    Returns:
      `(prompt_text, response_text)`; their concatenation is the rendered two-turn conversation, and
      `response_text` is the content plus the template's closing tokens.

    Raises:
      ModelError: the template does not render the prompt as a prefix of the conversation.
    """
    user = {"role": "user", "content": prompt}
    prompt_text = tokenizer.apply_chat_template([user], add_generation_prompt=True)
    full = tokenizer.apply_chat_template([user, {"role": "assistant", "content": response}])
    if not full.startswith(prompt_text):
        raise ModelError(
            f"the chat template of {tokenizer.source} does not render the prompt (with the generation "
            "prompt) as a prefix of the prompt + response conversation: the response tokens cannot be told "
            "apart"
        )
    return prompt_text, full[len(prompt_text) :]


def _check_text(value: Any, field: str, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: {field} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: {field} is empty or whitespace only")
    return value


def _check_options(max_length: int, padding_side: str, pad_to: int | None) -> None:
    if not isinstance(max_length, int) or max_length <= 0:
        raise ConfigError(f"max_length must be a positive int, got {max_length!r}")
    if padding_side not in ("left", "right"):
        raise ConfigError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if pad_to is not None and (not isinstance(pad_to, int) or pad_to <= 0):
        raise ConfigError(f"pad_to must be a positive int or None, got {pad_to!r}")


def _pad_id(tokenizer: Tokenizer) -> int:
    pad = tokenizer.pad_id
    if pad is None:
        raise ModelError(f"{tokenizer.source}: the tokenizer has neither a padding nor an EOS token")
    return pad


def _fit_prompt(
    tokenizer: Tokenizer,
    prompt: str,
    encode: Callable[[str], tuple[Any, int, str]],
    max_length: int,
    truncate: bool,
    where: str,
    index: int,
) -> tuple[Any, int]:
    """Encode a row, cutting the prompt text from the left at token boundaries until it fits `max_length`.

    `encode(prompt)` returns `(payload, total_length, description_of_the_lengths)`.

    Returns:
      `(payload, dropped)`: the encoding that fits and about how many prompt tokens were cut (0 if none).

    Raises:
      SequenceTooLongError: the row does not fit and `truncate` is False (`index` is the row's).
    """
    payload, total, detail = encode(prompt)
    if total <= max_length:
        return payload, 0
    if not truncate:
        raise SequenceTooLongError(
            f"{where}: {detail} = {total} tokens > max_length={max_length}; pass truncate=True to cut the "
            "prompt from the left",
            index=index,
            where=where,
            lengths=detail,
            total=total,
            max_length=max_length,
        )
    starts = [start for start, _ in tokenizer.offsets(prompt)]
    dropped = total - max_length
    for _ in range(64):
        cut = prompt[starts[dropped] :] if dropped < len(starts) else ""
        if not cut.strip():
            raise DataError(
                f"{where}: {detail} = {total} tokens > max_length={max_length}, and cutting the whole prompt "
                "would not help: the response and the chat template's fixed tokens alone do not fit"
            )
        payload, new_total, _ = encode(cut)
        if new_total <= max_length:
            return payload, dropped
        dropped += new_total - max_length
    raise DataError(f"{where}: could not cut the prompt to fit max_length={max_length}")  # pragma: no cover


def _encode_split(
    tokenizer: Tokenizer, prompt: str, responses: Sequence[tuple[str, str]]
) -> tuple[tuple[list[int], list[list[int]], bool], int, str]:
    """Prompt ids, response ids per response, and whether any split differs from the joint tokenization."""
    prompt_ids: list[int] | None = None
    response_ids = []
    mismatch = False
    for _, response in responses:
        prompt_text, response_text = split_prompt_response(tokenizer, prompt, response)
        if prompt_ids is None:
            prompt_ids = tokenizer.encode(prompt_text, add_special_tokens=False)
        ids = tokenizer.encode(response_text, add_special_tokens=False)
        if tokenizer.encode(prompt_text + response_text, add_special_tokens=False) != prompt_ids + ids:
            mismatch = True
        response_ids.append(ids)
    assert prompt_ids is not None
    longest = max(range(len(responses)), key=lambda k: len(response_ids[k]))
    n_resp = len(response_ids[longest])
    detail = f"{len(prompt_ids)} prompt tokens + {n_resp} {responses[longest][0]} tokens"
    return (prompt_ids, response_ids, mismatch), len(prompt_ids) + n_resp, detail


def _target_length(longest: int, pad_to: int | None, max_length: int) -> int:
    """T: the longest row, rounded up to a multiple of `pad_to` but never past `max_length`."""
    if pad_to is None:
        return longest
    return max(longest, min(-(-longest // pad_to) * pad_to, max_length))


def _pad_rows(
    rows: Sequence[tuple[Sequence[int], int]], length: int, padding_side: str, pad_id: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pad `(ids, response_start)` rows to `length`: tokens, attention mask, response mask (int32 [B, T])."""
    n = len(rows)
    tokens = np.full((n, length), pad_id, dtype=np.int32)
    attention = np.zeros((n, length), dtype=np.int32)
    response = np.zeros((n, length), dtype=np.int32)
    for b, (ids, start) in enumerate(rows):
        offset = length - len(ids) if padding_side == "left" else 0
        tokens[b, offset : offset + len(ids)] = ids
        attention[b, offset : offset + len(ids)] = 1
        response[b, offset + start : offset + len(ids)] = 1
    return tokens, attention, response


def _report(what: str, dropped: dict[int, int], n_rows: int, max_length: int) -> None:
    if dropped:
        detail = ", ".join(f"row {i}: -{d} tokens" for i, d in sorted(dropped.items()))
        log.warning(
            "%s: cut the prompt of %d of %d rows from the left to fit max_length=%d (%s)",
            what,
            len(dropped),
            n_rows,
            max_length,
            detail,
        )


def _row_where(index: int, row: Any) -> str:
    source, line = getattr(row, "source", None), getattr(row, "line", None)
    return f"row {index} ({source} line {line})" if source is not None and line is not None else f"row {index}"


# ----------------------------------------------------------------------------------------------------------
# Encoders
# ----------------------------------------------------------------------------------------------------------


def encode_pairs(
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    max_length: int,
    truncate: bool = False,
    padding_side: str = "right",
    pad_to: int | None = None,
) -> PairBatch:
    """Encode (prompt, response) pairs with the chat template (docs/math.md §1, §6).

    Args:
      tokenizer: a tokenizer with a chat template (see `dynamics.tokenizer.ensure_chat_template`).
      prompts: user turns.
      responses: assistant turns, one per prompt.
      max_length: the model's context; a longer pair is an error unless `truncate`.
      truncate: cut the prompt text from the left to fit (the response is kept whole); such rows are listed in
        `PairBatch.truncated` and logged.
      padding_side: "right" (default) or "left".
      pad_to: round T up to a multiple of this (shape buckets against recompilation), never past `max_length`;
        None pads to the longest row.

    Returns:
      A `PairBatch` of B = len(prompts) rows.

    Raises:
      DataError: an empty prompt, an empty or whitespace-only response ("row i", 0-based), or a pair that does
        not fit (a `SequenceTooLongError`, with the row index and the lengths).
    """
    _check_options(max_length, padding_side, pad_to)
    if isinstance(prompts, str) or isinstance(responses, str):
        raise ConfigError("prompts and responses must be sequences of strings, not one string")
    if len(prompts) != len(responses):
        raise DataError(f"{len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        raise DataError("no pairs to encode")
    encoded, dropped, mismatched = [], {}, []
    for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        where = f"row {i}"
        _check_text(prompt, "prompt", where)
        _check_text(response, "response", where)
        (p_ids, (r_ids,), mismatch), cut = _fit_prompt(
            tokenizer,
            prompt,
            lambda p, r=response: _encode_split(tokenizer, p, [("response", r)]),
            max_length,
            truncate,
            where,
            i,
        )
        encoded.append((p_ids + r_ids, len(p_ids)))
        if cut:
            dropped[i] = cut
        if mismatch:
            mismatched.append(i)
    _report("encode_pairs", dropped, len(encoded), max_length)
    if mismatched:
        log.info("encode_pairs: rows %s tokenize differently at the prompt/response boundary", mismatched)
    length = _target_length(max(len(ids) for ids, _ in encoded), pad_to, max_length)
    tokens, attention, response = _pad_rows(encoded, length, padding_side, _pad_id(tokenizer))
    return PairBatch(tokens, attention, response, tuple(sorted(dropped)), tuple(mismatched))


def encode_preferences(
    tokenizer: Tokenizer,
    rows: Sequence[Any],
    *,
    max_length: int,
    truncate: bool = False,
    padding_side: str = "right",
    pad_to: int | None = None,
) -> PreferenceBatch:
    """Encode preference triples (x, y+, y-) with the chat template (docs/math.md §1, §6).

    Args:
      tokenizer: a tokenizer with a chat template.
      rows: objects with `prompt`, `chosen`, `rejected` strings (e.g. `dynamics.datasets.PreferenceRow`) or
        mappings with those keys.
      max_length: the model's context; each of the two sequences must fit.
      truncate: cut the shared prompt from the left until both sequences fit (both keep the same prompt).
      padding_side: "right" or "left".
      pad_to: as in `encode_pairs`.

    Returns:
      A `PreferenceBatch`; both sides have the same T.

    Raises:
      DataError: an empty field or a row that does not fit (a `SequenceTooLongError`); the message names the row
        ("row i", 0-based) and, for rows from `load_preferences`, the file and line.
    """
    _check_options(max_length, padding_side, pad_to)
    if not rows:
        raise DataError("no preference rows to encode")
    chosen, rejected, dropped, mismatched = [], [], {}, []
    for i, row in enumerate(rows):
        where = _row_where(i, row)
        get = row.get if isinstance(row, Mapping) else lambda k, r=row: getattr(r, k, None)
        prompt = _check_text(get("prompt"), "prompt", where)
        pair = [("chosen", _check_text(get("chosen"), "chosen", where))]
        pair.append(("rejected", _check_text(get("rejected"), "rejected", where)))
        (p_ids, (c_ids, r_ids), mismatch), cut = _fit_prompt(
            tokenizer, prompt, lambda p, pr=pair: _encode_split(tokenizer, p, pr), max_length, truncate, where, i
        )
        chosen.append((p_ids + c_ids, len(p_ids)))
        rejected.append((p_ids + r_ids, len(p_ids)))
        if cut:
            dropped[i] = cut
        if mismatch:
            mismatched.append(i)
    _report("encode_preferences", dropped, len(rows), max_length)
    if mismatched:
        log.info("encode_preferences: rows %s tokenize differently at the prompt/response boundary", mismatched)
    length = _target_length(max(len(ids) for ids, _ in chosen + rejected), pad_to, max_length)
    pad = _pad_id(tokenizer)
    static = {"truncated": tuple(sorted(dropped)), "boundary_mismatch": tuple(mismatched)}
    return PreferenceBatch(
        chosen=PairBatch(*_pad_rows(chosen, length, padding_side, pad), **static),
        rejected=PairBatch(*_pad_rows(rejected, length, padding_side, pad), **static),
    )


# ----------------------------------------------------------------------------------------------------------
# EX-GRM (docs/math.md §6.5)
# ----------------------------------------------------------------------------------------------------------


def exgrm_prompt(prompt: str, response: str) -> str:
    """The EX-GRM user turn for (x, y), `EXGRM_INPUT_FORMAT` (docs/math.md §6.5).

    Returns:
      "Question: {x}\\nAnswer: {y}\\nVerification: Is the answer correct (Yes/No)?".
    """
    return EXGRM_INPUT_FORMAT.format(prompt=prompt, response=response)


def exgrm_answer_ids(tokenizer: Tokenizer) -> tuple[int, int]:
    """Token ids of "Yes" and "No", the EX-GRM answers read at the last position (docs/math.md §6.5).

    Returns:
      `(yes_id, no_id)`.

    Raises:
      ModelError: either word is not a single token for this tokenizer.
    """
    ids = []
    for word in EXGRM_ANSWERS:
        encoded = tokenizer.encode(word, add_special_tokens=False)
        if len(encoded) != 1:
            raise ModelError(
                f"{tokenizer.source}: the EX-GRM answer {word!r} is {len(encoded)} tokens "
                f"{tokenizer.token_strings(encoded)}, not one"
            )
        ids.append(encoded[0])
    return ids[0], ids[1]


def encode_exgrm(
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    max_length: int,
    truncate: bool = False,
    padding_side: str = "right",
    pad_to: int | None = None,
) -> ExgrmBatch:
    """Encode EX-GRM inputs: `exgrm_prompt(x, y)` as one user turn + generation prompt (docs/math.md §6.5).

    Args:
      tokenizer: a tokenizer with a chat template.
      prompts: the questions x.
      responses: the answers y to verify.
      max_length: the model's context.
      truncate: cut the question x from the left to fit (the answer and the verification line stay).
      padding_side: "right" or "left" (the reward position is `last_token_index(attention_mask)` either way).
      pad_to: as in `encode_pairs`.

    Returns:
      An `ExgrmBatch`.
    """
    _check_options(max_length, padding_side, pad_to)
    if isinstance(prompts, str) or isinstance(responses, str):
        raise ConfigError("prompts and responses must be sequences of strings, not one string")
    if len(prompts) != len(responses):
        raise DataError(f"{len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        raise DataError("no pairs to encode")

    def encode(prompt: str, response: str) -> tuple[list[int], int, str]:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": exgrm_prompt(prompt, response)}], add_generation_prompt=True
        )
        ids = tokenizer.encode(text, add_special_tokens=False)
        return ids, len(ids), "the EX-GRM input (question, answer, template)"

    encoded, dropped = [], {}
    for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        where = f"row {i}"
        _check_text(prompt, "prompt", where)
        _check_text(response, "response", where)
        ids, cut = _fit_prompt(tokenizer, prompt, lambda p, r=response: encode(p, r), max_length, truncate, where, i)
        encoded.append((ids, len(ids)))
        if cut:
            dropped[i] = cut
    _report("encode_exgrm", dropped, len(encoded), max_length)
    length = _target_length(max(len(ids) for ids, _ in encoded), pad_to, max_length)
    tokens, attention, _ = _pad_rows(encoded, length, padding_side, _pad_id(tokenizer))
    return ExgrmBatch(tokens, attention, tuple(sorted(dropped)))

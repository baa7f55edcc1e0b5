"""The exception types rmdyn raises for bad input (all subclasses of RmdynError, itself a ValueError).

Every message names what was wrong (the file and line, the field, the shape or the option) and what was expected,
so that the CLI can print it without a traceback.
"""

from __future__ import annotations

__all__ = ["ConfigError", "DataError", "ModelError", "RmdynError", "SequenceTooLongError"]


class RmdynError(ValueError):
    """Bad input or an impossible request, with a message a user can act on."""


class DataError(RmdynError):
    """A data file, a row or a field is malformed (the message names file and line)."""


class ModelError(RmdynError):
    """A model directory, GGUF file, architecture or tokenizer is unusable."""


class ConfigError(RmdynError):
    """An option, a config key or a combination of options is invalid."""


class SequenceTooLongError(DataError):
    """A (prompt, response) sequence does not fit the model's context and truncation was not asked for.

    Attributes:
      index: the 0-based row of the batch being encoded.
      where: how the message names the row ("row 3", or "row 3 (prefs.jsonl line 4)").
      lengths: how the length adds up ("12 prompt tokens + 5 response tokens").
      total: the sequence's length in tokens.
      max_length: the limit it exceeds.
    """

    def __init__(
        self,
        message: str,
        *,
        index: int = -1,
        where: str = "",
        lengths: str = "",
        total: int = 0,
        max_length: int = 0,
    ):
        super().__init__(message)
        self.index = index
        self.where = where
        self.lengths = lengths
        self.total = total
        self.max_length = max_length

"""The one exception type rmdyn raises for bad input.

Every message names what was wrong (the file and line, the field, the shape or the option) and what was expected,
so that the CLI can print it without a traceback.
"""

from __future__ import annotations


class RmdynError(ValueError):
    """Bad input or an impossible request, with a message a user can act on."""


class DataError(RmdynError):
    """A data file, a row or a field is malformed (the message names file and line)."""


class ModelError(RmdynError):
    """A model directory, GGUF file, architecture or tokenizer is unusable."""


class ConfigError(RmdynError):
    """An option, a config key or a combination of options is invalid."""

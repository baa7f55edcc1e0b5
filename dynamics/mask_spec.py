"""The grammar of parameter selections (which parameters train), in pure Python: one parser for all callers.

    head | unembed | output | last:K | lora | all | re:PATTERN

`dynamics.masks` turns a checked spec into a pytree mask for a given reward model; the CLI checks a `--params`
value with `check_spec` before JAX loads and prefixes the flag to the message. What needs the model (K ≤ its
number of blocks, a pattern that selects something, head vs unembed for the reward type) is checked by
`dynamics.masks.trainable_mask`.
"""

from __future__ import annotations

import re

from dynamics.errors import ConfigError

__all__ = ["SPEC_HELP", "check_spec"]

SPEC_HELP = "head | unembed | output | last:K | lora | all | re:PATTERN"


def check_spec(spec: str) -> str:
    """The spec, stripped, if it has one of the forms of `SPEC_HELP` (no model needed: `output` stays `output`).

    Raises:
      ConfigError: not a string, an unknown form, a K that is not a positive integer, or a PATTERN that is not a
        regular expression (the message shows the pattern and `re`'s reason).
    """
    if not isinstance(spec, str):
        raise ConfigError(f"parameter selection must be a string ({SPEC_HELP}), got {spec!r}")
    spec = spec.strip()
    if spec in ("head", "unembed", "output", "lora", "all"):
        return spec
    if spec.startswith("re:"):
        pattern = spec[3:]
        if not pattern:
            raise ConfigError(f"parameter selection {spec!r}: the pattern after re: is empty")
        try:
            re.compile(pattern)
        except re.error as err:
            raise ConfigError(
                f"parameter selection {spec!r}: pattern {pattern!r} is not a valid regular expression ({err})"
            ) from None
        return spec
    if spec.startswith("last:"):
        k = spec.split(":", 1)[1]
        if not (k.isascii() and k.isdigit() and int(k) >= 1):
            raise ConfigError(f"parameter selection {spec!r}: K in last:K must be a positive integer, got {k!r}")
        return spec
    raise ConfigError(f"unknown parameter selection {spec!r}; expected {SPEC_HELP}")

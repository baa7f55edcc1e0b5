"""rmdyn.dynamics: models, rewards, one-step learning dynamics (Δr, ρ), real updates and training, in JAX.

Nothing in this package imports torch or transformers.
"""

from dynamics.errors import ConfigError, DataError, ModelError, RmdynError

__all__ = ["ConfigError", "DataError", "ModelError", "RmdynError"]

"""rmdyn.dynamics: models, rewards, one-step learning dynamics (Δr, ρ), real updates and training, in JAX.

Nothing in this package imports torch or transformers. Importing it routes float32 matmuls on a CPU to XLA's
Eigen kernel (`dynamics.xla_cpu`: YNNPACK's stand-alone dot loses precision on AVX2-only CPUs).
"""

from dynamics.xla_cpu import configure_cpu_dots

configure_cpu_dots()

from dynamics.errors import ConfigError, DataError, ModelError, RmdynError, SequenceTooLongError  # noqa: E402

__all__ = ["ConfigError", "DataError", "ModelError", "RmdynError", "SequenceTooLongError"]

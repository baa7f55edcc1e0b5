"""XLA's CPU kernels: rmdyn runs float32 matmuls and reductions in XLA's own kernels, not YNNPACK's.

Why. jaxlib 0.10 hands stand-alone dots and reductions on a CPU to YNNPACK (the fusion types `individual_dot` and
`reduce` of `--xla_cpu_experimental_ynn_fusion_type`). On an AVX2-only x86-64 CPU its float32 dot accumulates less
accurately than XLA's Eigen kernel, OpenBLAS or PyTorch's: measured on a 2-core AMD EPYC with AVX2 and no AVX-512,
the RMS relative error of a float32 [400, 1536] @ [1536, 576] product against float64 was 7.0e-7 with YNNPACK and
2.3e-7 with Eigen (PyTorch 2.5e-7, numpy 3.1e-7); through SmolLM2-135M's 30 blocks this doubled the logits' error
against exact arithmetic (1.83e-4 with YNNPACK, 7.4e-5 with Eigen, PyTorch 8.9e-5). Replacing one operation at a
time by its float64 version located it: float64 projections cut the error to 4.7e-5, float64 norms, RoPE and
softmax only to 1.5e-4, float64 activations not at all. Over all logits of that batch (RMS error against float64):
both YNNPACK types on (the default) 2.46e-5, its dot off 1.30e-5, its dot and reductions off 9.2e-6; PyTorch 1.30e-5.
The kernels are not ours to fix; which kernels run is.

How. XLA reads `XLA_FLAGS` once, when JAX first initializes a backend. Importing `dynamics` (which every rmdyn
entry point does before it computes anything) appends
`--xla_cpu_experimental_ynn_fusion_type=-individual_dot,-reduce` unless the variable already sets that flag: a user
who wants YNNPACK back sets the flag themselves (for example to `+individual_dot`). The flag touches CPU
compilation only; GPU runs are unchanged.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

__all__ = ["ACCURATE_DOT_FLAG", "YNN_FUSION_FLAG", "configure_cpu_dots", "with_accurate_dots"]

YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
ACCURATE_DOT_FLAG = f"{YNN_FUSION_FLAG}=-individual_dot,-reduce"


def with_accurate_dots(xla_flags: str) -> str:
    """`xla_flags` (an `XLA_FLAGS` value) with YNNPACK's stand-alone dots and reductions off, unless it sets the flag.

    Returns the string unchanged when it already names `--xla_cpu_experimental_ynn_fusion_type` (the user's choice
    wins), else the string with `ACCURATE_DOT_FLAG` appended.
    """
    if YNN_FUSION_FLAG in xla_flags:
        return xla_flags
    return f"{xla_flags} {ACCURATE_DOT_FLAG}".strip()


def configure_cpu_dots(environ: MutableMapping[str, str] | None = None) -> str:
    """Sets `XLA_FLAGS` in `environ` (default `os.environ`) by `with_accurate_dots`; returns the new value.

    Effective only before JAX initializes its CPU backend (the first computation); afterwards XLA has read its
    flags and the call changes nothing for this process.
    """
    env = os.environ if environ is None else environ
    value = with_accurate_dots(env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = value
    return value

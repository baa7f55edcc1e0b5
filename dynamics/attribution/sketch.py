"""CountSketch / TensorSketch of per-sequence reward gradients into ONE k-vector (docs/math.md §10.2).

The "sketch" method of `dynamics.attribution.projected.projected_features` (its default). Every trainable leaf is
viewed as a matrix [C, O] (an `Einsum` weight: its contracted axes are C; a 2-D table as stored; the non-matrix
leaves concatenated into one [n1, 1] "vector" group), and each group i draws its own hashes and signs

    h1: [C] → [k],  h2: [O] → [k]  (uniform),     s1: [C] → ±1,  s2: [O] → ±1  (Rademacher),

all independent (numpy `default_rng([seed, i])`: deterministic, the same for every call). Coordinate (c, o) of the
group's gradient G goes to bucket β(c, o) = (h1(c) + h2(o)) mod k with sign σ(c, o) = s1(c) s2(o): the degree-2
TensorSketch of Pham & Pagh (2013). The feature vector is the sum over the groups of their sketches,

    Φg = Σ_groups Σ_{c, o} σ(c, o) G[c, o] e_{β(c, o)} ∈ R^k       (k_total = k: no split of k over groups).

Unbiased: ⟨Φg, Φg'⟩ = Σ_{i, j} σ_i σ_j [β_i = β_j] g_i g'_j over all coordinates i, j of the concatenated gradient.
For i ≠ j, σ_i σ_j has mean zero and is independent of [β_i = β_j]: in different groups the two signs are
independent; in one group with c ≠ c' the factor s1(c) s1(c') is, and with c = c', o ≠ o' the factor s2(o) s2(o')
is. For i = j the term is g_i g'_i. So E⟨Φg, Φg'⟩ = ⟨g, g'⟩ exactly; the variance is O(‖g‖²‖g'‖² / k) over the
whole k (TensorSketch: at most a constant times that of a dense JL map of width k), against ≈ 1/k_in + 1/k_out =
2/√b per group for the Kronecker map with b = k/G.

For a rank-one G = a gᵀ the sketch is a circular convolution of two CountSketches,
sketch(a gᵀ) = conv(CS1 a, CS2 g) with CS1(a)[b] = Σ_{c: h1(c)=b} s1(c) a_c, so an Einsum weight's per-sequence
gradient G = Σ_t a_t g_tᵀ is never formed: `adapter_term` adds y_t += CS2ᵀ corr(S, CS1 a_t) to the layer's output,
S ∈ R^k one zero vector shared by every intercepted layer, corr the circular cross-correlation (the adjoint of
convolution: ⟨S, conv(u, v)⟩ = ⟨corr(S, u), v⟩) and (CS2ᵀ z)_o = s2(o) z[h2(o)]. At S = 0 the forward is
unchanged and ∂r/∂S = Σ_layers Σ_t conv(CS1 a_t, CS2 g_t), the sum of the layers' sketches. conv and corr are
computed by `jnp.fft.rfft`/`irfft` of length k: conv(u, v) = irfft(U V), corr(S, u) = irfft(conj(U) Ŝ).

Exact gradients (2-D tables, the vector group) are sketched by `matrix_sketch` with the same (β, σ) rule: the
larger axis is CountSketched first (a `segment_sum` into k buckets, [k, small axis]), then the small axis is
folded in by sketch[b] = Σ_o s2(o) A[(b − h2(o)) mod k, o] (a gather): memory k × min(C, O), no FFT, no V·D index.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Hashes", "SketchPlan", "adapter_term", "circular_conv", "circular_corr", "count_sketch", "draw_hashes",
           "matrix_sketch"]  # fmt: skip


@dataclasses.dataclass(frozen=True)
class SketchPlan:
    """The groups (`dynamics.attribution.projected.Group`, in feature-independent order) and k (hashable).

    All groups share one k-vector: `k_total` is k itself.
    """

    groups: tuple[Any, ...]
    requested: int

    @property
    def k_total(self) -> int:
        """The feature width: k."""
        return self.requested

    def einsum_paths(self) -> frozenset[str]:
        """The leaf paths of the trainable Einsum weights (differentiated through the shared adapter S)."""
        return frozenset(g.path for g in self.groups if g.kind == "einsum")


#: One group's (h1 [C] int32, s1 [C], h2 [O] int32, s2 [O]).
Hashes = tuple[jax.Array, jax.Array, jax.Array, jax.Array]


def draw_hashes(plan: SketchPlan, seed: int, dtype) -> dict[str, Hashes]:
    """{group path: (h1, s1, h2, s2)}: group i draws from `numpy.random.default_rng([seed, i])`; signs in `dtype`."""
    out = {}
    k = plan.requested
    for i, g in enumerate(plan.groups):
        rng = np.random.default_rng([seed, i])
        h1, h2 = rng.integers(0, k, g.n_in), rng.integers(0, k, g.n_out)
        s1, s2 = rng.choice([-1.0, 1.0], g.n_in), rng.choice([-1.0, 1.0], g.n_out)
        out[g.path] = (jnp.asarray(h1, jnp.int32), jnp.asarray(s1, dtype), jnp.asarray(h2, jnp.int32),
                       jnp.asarray(s2, dtype))  # fmt: skip
    return out


def count_sketch(x: jax.Array, h: jax.Array, s: jax.Array, k: int) -> jax.Array:
    """CountSketch along the last axis: [..., n] ↦ [..., k], out[..., b] = Σ_{c: h(c)=b} s(c) x[..., c]."""
    moved = jnp.moveaxis(x * jnp.reshape(s, (1,) * (x.ndim - 1) + s.shape), -1, 0)
    return jnp.moveaxis(jax.ops.segment_sum(moved, h, num_segments=k), 0, -1)


def _same_rank(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """a and b with leading unit axes added to the lower-rank one (explicit broadcasting)."""
    n = max(a.ndim, b.ndim)
    return tuple(jnp.reshape(x, (1,) * (n - x.ndim) + x.shape) for x in (a, b))  # type: ignore[return-value]


def circular_conv(u: jax.Array, v: jax.Array) -> jax.Array:
    """conv(u, v)[b] = Σ_i u[i] v[(b − i) mod k] along the last axis (real FFT of length k)."""
    k = u.shape[-1]
    fu, fv = _same_rank(jnp.fft.rfft(u, n=k), jnp.fft.rfft(v, n=k))
    return jnp.fft.irfft(fu * fv, n=k).astype(u.dtype)


def circular_corr(s: jax.Array, u: jax.Array) -> jax.Array:
    """corr(s, u)[j] = Σ_i u[i] s[(i + j) mod k] along the last axis: ⟨s, conv(u, v)⟩ = ⟨corr(s, u), v⟩."""
    k = u.shape[-1]
    fs, fu = _same_rank(jnp.fft.rfft(s, n=k), jnp.fft.rfft(u, n=k))
    return jnp.fft.irfft(jnp.conj(fu) * fs, n=k).astype(u.dtype)


def adapter_term(x: jax.Array, y: jax.Array, sketch: jax.Array, hashes: Hashes) -> jax.Array:
    """CS2ᵀ corr(S, CS1 x_t) per row t, reshaped like y: zero at S = 0; its S-gradient is the TensorSketch of G.

    x: the Einsum's input [..., C] (contracted axes flattened), y: its output, sketch: S [k].
    """
    h1, s1, h2, s2 = hashes
    k = sketch.shape[0]
    x2 = jnp.reshape(x, (-1, h1.shape[0])).astype(sketch.dtype)
    z = circular_corr(sketch, count_sketch(x2, h1, s1, k))  # [T, k]
    return jnp.reshape(z[:, h2] * s2[None, :], y.shape).astype(y.dtype)


def matrix_sketch(g: jax.Array, hashes: Hashes, k: int) -> jax.Array:
    """Σ_{c, o} s1(c) s2(o) G[c, o] e_{(h1(c) + h2(o)) mod k}, [k], for an explicit G [C, O].

    The larger axis is CountSketched first ([k, small]); then out[b] = Σ_o s2(o) A[(b − h2(o)) mod k, o].
    """
    h1, s1, h2, s2 = hashes
    if g.shape[0] < g.shape[1]:  # sketch the O axis first: the rule is symmetric in (c, o)
        g, h1, s1, h2, s2 = g.T, h2, s2, h1, s1
    a = jax.ops.segment_sum(g * s1[:, None], h1, num_segments=k)  # [k, small]
    rows = (jnp.arange(k, dtype=jnp.int32)[:, None] - h2[None, :]) % k
    return jnp.sum(a[rows, jnp.arange(g.shape[1])[None, :]] * s2[None, :], axis=1)

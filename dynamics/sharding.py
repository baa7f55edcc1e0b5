"""Scale-out with JAX's own sharding: data parallelism and fully-sharded parameters over a device mesh.

One mesh axis, "data". Batches (unseen pairs, training rows) are split along it; parameters are either replicated
(`"replicate"`: plain data parallelism) or split along it too (`"fsdp"`: each matrix is cut along its largest axis
that the device count divides, so every device holds 1/n of the model; XLA gathers what each step needs). The
jitted functions of `dynamics.delta`, `dynamics.step_check` and `dynamics.training` are unchanged: GSPMD propagates the
input shardings, so a sharded run computes the same numbers as a single-device one, up to the order of float
reductions.

On a multi-GPU host `make_mesh()` uses every GPU; on CPU the tests force 8 host devices with
`XLA_FLAGS=--xla_force_host_platform_device_count=8` (set before JAX starts).
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dynamics.errors import ConfigError

__all__ = [
    "AXIS",
    "ParamMode",
    "bytes_per_device",
    "data_devices",
    "make_mesh",
    "param_spec",
    "place_rows",
    "replicate",
    "shard_batch",
    "shard_params",
]

ParamMode = Literal["replicate", "fsdp"]
AXIS = "data"


def make_mesh(n_devices: int | None = None) -> Mesh:
    """A one-axis ("data") mesh over the first `n_devices` devices (default: all)."""
    devices = jax.devices()
    n = len(devices) if n_devices is None else n_devices
    if not 1 <= n <= len(devices):
        raise ConfigError(f"asked for {n} devices; {len(devices)} are available ({devices[0].platform})")
    return Mesh(np.asarray(devices[:n]), (AXIS,))


def param_spec(shape: tuple[int, ...], n: int, mode: ParamMode) -> PartitionSpec:
    """The PartitionSpec of one parameter: replicated, or split along its largest axis that `n` divides."""
    if mode == "replicate" or n == 1:
        return PartitionSpec()
    if mode != "fsdp":
        raise ConfigError(f"unknown parameter sharding {mode!r}; expected replicate or fsdp")
    axes = sorted(range(len(shape)), key=lambda i: -shape[i])
    for i in axes:
        if shape[i] % n == 0 and shape[i] >= n:
            spec = [None] * len(shape)
            spec[i] = AXIS
            return PartitionSpec(*spec)
    return PartitionSpec()  # small or indivisible (norm scales, biases): replicated


def shard_params(params: Any, mesh: Mesh, mode: ParamMode = "replicate") -> Any:
    """`params` placed on the mesh (None leaves, as in a partitioned tree, are kept)."""
    n = mesh.shape[AXIS]

    def place(x):
        return jax.device_put(x, NamedSharding(mesh, param_spec(tuple(x.shape), n, mode)))

    return jax.tree.map(place, params)


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Every array leaf split along its first (batch) axis; the batch size must be a multiple of the devices."""
    n = mesh.shape[AXIS]

    def place(x):
        x = np.asarray(x)
        if x.shape[0] % n:
            raise ConfigError(f"a batch of {x.shape[0]} rows cannot be split over {n} devices; use a multiple of {n}")
        return jax.device_put(x, NamedSharding(mesh, PartitionSpec(AXIS)))

    return jax.tree.map(place, batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every leaf replicated on the mesh (small inputs such as one training triple)."""
    return jax.tree.map(lambda x: jax.device_put(np.asarray(x), NamedSharding(mesh, PartitionSpec())), tree)


def data_devices(mesh: Mesh | None) -> int:
    """Devices along the mesh's "data" axis (1 without a mesh)."""
    return 1 if mesh is None else int(mesh.shape[AXIS])


def place_rows(tree: Any, mesh: Mesh | None) -> Any:
    """A tree of arrays with rows first (a micro-batch, an evaluation chunk) as a jitted step takes it.

    Without a mesh: unchanged (host arrays). On a mesh: split along the rows over its devices, or replicated when
    the rows of some leaf do not divide (only the short last micro-batch of an epoch can be such).
    """
    if mesh is None:
        return tree
    n = data_devices(mesh)
    rows = [np.shape(leaf)[0] for leaf in jax.tree.leaves(tree)]
    return shard_batch(tree, mesh) if all(r % n == 0 for r in rows) else replicate(tree, mesh)


def bytes_per_device(tree: Any) -> dict[str, int]:
    """Bytes each device holds of `tree`, by device id (to show what FSDP saves)."""
    out: dict[str, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            key = str(shard.device.id)
            out[key] = out.get(key, 0) + shard.data.nbytes
    return out

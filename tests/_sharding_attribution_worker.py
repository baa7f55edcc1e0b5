"""Run in a subprocess with 8 forced host devices: the contribution matrix C sharded (rows of each block over the
devices) vs one device (docs/math.md §10.1)."""

import json
import os

assert "--xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_enable_x64", True)

from _sharding_worker import pairs  # noqa: E402

from dynamics.attribution import EvalSet, contribution_matrix  # noqa: E402
from dynamics.models import LM, DecoderConfig, cast_params  # noqa: E402
from dynamics.rewards import ExplicitRM, ImplicitRM  # noqa: E402
from dynamics.sharding import make_mesh  # noqa: E402
from dynamics.text import PreferenceBatch  # noqa: E402


def main():
    V = 64
    cfg = DecoderConfig(family="llama", vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                        d_ff=48, tie_embeddings=True)  # fmt: skip
    lm = LM(cfg)
    params = cast_params(lm.init(jax.random.PRNGKey(0)), jnp.float64)
    rng = np.random.default_rng(0)
    train = PreferenceBatch(pairs(rng, 11, 9, 4, V), pairs(rng, 11, 9, 4, V))
    ev = EvalSet(pairs(rng, 5, 10, 3, V), pairs(rng, 5, 10, 3, V))
    mesh = make_mesh(8)
    out = {"devices": len(jax.devices())}
    for kind in ("ex", "im"):
        rm = ExplicitRM(lm) if kind == "ex" else ImplicitRM(lm, beta=0.5)
        p = (
            rm.init(params, seed=1, std=0.3)
            if kind == "ex"
            else rm.init(params, jax.tree.map(lambda a: a * 1.05, params))
        )
        one = contribution_matrix(rm, p, train, ev, params_spec="all", lr=0.1, block=8)
        many = contribution_matrix(rm, p, train, ev, params_spec="all", lr=0.1, block=8, mesh=mesh)
        a, b = one.contribution, many.contribution
        out[kind] = {
            "rel": float(np.abs(a - b).max() / np.abs(a).max()),
            "devices": many.meta["devices"],
            "weight_rel": float(np.abs(one.weight - many.weight).max()),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""Run in a subprocess with 8 forced host devices: Δr sharded (data parallel, FSDP) vs one device."""

import json
import os
import sys

assert "--xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_enable_x64", True)

from dynamics.delta import delta_reward  # noqa: E402
from dynamics.models import LM, DecoderConfig, cast_params  # noqa: E402
from dynamics.rewards import ExplicitRM, ImplicitRM  # noqa: E402
from dynamics.sharding import bytes_per_device, make_mesh, shard_params  # noqa: E402
from dynamics.text import PairBatch, PreferenceBatch  # noqa: E402


def pairs(rng, n, T, plen, V):
    tok = rng.integers(0, V, (n, T)).astype(np.int32)
    att = np.ones((n, T), np.int32)
    resp = np.zeros((n, T), np.int32)
    for i in range(n):
        L = T - int(rng.integers(0, 3))
        att[i, L:] = 0
        resp[i, plen:L] = 1
    return PairBatch(tok, att, resp)


def main():
    V = 64
    cfg = DecoderConfig(family="llama", vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                        d_ff=48, tie_embeddings=True)  # fmt: skip
    lm = LM(cfg)
    params = cast_params(lm.init(jax.random.PRNGKey(0)), jnp.float64)
    rng = np.random.default_rng(0)
    train = PreferenceBatch(pairs(rng, 2, 9, 4, V), pairs(rng, 2, 9, 4, V))
    unseen = pairs(rng, 20, 10, 3, V)
    mesh = make_mesh(8)
    out = {"devices": len(jax.devices())}
    for kind in ("ex", "im"):
        rm = ExplicitRM(lm) if kind == "ex" else ImplicitRM(lm, beta=0.5)
        p = (
            rm.init(params, seed=1, std=0.3)
            if kind == "ex"
            else rm.init(params, jax.tree.map(lambda a: a * 1.05, params))
        )
        ref = delta_reward(rm, p, train, unseen, params_spec="all", lr=0.1, chunk_size=8)
        for mode in ("replicate", "fsdp"):
            res = delta_reward(rm, p, train, unseen, params_spec="all", lr=0.1, chunk_size=8, mesh=mesh,
                               param_sharding=mode)  # fmt: skip
            out[f"{kind}-{mode}"] = {
                "max_rel_diff": float(np.abs(res.delta - ref.delta).max() / np.abs(ref.delta).max()),
                "kernel_rel_diff": float(
                    np.abs(res.kernel_chosen - ref.kernel_chosen).max() / np.abs(ref.kernel_chosen).max()
                ),  # fmt: skip
                "devices": res.meta["devices"],
            }
    sharded = shard_params(params, mesh, "fsdp")
    per_dev = bytes_per_device(sharded)
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    out["fsdp_bytes_max_device"] = max(per_dev.values())
    out["total_bytes"] = total
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()

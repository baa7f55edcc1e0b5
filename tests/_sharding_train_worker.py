"""Run in a subprocess with 8 forced host devices: `dynamics.training` sharded (data parallel, FSDP) vs one device.

A tiny float64 llama trains a few Adam steps with gradient accumulation (batch 16 = 2 micro-batches of 8):
EX-RM with `last:1` (frozen-block cache, frozen parameters on the mesh; 36 rows, so the last step of an epoch
is one short micro-batch of 4 rows, which the mesh replicates) and IM-RM with `all` (π_ref on the mesh; 32
rows). Prints one JSON line: the largest relative differences to the one-device run of the per-step losses,
the evaluation metrics and the final trainable parameters, the bytes per device of the final parameters,
whether the FSDP layout survived the (donated) updates, the donation warnings seen, and the error of a
micro-batch of 12 rows on 8 devices; and a run interrupted after one step on the mesh (FSDP) and resumed there,
against the uninterrupted one-device run.
"""

import json
import os
import sys
import tempfile
import warnings

assert "--xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_enable_x64", True)

from jax.sharding import NamedSharding  # noqa: E402

from dynamics.errors import ConfigError  # noqa: E402
from dynamics.masks import partition, trainable_mask  # noqa: E402
from dynamics.models import LM, DecoderConfig, cast_params  # noqa: E402
from dynamics.sharding import AXIS, bytes_per_device, make_mesh, param_spec  # noqa: E402
from dynamics.text import PairBatch, PreferenceBatch  # noqa: E402
from dynamics.training import EvalSuite, TrainConfig, build_reward_model, train  # noqa: E402

V, T = 64, 14


def preference_data(n: int, seed: int) -> PreferenceBatch:
    """n triples sharing a prompt of 3–5 tokens, responses of 2–6 tokens, right-padded to T."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, V, rng.integers(3, 6)) for _ in range(n)]
    sides = []
    for _ in range(2):
        tokens, attention, response = (np.zeros((n, T), np.int32) for _ in range(3))
        for i, prompt in enumerate(prompts):
            ids = np.concatenate([prompt, rng.integers(3, V, rng.integers(2, 7))])
            tokens[i, : len(ids)] = ids
            attention[i, : len(ids)] = 1
            response[i, len(prompt) : len(ids)] = 1
        sides.append(PairBatch(tokens, attention, response))
    return PreferenceBatch(*sides)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.abs(b).max()
    return float(np.abs(a - b).max() / scale) if scale > 0 else float(np.abs(a - b).max())


def trainable(result, config, lm, params):
    """The final trainable leaves (host arrays), by the run's mask."""
    rm, full, spec = build_reward_model(config, lm, params)
    mask = trainable_mask(rm, full, spec)
    mask = {k: v for k, v in mask.items() if k != "ref"}
    final = {k: v for k, v in result.params.items() if k != "ref"}
    picked = partition(final, mask)[0]
    return [np.asarray(x) for x in jax.tree.leaves(picked)]


def main():
    cfg = DecoderConfig(family="llama", vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                        d_ff=48, tie_embeddings=True)  # fmt: skip
    lm = LM(cfg)
    params = cast_params(lm.init(jax.random.PRNGKey(0)), jnp.float64)
    suite = EvalSuite.from_preferences({"train": preference_data(10, 2), "test": preference_data(6, 3)})
    mesh = make_mesh(8)
    out = {"devices": len(jax.devices()), "donation_warnings": 0}
    for kind, spec, rows in (("ex", "last:1", 36), ("im", "all", 32)):
        data = preference_data(rows, 1)  # 36 = 16 + 16 + 4: the epoch's last step is one short micro-batch
        base = {"reward": kind, "params": spec, "lr": 1e-2, "batch_size": 16, "micro_batch_size": 8, "epochs": 2,
                "bucket": 4, "eval_batch_size": 12, "eval_every_epochs": 1, "head_init_std": 0.3}  # fmt: skip
        config = TrainConfig(**base)
        ref = train(config, lm, params, data, suite, progress=False)
        ref_losses = [h["loss"] for h in ref.history if h["event"] == "train"]
        ref_params = trainable(ref, config, lm, params)
        for mode in ("replicate", "fsdp", "passes"):
            if mode == "passes":  # micro-batches of 16 pairs, each run as passes of 8 (one per device)
                config = TrainConfig(**{**base, "micro_batch_size": 16, "pass_positions": 1})
            else:
                config = TrainConfig(**base, param_sharding=mode)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                res = train(config, lm, params, data, suite, progress=False, mesh=mesh)
            out["donation_warnings"] += sum("donated" in str(w.message) for w in caught)
            losses = [h["loss"] for h in res.history if h["event"] == "train"]
            evals = [(h, g) for h, g in zip(ref.history, res.history, strict=True) if h["event"] == "eval"]
            eval_diff = max(rel(g[k], h[k]) for h, g in evals for k in h if k not in ("event", "step", "epoch"))
            final = trainable(res, config, lm, params)
            per_dev = bytes_per_device(res.params)
            keeps_layout = all(
                x.sharding.is_equivalent_to(
                    NamedSharding(mesh, param_spec(x.shape, mesh.shape[AXIS], config.param_sharding)), x.ndim
                )
                for x in jax.tree.leaves(res.params)
            )
            out[f"{kind}-{mode}"] = {
                "steps": res.steps,
                "loss_rel_diff": rel(losses, ref_losses),
                "eval_rel_diff": eval_diff,
                "param_rel_diff": max(rel(a, b) for a, b in zip(final, ref_params, strict=True)),
                "bytes_max_device": max(per_dev.values()),
                "total_bytes": int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(ref.params))),
                "keeps_layout": keeps_layout,
                "devices": res.timing["devices"],
                "packed_micro_batches": res.timing["packed_micro_batches"],
                "passes": res.timing["passes"],
            }
        # interrupted after its first step on the mesh (FSDP), resumed on the mesh: ends where one device ends
        with tempfile.TemporaryDirectory() as tmp:
            config = TrainConfig(**base, param_sharding="fsdp", checkpoint_every_steps=1)

            def stop_after_first_step(info):
                if info.step == 1:
                    raise KeyboardInterrupt

            try:
                train(config, lm, params, data, suite, progress=False, mesh=mesh, run_dir=tmp,
                      callbacks=[stop_after_first_step])  # fmt: skip
                out[f"{kind}-interrupted"] = False
            except KeyboardInterrupt:
                out[f"{kind}-interrupted"] = True
            res = train(config, lm, params, data, suite, progress=False, mesh=mesh, run_dir=tmp, resume=True)
            losses = [h["loss"] for h in res.history if h["event"] == "train"]
            out[f"{kind}-resumed"] = {
                "resumed_from_step": res.resumed_from_step,
                "steps": res.steps,
                "devices": res.timing["devices"],
                "loss_rel_diff": rel(losses, ref_losses[len(ref_losses) - len(losses) :]),
                "param_rel_diff": max(
                    rel(a, b) for a, b in zip(trainable(res, config, lm, params), ref_params, strict=True)
                ),
            }
        out[f"{kind}-steps"] = ref.steps
        out[f"{kind}-packed"] = ref.timing["packed_micro_batches"]
        out[f"{kind}-ref-passes"] = ref.timing["passes"]
    # a micro-batch the device count does not divide is refused before anything runs
    try:
        train(TrainConfig(batch_size=24, micro_batch_size=12), lm, params, data, None, progress=False, mesh=mesh)
        out["micro_batch_error"] = None
    except ConfigError as err:
        out["micro_batch_error"] = str(err)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()

"""Sharded Δr and training (8 forced CPU devices; data parallel and fully sharded parameters) equal the single-device
ones."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from dynamics.errors import ConfigError


def run_worker(name: str) -> dict:
    """The JSON line a worker script prints, run with 8 forced CPU devices."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    worker = pathlib.Path(__file__).with_name(name)
    proc = subprocess.run([sys.executable, str(worker)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sharded_delta_matches_single_device():
    out = run_worker("_sharding_worker.py")
    assert out["devices"] == 8
    for key in ("ex-replicate", "ex-fsdp", "im-replicate", "im-fsdp"):
        assert out[key]["devices"] == 8
        assert out[key]["max_rel_diff"] <= 1e-10, (key, out[key])
        assert out[key]["kernel_rel_diff"] <= 1e-10, (key, out[key])
    # FSDP: each device holds about 1/8 of the parameters (norm scales are replicated)
    assert out["fsdp_bytes_max_device"] <= out["total_bytes"] / 8 * 1.2


@pytest.fixture(scope="module")
def sharded_training():
    return run_worker("_sharding_train_worker.py")


def test_sharded_training_matches_single_device(sharded_training):
    """A few Adam steps with accumulation, EX-RM (last:1, frozen-block cache) and IM-RM (all), on 8 devices,
    with the pairs packed (shared prompts, `dynamics.packing`) on one device and on the mesh alike, and with
    micro-batches of 16 run as passes of 8 pairs on the mesh (`TrainConfig.pass_positions`)."""
    out = sharded_training
    assert out["devices"] == 8
    assert out["donation_warnings"] == 0  # the updates still reuse the donated parameters / optimizer state
    for key in ("ex-replicate", "ex-fsdp", "ex-passes", "im-replicate", "im-fsdp", "im-passes"):
        res = out[key]
        assert res["devices"] == 8 and res["steps"] == out[key.split("-")[0] + "-steps"] > 1, (key, res)
        for diff in ("loss_rel_diff", "eval_rel_diff", "param_rel_diff"):
            assert res[diff] <= 1e-10, (key, diff, res)
        assert res["keeps_layout"], key  # the parameters keep their layout through the jitted updates
        if key.endswith("passes"):  # half as many micro-batches of 16, each run as two passes of 8 pairs
            assert res["packed_micro_batches"] > 0, (key, res)
            continue
        assert res["packed_micro_batches"] == out[key.split("-")[0] + "-packed"] > 0, (key, res)
    # one device runs every micro-batch of 8 pairs in one pass; the "passes" runs cut each micro-batch of 16
    # into two passes of 8 on the mesh, but run the short last micro-batch of EX-RM's epochs (16 + 16 + 4 rows,
    # fewer rows than devices) whole: the same passes, 5 per epoch for EX-RM and 4 for IM-RM
    assert out["ex-ref-passes"] == out["ex-passes"]["passes"] == 10, out
    assert out["im-ref-passes"] == out["im-passes"]["passes"] == 8, out
    for kind in ("ex", "im"):  # resume on the mesh: FSDP parameters and Adam state back from the checkpoint
        resumed = out[f"{kind}-resumed"]
        assert out[f"{kind}-interrupted"] and resumed["resumed_from_step"] == 1, (kind, resumed)
        assert resumed["steps"] == out[f"{kind}-steps"] and resumed["devices"] == 8, (kind, resumed)
        assert resumed["loss_rel_diff"] <= 1e-10 and resumed["param_rel_diff"] <= 1e-10, (kind, resumed)
    for kind in ("ex", "im"):
        replicated, fsdp = out[f"{kind}-replicate"], out[f"{kind}-fsdp"]
        assert replicated["bytes_max_device"] == replicated["total_bytes"]
        assert fsdp["bytes_max_device"] <= 0.2 * replicated["bytes_max_device"]


def test_sharded_training_needs_a_divisible_micro_batch(sharded_training):
    message = sharded_training["micro_batch_error"]
    assert message is not None and "micro_batch_size=12" in message and "8 devices" in message


def test_param_sharding_is_checked():
    from dynamics.training import TrainConfig

    with pytest.raises(ConfigError, match="param_sharding must be one of replicate, fsdp"):
        TrainConfig(param_sharding="tensor")


def test_bad_mesh_requests():
    from dynamics.sharding import make_mesh, param_spec

    with pytest.raises(ConfigError, match="devices"):
        make_mesh(10_000)
    with pytest.raises(ConfigError, match="unknown parameter sharding"):
        param_spec((8, 8), 2, "tensor")


def test_plans_know_the_device_keys():
    """Every bundled plan has `devices` and `param_sharding`; `run_mesh` checks them before any model loads."""
    from experiments.plans.grammar import available_experiments, load_plan, run_mesh

    for name in available_experiments():
        values = load_plan(name).values
        assert values["devices"] == 0 and values["param_sharding"] == "replicate", name
        assert run_mesh(values) is None
    values = load_plan("persona", "cpu", ["param_sharding=fsdp", "devices=1"]).values
    assert values["param_sharding"] == "fsdp" and run_mesh(values).size == 1
    with pytest.raises(ConfigError, match="asked for 32 devices"):  # more than this machine has
        run_mesh(load_plan("persona", "cpu", ["devices=32"]).values)
    with pytest.raises(ConfigError, match="micro_batch_size=32 cannot be split over devices=3"):
        run_mesh(load_plan("persona", "cpu", ["devices=3"]).values)
    with pytest.raises(ConfigError, match="devices must be an int >= 0"):
        run_mesh({"devices": -1})
    from experiments.studies.persona.runner import validate

    with pytest.raises(ConfigError, match="param_sharding must be one of"):
        validate(load_plan("persona", "cpu", ["param_sharding=tensor"]).values)


def test_sharded_attribution_matches_single_device():
    """C on 8 forced CPU devices (each block's rows split over them) equals the one-device C in float64."""
    out = run_worker("_sharding_attribution_worker.py")
    assert out["devices"] == 8
    for kind in ("ex", "im"):
        assert out[kind]["devices"] == 8
        assert out[kind]["rel"] <= 1e-10, out
        assert out[kind]["weight_rel"] <= 1e-12, out

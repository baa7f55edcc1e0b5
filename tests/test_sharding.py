"""Sharded Δr (8 forced CPU devices; data parallel and fully sharded parameters) equals the single-device one."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from dynamics.errors import ConfigError


def test_sharded_delta_matches_single_device():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    worker = pathlib.Path(__file__).with_name("_sharding_worker.py")
    proc = subprocess.run([sys.executable, str(worker)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == 8
    for key in ("ex-replicate", "ex-fsdp", "im-replicate", "im-fsdp"):
        assert out[key]["devices"] == 8
        assert out[key]["max_rel_diff"] <= 1e-10, (key, out[key])
        assert out[key]["kernel_rel_diff"] <= 1e-10, (key, out[key])
    # FSDP: each device holds about 1/8 of the parameters (norm scales are replicated)
    assert out["fsdp_bytes_max_device"] <= out["total_bytes"] / 8 * 1.2


def test_bad_mesh_requests():
    from dynamics.sharding import make_mesh, param_spec

    with pytest.raises(ConfigError, match="devices"):
        make_mesh(10_000)
    with pytest.raises(ConfigError, match="unknown parameter sharding"):
        param_spec((8, 8), 2, "tensor")

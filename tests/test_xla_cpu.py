"""dynamics.xla_cpu: the XLA_FLAGS rewrite that keeps YNNPACK's dots and reductions off CPU float32 math."""

from __future__ import annotations

import os

from dynamics.xla_cpu import ACCURATE_DOT_FLAG, YNN_FUSION_FLAG, configure_cpu_dots, with_accurate_dots


def test_flag_is_appended_and_a_users_choice_wins():
    assert with_accurate_dots("") == ACCURATE_DOT_FLAG
    assert with_accurate_dots("--xla_force_host_platform_device_count=8") == (
        f"--xla_force_host_platform_device_count=8 {ACCURATE_DOT_FLAG}"
    )
    mine = f"{YNN_FUSION_FLAG}=+individual_dot"
    assert with_accurate_dots(mine) == mine
    env = {"XLA_FLAGS": "--xla_cpu_enable_fast_math=false"}
    assert configure_cpu_dots(env) == env["XLA_FLAGS"] == f"--xla_cpu_enable_fast_math=false {ACCURATE_DOT_FLAG}"
    assert configure_cpu_dots(env) == env["XLA_FLAGS"], "idempotent"


def test_importing_dynamics_set_the_flag_in_this_process():
    assert ACCURATE_DOT_FLAG in os.environ["XLA_FLAGS"]

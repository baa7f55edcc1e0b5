"""The README's Python section runs as printed (on the tiny model instead of the default one) and prints the Δr
that autodiff gives: Δr_i = −η ⟨∇θ r(u_i), ∇θ L_BT⟩ over every trained parameter, from `jax.grad` on the reward
model directly (no VJP/JVP chunking, no masks module)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python_block() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the Python API section should hold exactly one python block"
    return blocks[0]


def test_python_block_is_ten_lines():
    lines = [line for line in _python_block().splitlines() if line.strip()]
    assert len(lines) <= 10, lines


def _autodiff_delta(rm, params, train, unseen, lr: float) -> np.ndarray:
    from dynamics.rewards import bt_loss

    def loss(p):
        return bt_loss(rm.reward(p, train.chosen), rm.reward(p, train.rejected))

    def trained(tree):  # every LM parameter and the head; π_ref never trains
        return {k: v for k, v in tree.items() if k != "ref"}

    g_loss = trained(jax.grad(loss)(params))
    out = []
    for i in range(unseen.batch_size):
        g_r = trained(jax.grad(lambda p, i=i: rm.reward(p, unseen)[i])(params))
        dots = jax.tree_util.tree_map(lambda a, b: jnp.vdot(a, b), g_r, g_loss)
        out.append(-lr * sum(jax.tree_util.tree_leaves(dots)))
    return np.asarray(out, dtype=np.float64)


@pytest.mark.usefixtures("x64")
def test_readme_python_block_runs_and_matches_autodiff(tmp_path, monkeypatch):
    from _tiny_hf import tiny_hf_dir

    import rmdyn
    from dynamics.loading import load

    model_dir = tiny_hf_dir(tmp_path / "tiny")
    monkeypatch.setattr(rmdyn, "load", lambda *args, **kwargs: load(str(model_dir), dtype="float64"))
    out = io.StringIO()
    scope: dict = {}
    with contextlib.redirect_stdout(out), np.printoptions(precision=17):  # print every digit of Δr
        exec(compile(_python_block(), "README.md", "exec"), scope)
    printed = out.getvalue().splitlines()
    assert [line.split(" [")[0] for line in printed] == ["EX-RM", "IM-RM"]

    loaded, train, unseen = scope["loaded"], scope["train"], scope["unseen"]
    for line, kind in zip(printed, ("ex", "im"), strict=True):
        delta = np.array([float(v) for v in re.search(r"\[([^\]]*)\]", line).group(1).split()])
        rm = rmdyn.make_reward_model(kind, loaded.lm)
        expected = _autodiff_delta(rm, rm.init(loaded.params), train, unseen, lr=1e-3)
        assert delta.shape == (2,) and np.all(np.abs(expected) > 1e-9)
        np.testing.assert_allclose(delta, expected, rtol=1e-9, atol=1e-15)  # float64: agreement to rounding

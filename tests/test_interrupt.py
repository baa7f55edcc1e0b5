"""Ctrl-C on the `rmdyn` console script: exit status 130 and nothing half-written, never a crash or a success.

Each subprocess runs `experiments.cli.entry` (what the installed `rmdyn` script runs), is sent SIGINT once its
stderr shows that the heavy part has started, and must exit 130. Before the fix, `theorem2` died with SIGSEGV
(exit 139) when interrupted while XLA compiled or ran, and a SIGINT that landed in JAX's garbage-collector callback
was dropped, so the command ran on and exited 0.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _tiny_hf import tiny_hf_dir

from experiments.cli import interrupt

ENTRY = "import sys; from experiments.cli import entry; sys.argv = ['rmdyn', *sys.argv[1:]]; entry()"
SLOW_STEP_ENTRY = """
import sys, time
import dynamics.training.engine as engine
inner = engine.accumulate_gradients

def slow(*args, **kwargs):  # a slow step, so that the interrupt lands mid-run
    time.sleep(0.5)
    return inner(*args, **kwargs)

engine.accumulate_gradients = slow
from experiments.cli import entry
sys.argv = ['rmdyn', *sys.argv[1:]]
entry()
"""


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return tiny_hf_dir(tmp_path_factory.getbasetemp() / "tiny-hf")


def _interrupt_when(code: str, argv: list[str], ready, tmp_path: Path, timeout: float = 300.0) -> tuple[int, str]:
    """Runs `python -c code argv...`, sends SIGINT once `ready(stderr so far)` holds; returns (status, stderr)."""
    log_path = tmp_path / "stderr.log"
    with log_path.open("w") as log:
        child = subprocess.Popen(
            [sys.executable, "-c", code, *argv],
            stdout=subprocess.DEVNULL,
            stderr=log,
            cwd=str(Path(__file__).parent),
            env={**os.environ, "JAX_PLATFORMS": "cpu"},
        )
        try:
            deadline = time.time() + timeout
            while time.time() < deadline and child.poll() is None and not ready(log_path.read_text("utf-8")):
                time.sleep(0.05)
            assert child.poll() is None, "finished before the interrupt: " + log_path.read_text("utf-8")[-2000:]
            child.send_signal(signal.SIGINT)
            status = child.wait(timeout=120)
        finally:
            if child.poll() is None:
                child.kill()
    return status, log_path.read_text("utf-8")


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_theorem2_interrupted_while_xla_runs_exits_130(tmp_path):
    out = tmp_path / "t2"
    argv = ["theorem2", "--seeds", "2", "--steps", "20000000", "--out", str(out)]
    status, err = _interrupt_when(ENTRY, argv, lambda s: "running" in s, tmp_path)
    assert status == 130, err[-2000:]
    assert "rmdyn theorem2: interrupted" in err
    assert _files(out) == []


def test_theorem2_interrupted_during_imports_is_not_lost(tmp_path):
    """SIGINT while JAX is being imported (where its gc callback may swallow it): still 130, nothing written."""
    out = tmp_path / "t2"
    argv = ["theorem2", "--seeds", "2", "--steps", "100", "--out", str(out)]
    status, err = _interrupt_when(ENTRY, argv, lambda s: "importing JAX" in s, tmp_path)
    assert status == 130, err[-2000:]
    assert _files(out) == []


def test_delta_interrupted_mid_computation_exits_130(tiny_dir, tmp_path):
    out = tmp_path / "delta"
    argv = ["delta", "--model", str(tiny_dir), "--out", str(out)]
    status, err = _interrupt_when(ENTRY, argv, lambda s: "Δr (JVP)" in s, tmp_path)
    assert status == 130, err[-2000:]
    assert "rmdyn delta: interrupted" in err
    assert _files(out) == []


def test_experiment_interrupted_mid_training_leaves_only_whole_files(tiny_dir, tmp_path):
    """An interrupted run keeps its resumable state (config, checkpoints, metrics so far), every file complete."""
    out = tmp_path / "exp"
    sets = ["model=" + str(tiny_dir), "reward=ex", "n_train=16", "n_test=4", "epochs=8", "checkpoint_every_steps=1"]
    sets += ["batch_size=4", "micro_batch_size=4", "params=output", "eval_batch_size=8"]
    argv = ["experiment", "persona", *[a for s in sets for a in ("--set", s)], "--out", str(out), "--no-progress"]
    status, err = _interrupt_when(SLOW_STEP_ENTRY, argv, lambda s: any(out.glob("*/checkpoints/latest.json")), tmp_path)
    assert status == 130, err[-2000:]
    assert "rmdyn experiment: interrupted" in err
    files = _files(out)
    assert files, "the run directory holds its state"
    assert not [p for p in files if p.name.endswith(".tmp")], files
    assert not list(out.glob("*/summary.json")), "an interrupted run has no summary"
    for path in files:
        if path.suffix == ".json":
            json.loads(path.read_text("utf-8"))
        elif path.suffix == ".jsonl":
            [json.loads(line) for line in path.read_text("utf-8").splitlines()]


def test_a_dropped_interrupt_is_raised_again_in_the_main_thread(default_sigint):
    """The unraisable hook turns a KeyboardInterrupt the interpreter dropped (here: raised in __del__) into a new
    one in the main thread; any other unraisable exception goes to the previous hook."""

    class RaisesOnCollect:
        def __init__(self, exc):
            self.exc = exc

        def __del__(self):
            raise self.exc

    seen = []
    previous = sys.unraisablehook
    sys.unraisablehook = interrupt._redeliver_dropped_interrupt(lambda u: seen.append(u.exc_type))
    try:
        RaisesOnCollect(ValueError("other"))  # dropped at once: to the previous hook
        assert seen == [ValueError]
        with pytest.raises(KeyboardInterrupt):
            RaisesOnCollect(KeyboardInterrupt())
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline:  # the re-raised interrupt arrives here, in the main thread
                time.sleep(0.01)
        assert seen == [ValueError]
    finally:
        sys.unraisablehook = previous

"""Strict test configuration (after equinox): rank promotion raises, warnings are errors (pyproject.toml).

float64 is switched on only inside the tests that compare closed forms with autodiff, through the `x64` fixture.
"""

from __future__ import annotations

import gc
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


def require(module_name: str, reason: str | None = None):
    """`pytest.importorskip(module_name)`, except under CI (CI=true), where a missing module fails the run.

    The reference libraries of the parity tests (torch, transformers, accelerate) are part of the test extra
    (`pip install -e '.[test]'`) and CI installs them: there a failed import means a broken environment, and
    skipping would silently drop every parity test of the file. Outside CI a missing reference library skips, as
    before. Optional cross-checks whose library CI does not install (cvxopt, the max-margin solver's fallback in
    tests/test_maxmargin.py) keep their plain skip (`skipif` / `pytest.importorskip`): skipping them is intended
    everywhere, CI included.

    Call it at module level (`torch = require("torch")`) or inside a test.
    """
    if os.environ.get("CI") == "true":
        import importlib

        try:
            return importlib.import_module(module_name)
        except ImportError as err:
            pytest.fail(
                f"CI=true but the reference library {module_name!r} cannot be imported ({err}); the test extra "
                "(pip install -e '.[test]') must be installed in CI",
                pytrace=False,
            )
    return pytest.importorskip(module_name, reason=reason)


@pytest.fixture
def default_sigint():
    """SIGINT handled by Python's default handler for one test, the previous handler restored afterwards.

    A shell that starts a command in the background (`cmd &` without job control) starts it with SIGINT ignored;
    a test that sends itself SIGINT, or asks `_thread.interrupt_main` to, then sees nothing happen.
    """
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.fixture
def x64():
    """Enable float64 for one test, and restore the previous setting afterwards."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


def _memory_maps() -> int | None:
    """How many memory mappings this process holds (Linux), or None where /proc cannot tell."""
    try:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    except OSError:
        return None


def _map_limit() -> int | None:
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs(request):
    """Drop JAX's compiled programs after each test module.

    Every XLA:CPU executable keeps its code and data in separate memory mappings until its jit cache entry goes.
    One pytest process compiles thousands of programs; measured here, one attribution test module leaves 7,625
    mappings (1,146 after `jax.clear_caches()`), and the whole suite passed Linux's default vm.max_map_count
    (65,530) inside tests/test_train.py, where XLA's compiler then crashed with a segmentation fault. Clearing after
    each module keeps the count at what one module needs; a module that alone comes near the limit fails here with
    its name instead of crashing a later one.
    """
    yield
    jax.clear_caches()
    gc.collect()
    held, limit = _memory_maps(), _map_limit()
    if held is not None and limit is not None and held > 0.6 * limit:
        pytest.fail(
            f"{request.module.__name__}: the test process still holds {held} memory mappings after clearing JAX's "
            f"caches (vm.max_map_count is {limit}); a later compilation may crash",
            pytrace=False,
        )

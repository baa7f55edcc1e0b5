"""Strict test configuration (after equinox): rank promotion raises, warnings are errors (pyproject.toml).

float64 is switched on only inside the tests that compare closed forms with autodiff, through the `x64` fixture.
"""

from __future__ import annotations

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
def x64():
    """Enable float64 for one test, and restore the previous setting afterwards."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)

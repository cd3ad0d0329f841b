"""SegMambaSlicer.py outside the application: its self-test and logic facade on a real headless scene.

Only the base classes that exist solely in the Slicer application (``qt`` and
``slicer.ScriptedLoadableModule``) get stand-ins; MRML, slicer.util and our logic are real.
"""

from __future__ import annotations

import importlib.util
import sys
import types
import unittest
from pathlib import Path

import pytest

MODULE_FILE = Path(__file__).resolve().parents[1] / "SegMambaSlicer" / "SegMambaSlicer.py"


def _import_module_file(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    slicer = pytest.importorskip("slicer")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("slicer-core is not installed")
    bases = types.ModuleType("slicer.ScriptedLoadableModule")

    class _Base:
        def __init__(self, *args, **kwargs) -> None:
            pass

    class _Test(unittest.TestCase):
        def delayDisplay(self, message: str) -> None:  # noqa: N802 - Slicer API name
            pass

    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic"):
        setattr(bases, name, type(name, (_Base,), {}))
    bases.ScriptedLoadableModuleTest = _Test
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", bases)
    monkeypatch.setitem(sys.modules, "qt", types.ModuleType("qt"))
    spec = importlib.util.spec_from_file_location("SegMambaSlicerModuleUnderTest", MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_module_self_test_passes_on_headless_scene(mrml_scene, monkeypatch: pytest.MonkeyPatch) -> None:
    module = _import_module_file(monkeypatch)
    test = module.SegMambaSlicerTest("test_logic_writes_named_segments_on_input_grid")
    test.test_logic_writes_named_segments_on_input_grid()

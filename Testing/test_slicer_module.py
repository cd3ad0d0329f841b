"""SegMambaSlicer.py outside the application: its self-tests and logic facade on a real headless scene.

Only what exists solely in the Slicer application gets stand-ins — ``qt``, the
``slicer.ScriptedLoadableModule`` base classes and the ``slicer.parameterNodeWrapper`` decorator
(which imports qt); MRML, slicer.util, the worker and our logic are real.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
import unittest
from pathlib import Path

import pytest

MODULE_FILE = Path(__file__).resolve().parents[1] / "SegMambaSlicer" / "SegMambaSlicer.py"


def _load(name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = lambda cls: cls
    wrapper.WithinRange = lambda low, high: (low, high)
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", bases)
    monkeypatch.setitem(sys.modules, "slicer.parameterNodeWrapper", wrapper)
    monkeypatch.setitem(sys.modules, "qt", types.ModuleType("qt"))
    return _load("SegMambaSlicerModuleUnderTest")


def test_module_self_test_in_process_passes_on_headless_scene(mrml_scene, monkeypatch: pytest.MonkeyPatch) -> None:
    module = _import_module_file(monkeypatch)
    test = module.SegMambaSlicerTest("test_logic_writes_named_segments_and_volumes")
    test.setUp()
    test.test_logic_writes_named_segments_and_volumes()


def _run_worker_self_test(module: types.ModuleType) -> None:
    torch = pytest.importorskip("torch")
    test = module.SegMambaSlicerTest("test_background_worker_matches_in_process_run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the worker gets the same count; keeps the shared CPU free
    try:
        test.setUp()
        test.test_background_worker_matches_in_process_run()
    finally:
        torch.set_num_threads(threads)


def test_module_self_test_background_worker_passes_on_headless_scene(
    mrml_scene, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = _import_module_file(monkeypatch)
    monkeypatch.setattr(module, "DEMO_MODEL_ID", "no-such-model")  # the small seeded SegMamba: fast
    _run_worker_self_test(module)


@pytest.mark.slow
def test_module_self_test_background_worker_with_the_demo_model(mrml_scene, monkeypatch: pytest.MonkeyPatch) -> None:
    module = _import_module_file(monkeypatch)
    from SegMambaSlicerLib.models.cards import builtin_cards

    demo = builtin_cards().get(module.DEMO_MODEL_ID)
    if demo is None or demo.weights_path() is None or not demo.weights_path().is_file():
        pytest.skip("the demo model (card and weights) is not installed")
    _run_worker_self_test(module)


def test_install_actions_call_slicer_with_the_released_api_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each action the install flow takes reaches Slicer, slicer.packaging and PyTorchUtils with these arguments."""
    _import_module_file(monkeypatch)
    import slicer
    from SegMambaSlicerLib.slicer.install_flow import slicer_install_actions

    calls = []

    def recorder(name: str, result: object = None):
        return lambda *args, **kwargs: calls.append((name, args, kwargs)) or result

    for name, result in [("confirmOkCancelDisplay", True), ("confirmYesNoDisplay", False), ("pip_install", None),
                         ("restart", None), ("WaitCursor", contextlib.nullcontext())]:
        monkeypatch.setattr(slicer.util, name, recorder(name, result))
    packaging = types.ModuleType("slicer.packaging")
    packaging.pip_ensure = recorder("pip_ensure", ["numpy>=1.24"])
    monkeypatch.setitem(sys.modules, "slicer.packaging", packaging)
    monkeypatch.setattr(slicer, "packaging", packaging, raising=False)
    pytorch_utils = types.ModuleType("PyTorchUtils")
    pytorch_utils.PyTorchUtilsLogic = type("PyTorchUtilsLogic", (), {"installTorch": recorder("installTorch", "torch")})
    monkeypatch.setitem(sys.modules, "PyTorchUtils", pytorch_utils)
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(majorVersion=5, minorVersion=12), raising=False)
    monkeypatch.setattr(slicer, "modules", types.SimpleNamespace(pytorchutils=object()), raising=False)
    logged, errors = [], []
    actions = slicer_install_actions(logged.append, lambda message, exc: errors.append((message, exc)))

    assert actions.slicer_version() == (5, 12) and actions.has_pytorch_extension()
    assert actions.confirm("Install?", "SegMamba: install packages") is True
    assert actions.ask_yes_no("Restart now?") is False
    with actions.busy():
        assert actions.install_torch(">=2.1") == "torch"
        actions.pip_install(["-c", "/tmp/c.txt", "monai>=1.3"])
        assert actions.pip_ensure(["scipy>=1.10"], "/tmp/c.txt", ["numpy"], "SegMamba") == ["numpy>=1.24"]
    actions.restart()
    actions.log("installed")
    actions.show_error("failed", ValueError("x"))
    assert [(name, args[1:] if name == "installTorch" else args, kwargs) for name, args, kwargs in calls] == [
        ("confirmOkCancelDisplay", ("Install?", "SegMamba: install packages"), {}),
        ("confirmYesNoDisplay", ("Restart now?",), {}),
        ("WaitCursor", (), {}),
        ("installTorch", (), {"askConfirmation": False, "torchVersionRequirement": ">=2.1"}),
        ("pip_install", (["-c", "/tmp/c.txt", "monai>=1.3"],), {}),
        ("pip_ensure", (["scipy>=1.10"],), {"constraints": "/tmp/c.txt", "skip_packages": ["numpy"],
                                            "prompt_install": False, "requester": "SegMamba"}),
        ("restart", (), {}),
    ]
    assert logged == ["installed"] and errors[0][0] == "failed"
    monkeypatch.setattr(slicer, "modules", types.SimpleNamespace(), raising=False)
    assert not actions.has_pytorch_extension()


def test_module_imports_cleanly_inside_slicer() -> None:
    """Where Slicer's own Python is running (qt and the scripted-module bases exist), import it as is."""
    pytest.importorskip("qt", reason="needs 3D Slicer's Python (PythonQt)")
    pytest.importorskip("slicer.ScriptedLoadableModule", reason="needs the 3D Slicer application")
    module = _load("SegMambaSlicerImportCheck")
    assert issubclass(module.SegMambaSlicerTest, unittest.TestCase)


def test_self_test_skips_with_a_clear_line_where_torch_is_absent(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    """Extension build machines run self-tests without torch: the test says so and passes, runs nothing."""
    import importlib.util as importlib_util
    import logging

    module = _import_module_file(monkeypatch)
    real_find_spec = importlib_util.find_spec
    monkeypatch.setattr(importlib_util, "find_spec", lambda name, *a: None if name == "torch" else real_find_spec(name, *a))
    test = module.SegMambaSlicerTest("runTest")
    shown = []
    monkeypatch.setattr(test, "delayDisplay", shown.append)

    def must_not_run() -> None:
        raise AssertionError("a check ran without torch")

    monkeypatch.setattr(test, "test_logic_writes_named_segments_and_volumes", must_not_run)
    monkeypatch.setattr(test, "test_background_worker_matches_in_process_run", must_not_run)
    with caplog.at_level(logging.INFO):
        test.runTest()
    assert len(shown) == 1 and "skipped: PyTorch is not installed" in shown[0]
    assert shown[0] in caplog.text


def test_an_old_slicer_is_told_to_upgrade_instead_of_failing_inside(monkeypatch: pytest.MonkeyPatch) -> None:
    module = _import_module_file(monkeypatch)
    message = module.unsupportedSlicerMessage((5, 8), (3, 9, 10))
    assert "needs 3D Slicer 5.10 or newer; this is Slicer 5.8" in message
    assert module.unsupportedSlicerMessage((5, 10), (3, 12, 10)) is None
    assert module.unsupportedSlicerMessage((5, 12), (3, 12, 10)) is None

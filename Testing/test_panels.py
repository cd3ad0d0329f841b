"""What the module's panels show, decided without Qt: devices, models, run options and the status line."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import SimpleITK as sitk
from SegMambaSlicerLib.engine.pipeline import SegmentationResult, SegmentOptions
from SegMambaSlicerLib.models import registry
from SegMambaSlicerLib.models.cards import builtin_cards
from SegMambaSlicerLib.slicer.logic import GpuInfo, SystemInfo
from SegMambaSlicerLib.slicer.panels import (
    LOW_MEMORY_HINT,
    device_panel,
    estimate_panel,
    finished_status,
    model_cards,
    model_info_text,
    refill_combo,
    segment_options,
)

CUDA_BOX = SystemInfo(torch_version="2.5.1+cu124", cuda_build="12.4", gpus=(GpuInfo(0, "RTX 4090", 23.6),),
                      mps=False, fused_kernels="mamba_ssm is not installed", nvidia_driver=True)


def test_device_panel_before_torch_is_installed_offers_no_device() -> None:
    def never() -> SystemInfo:
        raise AssertionError("torch must not be probed before it is installed")

    assert device_panel(False, probe=never) == device_panel(False)
    panel = device_panel(False)
    assert (panel.choices, panel.info, panel.cuda_usable) == ((), "PyTorch is not installed yet.", False)


def test_device_panel_lists_the_gpu_first_and_says_when_cuda_is_usable() -> None:
    panel = device_panel(True, probe=lambda: CUDA_BOX)
    assert panel.choices == (("auto", "Automatic (GPU 0: RTX 4090)"), ("cuda:0", "GPU 0: RTX 4090 (24 GB)"),
                             ("cpu", "CPU (slow: several minutes per case)"))
    assert panel.info.startswith("PyTorch 2.5.1+cu124 (CUDA 12.4 build); GPU 0: RTX 4090, 23.6 GB;")
    assert panel.cuda_usable
    assert not device_panel(True, probe=lambda: dataclasses.replace(CUDA_BOX, gpus=())).cuda_usable


def test_a_broken_pytorch_becomes_the_info_line_instead_of_an_error() -> None:
    def broken() -> SystemInfo:
        raise OSError("libcudart.so.12: cannot open shared object file")

    panel = device_panel(True, probe=broken)
    assert panel.choices == () and not panel.cuda_usable
    assert panel.info == ("PyTorch is installed but cannot be loaded: libcudart.so.12: cannot open shared object "
                          "file. Reinstall it.")


def test_device_panel_of_this_python_always_offers_the_cpu() -> None:
    panel = device_panel(True)
    assert panel.choices[0][0] == "auto" and panel.choices[-1][0] == "cpu"
    assert panel.info.startswith("PyTorch ")


def test_models_are_the_builtin_ones_until_the_packages_are_there(home: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    cards, warning = model_cards(False)
    assert list(cards) == list(builtin_cards()) and warning is None
    monkeypatch.setattr(registry, "all_cards", lambda: {"imported": builtin_cards()["segmamba-demo"]})
    assert model_cards(True) == ({"imported": builtin_cards()["segmamba-demo"]}, None)

    def broken() -> dict:
        raise ImportError("torch is broken")

    monkeypatch.setattr(registry, "all_cards", broken)
    cards, warning = model_cards(True)
    assert list(cards) == list(builtin_cards())
    assert warning == "Imported models cannot be listed: torch is broken"


def test_model_info_says_whether_the_weights_are_there(tmp_path: Path) -> None:
    card = builtin_cards()["segmamba-demo"]
    card = dataclasses.replace(card, description="Demo.", intended_use="Testing only.", weights=dataclasses.replace(
        card.weights, file=str(tmp_path / "demo.pt"), instructions=""))
    assert model_info_text(card) == "Demo.\nTesting only.\nno weights yet: use Load checkpoint…"
    (tmp_path / "demo.pt").write_bytes(b"weights")
    assert model_info_text(card) == "Demo.\nTesting only.\nweights ready"
    manual = dataclasses.replace(card, intended_use="", weights=dataclasses.replace(
        card.weights, file=None, instructions="Download from the authors."))
    assert model_info_text(manual) == "Demo.\n\nDownload from the authors."


def test_segment_options_follow_the_parameter_node() -> None:
    parameters = SimpleNamespace(device="cuda:1", overlap=0.25, swBatchSize=4, tta=True, mixedPrecision=False,
                                 fusedKernels=False, lowMemory=True)
    assert segment_options(parameters) == SegmentOptions(
        device="cuda:1", overlap=0.25, sw_batch_size=4, tta=True, mixed_precision=False, scan_backend="torch",
        confidence=True, low_memory=True)  # confidence always: the review panel's overlay and table need it
    defaults = SimpleNamespace(**{**vars(parameters), "device": "", "fusedKernels": True})
    assert (segment_options(defaults).device, segment_options(defaults).scan_backend) == ("auto", None)


def test_finished_status_counts_windows_and_points_to_warnings() -> None:
    card = builtin_cards()["segmamba-demo"]
    result = SegmentationResult(sitk.Image(2, 2, 2, sitk.sitkUInt8), card, "cuda:0", 12.4, 1)
    assert finished_status(result) == "Done in 12 s on cuda:0 (1 window)."
    result = dataclasses.replace(result, windows=8, warnings=("t1n has no contrast", "NaN voxels"))
    assert finished_status(result) == (
        "Done in 12 s on cuda:0 (8 windows). 2 warning(s) about the inputs: see the log.")


class _QtLikeCombo:
    """Behaves as qt.QComboBox does for these calls: clear() and addItem() change the current index and
    emit currentIndexChanged unless signals are blocked; listeners are the widget's slots."""

    def __init__(self, items: list[tuple[str, str]], current: int, listener) -> None:
        self.items, self.current, self.listener, self.blocked = list(items), current, listener, False

    def blockSignals(self, block: bool) -> bool:
        was, self.blocked = self.blocked, block
        return was

    def _set(self, index: int) -> None:
        if index != self.current:
            self.current = index
            if not self.blocked:
                self.listener(self.currentData)

    @property
    def currentData(self):
        return self.items[self.current][0] if 0 <= self.current < len(self.items) else None

    def clear(self) -> None:
        self.items = []
        self._set(-1)

    def addItem(self, text: str, userData: object) -> None:
        self.items.append((userData, text))
        if self.current < 0:
            self._set(0)

    def findData(self, data: object) -> int:
        return next((i for i, (value, _) in enumerate(self.items) if value == data), -1)

    def setCurrentIndex(self, index: int) -> None:
        self._set(index)


def test_refilling_the_device_selector_keeps_the_saved_choice() -> None:
    """The saved device ("cuda:0") survives the refill at start-up; without blocking it became "auto"."""
    saved = {"device": "cuda:0"}

    def on_device_changed(value: object) -> None:  # what the widget's slot does
        if value:
            saved["device"] = value

    choices = [("auto", "Automatic"), ("cpu", "CPU"), ("cuda:0", "GPU 0")]
    combo = _QtLikeCombo(choices, 2, on_device_changed)
    refill_combo(combo, choices, saved["device"])
    assert saved == {"device": "cuda:0"} and combo.currentData == "cuda:0" and not combo.blocked
    refill_combo(combo, [("auto", "Automatic"), ("cpu", "CPU")], saved["device"])  # the GPU went away
    assert saved == {"device": "cuda:0"} and combo.currentData == "auto"


def _estimate(rate, free: int | None):
    """The estimate of a 2-channel 60 × 70 × 50 case with its content in a box, from ``rate``."""
    import numpy as np
    from SegMambaSlicerLib.engine import estimate
    from SegMambaSlicerLib.engine.inference import WindowSettings
    from toy_models import toy_card

    array = np.zeros((50, 70, 60), np.float32)
    array[5:45, 10:60, 8:50] = 1.0
    case = estimate.case_grid([sitk.GetImageFromArray(array)] * 2)
    settings = WindowSettings(roi_size=(16, 16, 16), overlap=0.5, sw_batch_size=1)
    return estimate.estimate(case, toy_card(channels=2, roi=16), settings, "cpu", rate, free_bytes=free)


def test_before_the_first_run_the_estimate_gives_windows_and_memory_and_defers_the_time() -> None:
    shown = estimate_panel(lambda: _estimate(None, free=16 * 2**30))
    windows = 4 * 6 * 5  # per axis ceil((n - 16) / 8) + 1 over the content box 40 × 50 × 42
    assert shown.text.startswith(f"Estimate: {windows} windows, time: measured after the first run, peak ≥ ")
    assert shown.text.endswith("(free 16.0 GiB).") and shown.shortfall is None


def test_an_estimate_that_does_not_fit_says_what_to_change_in_the_module() -> None:
    from SegMambaSlicerLib.engine.rates import Rate

    rate = Rate(seconds_per_window=0.2, window_bytes=8 * 2**30, window_bytes_exact=True, weights_bytes=2**20,
                runtime_bytes=2**28)
    shown = estimate_panel(lambda: _estimate(rate, free=4 * 2**30))
    assert "~24 s" in shown.text and "\nNot enough memory: This run needs about 8." in shown.text
    assert shown.shortfall is not None and LOW_MEMORY_HINT in shown.shortfall and "4.0 GiB is free" in shown.shortfall


def test_an_estimate_that_cannot_be_made_becomes_the_line_instead_of_an_error() -> None:
    from SegMambaSlicerLib.errors import InputImageError

    def missing():
        raise InputImageError("Select one volume for each input of Toy: Channel 0.")

    def broken():
        raise RuntimeError("boom")

    assert estimate_panel(missing).text == "Estimate: Select one volume for each input of Toy: Channel 0."
    assert estimate_panel(broken).text == "Estimate unavailable: RuntimeError: boom"

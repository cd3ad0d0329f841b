"""One error contract: every user-facing error reaches the command line as exit 1 and one ``error:`` line.

Each row of :data:`CASES` makes one :class:`SegMambaError` subclass happen through the real CLI
(``main([...])`` in process) with real files: cards as JSON, inputs as small images written with
SimpleITK, a local HTTP server for downloads. The last test walks every subclass of SegMambaError, so a
new error class fails it until it has a row here or a reason in :data:`CLI_UNREACHABLE`.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import pkgutil
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pytest
import SegMambaSlicerLib
import SimpleITK as sitk
import torch
from local_http import serve_folder
from SegMambaSlicerLib.cli import EXIT_USER_ERROR, main
from SegMambaSlicerLib.engine import estimate, rates
from SegMambaSlicerLib.engine.pipeline import SegmentOptions
from SegMambaSlicerLib.errors import (
    CancelledError,
    CheckpointError,
    DeviceError,
    InputImageError,
    ModelCardError,
    SegMambaError,
)
from SegMambaSlicerLib.evaluation.lesions import LesionError
from SegMambaSlicerLib.evaluation.metrics import MetricsError
from SegMambaSlicerLib.evaluation.phantom import PhantomError
from SegMambaSlicerLib.io.atomic import OutputError
from SegMambaSlicerLib.io.dicom_seg import DicomSegError
from SegMambaSlicerLib.io.geometry import OrientationCodeError
from SegMambaSlicerLib.io.report import ReportError
from SegMambaSlicerLib.io.seg_nrrd import SegmentationDataError, SegmentationFileError
from SegMambaSlicerLib.models.cards import load_card
from SegMambaSlicerLib.models.checkpoints import WeightsChangedError
from SegMambaSlicerLib.models.downloads import ChecksumMismatchError, DownloadCancelled, DownloadError
from SegMambaSlicerLib.models.nnunet import NnunetModelError
from SegMambaSlicerLib.models.registry import ManualDownloadRequired, RegistryError
from SegMambaSlicerLib.models.resources import ResourcesNotFoundError, models_dir
from SegMambaSlicerLib.networks import UnknownArchitectureError, build_network
from SegMambaSlicerLib.networks.mambaclinix import PlansError
from SegMambaSlicerLib.networks.ops.mixers import SequenceLengthError
from SegMambaSlicerLib.networks.ops.scan import (
    BACKEND_ENV_VAR,
    ScanBackendUnavailableError,
    UnknownScanBackendError,
)
from SegMambaSlicerLib.networks.segmamba_encoder_decoder import (
    InputSizeError,
    NetworkConfigError,
    UnexpectedArgumentsError,
)
from SegMambaSlicerLib.networks.segmamba_v1 import SegMambaV1
from SegMambaSlicerLib.run.batch import BatchError
from SegMambaSlicerLib.run.worker import WorkerCrashedError, WorkerError, WorkerOutOfMemoryError
from SegMambaSlicerLib.slicer.install import RequirementsFileError
from SegMambaSlicerLib.slicer.mrml import NotAVolumeError, SceneError
from toy_models import write_tiny_brats_card

#: The tiny SegMamba's window edge: inputs of this size need no padding and run in a fraction of a second.
EDGE = 32
CHANNELS = ("t2w", "t2f", "t1n", "t1c")
SHA_OF_OTHER_BYTES = hashlib.sha256(b"other bytes").hexdigest()


@dataclass
class Setup:
    """What a row may use to prepare its files; ``stack`` keeps servers running until main returns."""

    tmp: Path
    home: Path
    monkeypatch: pytest.MonkeyPatch
    stack: ExitStack


# ---------------------------------------------------------------- files the rows are made of


def _write_case(folder: Path) -> list[Path]:
    """Four non-zero EDGE³ images (noise, a bright block), one per BraTS channel, in the card's order."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for key in CHANNELS:
        voxels = rng.uniform(1.0, 2.0, (EDGE,) * 3).astype(np.float32)
        voxels[8:20, 10:22, 12:24] += 5.0
        path = folder / f"case-{key}.nii.gz"
        sitk.WriteImage(sitk.GetImageFromArray(voxels), str(path))
        paths.append(path)
    return paths


def _tiny_card(s: Setup, change: Callable[[dict[str, Any]], None] = lambda data: None) -> Path:
    """The tiny BraTS card (weights beside it) after ``change`` edits its JSON."""
    folder = s.tmp / "model"
    folder.mkdir(exist_ok=True)
    path = write_tiny_brats_card(folder)
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _brats_card(s: Setup, change: Callable[[dict[str, Any]], None]) -> Path:
    """The built-in BraTS card, edited, as a card file of the user's."""
    data = json.loads((models_dir() / "segmamba-brats2023.json").read_text(encoding="utf-8"))
    change(data)
    path = s.tmp / "card.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _user_card(s: Setup, weights: dict[str, Any]) -> str:
    """A registered user model ``remote`` (the BraTS card with these weights); returns its id."""
    data = json.loads((models_dir() / "segmamba-brats2023.json").read_text(encoding="utf-8"))
    data.update(id="remote", weights=weights)
    path = s.home / "models" / "remote" / "card.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return "remote"


def _predict(s: Setup, card: Path, *options: str, output: str = "seg.nii.gz") -> list[str]:
    """``predict`` of a fresh case with ``card`` on the CPU (unless ``options`` name a device)."""
    device = [] if "--device" in options else ["--device", "cpu"]
    inputs = [str(p) for p in _write_case(s.tmp / "case")]
    return ["predict", "--model", str(card), "-i", *inputs, "-o", str(s.tmp / "out" / output), "--quiet",
            *device, *options]


def _garbage(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not what the name says")
    return path


def _empty(folder: Path) -> Path:
    folder.mkdir(parents=True)
    return folder


def _result_folder_without_configurations(s: Setup) -> Path:
    """An nnU-Net result folder of the MambaClinix trainer whose plans.json has no configurations."""
    folder = s.tmp / "nnUNetTrainerMambaClinix__nnUNetPlans__3d_fullres"
    (folder / "fold_0").mkdir(parents=True)
    checkpoint = {"network_weights": {}, "trainer_name": "nnUNetTrainerMambaClinix",
                  "init_args": {"configuration": "3d_fullres"}}
    torch.save(checkpoint, folder / "fold_0" / "checkpoint_final.pth")
    (folder / "plans.json").write_text("{}", encoding="utf-8")
    dataset = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1},
               "file_ending": ".nii.gz"}
    (folder / "dataset.json").write_text(json.dumps(dataset), encoding="utf-8")
    return folder


# ---------------------------------------------------------------- the rows


def _bad_output_kind(s: Setup) -> list[str]:
    return ["models", "show", str(_brats_card(s, lambda d: d["inference"].update(output="softmax_label")))]


def _not_a_checkpoint(s: Setup) -> list[str]:
    return ["models", "show", str(_garbage(s.tmp / "weights.pt"))]


def _changed_weights(s: Setup) -> list[str]:
    return _predict(s, _tiny_card(s, lambda d: d["weights"].update(sha256=SHA_OF_OTHER_BYTES)))


def _three_stages(s: Setup) -> list[str]:
    return _predict(s, _tiny_card(s, lambda d: d["architecture"]["kwargs"].update(depths=[1, 1, 1])))


def _window_not_a_multiple_of_16(s: Setup) -> list[str]:
    return _predict(s, _tiny_card(s, lambda d: d["inference"].update(roi_size=[24, 24, 24])))


def _unreadable_image(s: Setup) -> list[str]:
    argv = _predict(s, _tiny_card(s))
    _garbage(Path(argv[argv.index("-i") + 1]))
    return argv


def _fused_scan_on_cpu(s: Setup) -> list[str]:
    return _predict(s, _tiny_card(s), "--scan-backend", "fused")


def _scan_backend_from_environment(s: Setup) -> list[str]:
    s.monkeypatch.setenv(BACKEND_ENV_VAR, "fastest")
    return _predict(s, _tiny_card(s))


def _line_break_in_a_label_name(s: Setup) -> list[str]:
    card = _tiny_card(s, lambda d: d["labels"][0].update(name="Necrosis\nsecond line"))
    return _predict(s, card, "--seg-nrrd")


def _download_from_a_file_url(s: Setup) -> list[str]:
    return ["models", "download", "--quiet",
            _user_card(s, {"kind": "url", "url": "file:///etc/hostname", "sha256": SHA_OF_OTHER_BYTES})]


def _download_with_a_wrong_checksum(s: Setup) -> list[str]:
    served = s.tmp / "served"
    served.mkdir()
    (served / "w.pt").write_bytes(b"the weights")
    base = s.stack.enter_context(serve_folder(served, s.monkeypatch))
    return ["models", "download", "--quiet",
            _user_card(s, {"kind": "url", "url": f"{base}/w.pt", "sha256": SHA_OF_OTHER_BYTES})]


def _label_map_with_an_undefined_value(s: Setup) -> list[str]:
    labels = np.zeros((EDGE, EDGE, EDGE), np.uint8)
    labels[10:14, 10:14, 10:14] = 5  # the BraTS card defines 1, 2 and 3
    path = s.tmp / "labels-with-5.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(labels), str(path))
    return ["measure", str(path), "--json", str(s.tmp / "measure.json")]


def _demo_without_matplotlib(s: Setup) -> list[str]:
    """The PNG preview needs matplotlib, which a Slicer or server install may lack (None: import fails)."""
    s.monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    return ["demo", "--model", str(_tiny_card(s)), "--shape", *[str(EDGE)] * 3, "--device", "cpu",
            "--out", str(s.tmp / "demo")]


def _window_bigger_than_the_memory(s: Setup) -> list[str]:
    """This computer's measured rate for the model says one window needs 1 PiB: no machine has that free."""
    card = _tiny_card(s)
    key = rates.run_key(load_card(card), SegmentOptions(device="cpu"), torch.device("cpu"))
    rates.remember_rate(key, rates.Rate(seconds_per_window=0.1, window_bytes=2**50, window_bytes_exact=True,
                                        weights_bytes=2**20, runtime_bytes=2**28))
    return _predict(s, card)


@dataclass(frozen=True)
class Case:
    """One row: the error class, the command line that provokes it, and a regex its message must match."""

    id: str
    error: type[SegMambaError]
    argv: Callable[[Setup], list[str]]
    message: str


CASES = [
    Case("card-output-typo", ModelCardError, _bad_output_kind,
         r"inference\.output must be one of 'softmax_labels', 'sigmoid_regions', got \"softmax_label\""),
    Case("unknown-model-id", RegistryError, lambda s: ["models", "show", "no-such-model"],
         "No model 'no-such-model'"),
    Case("manual-download", ManualDownloadRequired, lambda s: ["models", "download", "segmamba-brats2023"],
         "must be downloaded by hand"),
    Case("not-a-checkpoint", CheckpointError, _not_a_checkpoint,
         "weights.pt is not a readable PyTorch checkpoint"),
    Case("weights-changed", WeightsChangedError, _changed_weights,
         "changed or damaged after it was installed"),
    Case("network-config", NetworkConfigError, _three_stages, "exactly 4 encoder stages"),
    Case("window-size", InputSizeError, _window_not_a_multiple_of_16, "multiple of 16"),
    Case("unreadable-image", InputImageError, _unreadable_image, "Cannot read the .* image"),
    Case("unknown-device", DeviceError, lambda s: _predict(s, _tiny_card(s), "--device", "tpu"),
         "Unknown device 'tpu'"),
    Case("missing-gpu", DeviceError, lambda s: _predict(s, _tiny_card(s), "--device", "cuda:99"),
         "GPU 99 does not exist|CUDA was requested"),
    Case("fused-scan-on-cpu", ScanBackendUnavailableError, _fused_scan_on_cpu,
         "The 'fused' selective-scan backend cannot be used"),
    Case("scan-backend-variable", UnknownScanBackendError, _scan_backend_from_environment,
         f"Unknown selective-scan backend 'fastest' \\(from the environment variable {BACKEND_ENV_VAR}\\)"),
    Case("unsupported-output", OutputError, lambda s: _predict(s, _tiny_card(s), output="seg.txt"),
         "Unsupported format for the label map"),
    Case("segment-name-line-break", SegmentationDataError, _line_break_in_a_label_name,
         "must not contain a line break"),
    Case("download-file-url", DownloadError, _download_from_a_file_url,
         "only http:// and https:// addresses can be downloaded"),
    Case("download-checksum", ChecksumMismatchError, _download_with_a_wrong_checksum,
         "has SHA-256 [0-9a-f]{64} but [0-9a-f]{64} was expected"),
    Case("phantom-shape", PhantomError, lambda s: ["phantom", str(s.tmp / "ph"), "--shape", "4", "4", "4"],
         "phantom shape must be 3 edges of at least"),
    Case("batch-empty-folder", BatchError,
         lambda s: ["batch", str(_empty(s.tmp / "cases")), str(s.tmp / "out"), "--model", "segmamba-demo"],
         "No cases found in"),
    Case("dicom-seg-of-nifti", DicomSegError,
         lambda s: _predict(s, _tiny_card(s), "--dicom-seg", str(s.tmp / "out" / "seg.dcm")),
         "is not a DICOM series folder"),
    Case("measure-undefined-label", LesionError, _label_map_with_an_undefined_value,
         "holds the values 5, which the model segmamba-brats2023 does not define"),
    Case("evaluate-missing-folder", MetricsError,
         lambda s: ["evaluate", str(s.tmp / "no-predictions"), str(s.tmp / "no-references")],
         "The prediction folder .* does not exist"),
    Case("nnunet-zip", NnunetModelError, lambda s: ["models", "show", str(_garbage(s.tmp / "model.zip"))],
         "is not a readable .zip file"),
    Case("nnunet-plans", PlansError,
         lambda s: ["models", "show", str(_result_folder_without_configurations(s))],
         "plans.json has no 'configurations' section"),
    Case("preview-without-matplotlib", ReportError, _demo_without_matplotlib,
         "The PNG preview needs matplotlib"),
    Case("not-enough-memory", estimate.NotEnoughMemoryError, _window_bigger_than_the_memory,
         "this run needs about .* of memory but only .* is free.*--low-memory.*add --force"),
]


#: Error classes the CLI cannot raise, and why. Their own modules' tests raise them through the Python API
#: or the GUI's machinery; the last two are raised in test_errors_the_cli_pre_empts_come_from_python below.
CLI_UNREACHABLE: dict[type[SegMambaError], str] = {
    # Raised when a cancel callback (Python API, GUI) says so; the CLI passes none, and Ctrl-C there is a
    # KeyboardInterrupt (exit 130).
    CancelledError: "the CLI passes no cancel callback",
    DownloadCancelled: "the CLI passes no cancel callback",
    # The Slicer module's worker process (run/worker.py); `batch` runs its own processes.
    WorkerError: "the Slicer module's worker",
    WorkerCrashedError: "the Slicer module's worker",
    WorkerOutOfMemoryError: "the Slicer module's worker",
    # The Slicer module's dependency installer.
    RequirementsFileError: "Slicer's dependency installer",
    # Only read_seg_nrrd raises it, and the CLI writes .seg.nrrd files but never reads them.
    SegmentationFileError: "the CLI never reads a .seg.nrrd",
    # SegMambaV1 checks the window size before its mixers see it (InputSizeError, row window-size).
    SequenceLengthError: "pre-empted by InputSizeError",
    # load_card checks architecture.name and architecture.kwargs (ModelCardError) before a network is built;
    # these come from build_network and the constructors called from Python.
    UnknownArchitectureError: "pre-empted by the card check",
    UnexpectedArgumentsError: "pre-empted by the card check",
    # The card check turns a bad orientation code into a ModelCardError naming the card and field.
    OrientationCodeError: "pre-empted by the card check",
    # The Slicer scene adapter (slicer/mrml.py): only the module and the Python console reach it.
    SceneError: "the Slicer scene adapter",
    NotAVolumeError: "the Slicer scene adapter",
    # A broken install or checkout: the CLI's own model cards would be missing.
    ResourcesNotFoundError: "a broken install (no Resources folder)",
}


# ---------------------------------------------------------------- the tests


class _HandledErrors:
    """Stands in for stderr and notes the exception being handled whenever an ``error:`` line is written.

    ``main`` prints its error line inside its ``except`` block, so :func:`sys.exc_info` there is the
    exception that reached it: each row checks the class, not only the message.
    """

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.handled: list[BaseException | None] = []

    def write(self, text: str) -> int:
        if text.startswith("error: "):
            self.handled.append(sys.exc_info()[1])
        return self.stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_a_user_error_is_one_line_and_exit_1(case: Case, home: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    with ExitStack() as stack:
        argv = case.argv(Setup(tmp_path, home, monkeypatch, stack))
        capsys.readouterr()
        recorder = _HandledErrors(sys.stderr)
        sys.stderr = recorder  # not monkeypatch: its undo would run after capsys has restored stderr
        try:
            code = main(argv)
        finally:
            sys.stderr = recorder.stream
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR == 1, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0], err
    assert "Traceback" not in err, err
    assert re.search(case.message, errors[0]), errors[0]
    assert [type(exc) for exc in recorder.handled] == [case.error], recorder.handled


def _import_every_module() -> None:
    """Import the whole package, so that every error class exists before the walk.

    ``__main__`` runs the CLI when imported. A module that needs an optional package missing here
    (slicer-core for the MRML helpers) is skipped: the CLI never imports it either.
    """
    for module in pkgutil.walk_packages(SegMambaSlicerLib.__path__, "SegMambaSlicerLib."):
        if module.name.endswith(".__main__"):
            continue
        try:
            importlib.import_module(module.name)
        except ModuleNotFoundError as exc:
            if (exc.name or "").startswith("SegMambaSlicerLib"):
                raise


def _subclasses(cls: type) -> Iterator[type]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def test_every_error_class_has_a_cli_row_or_a_reason() -> None:
    _import_every_module()
    found = set(_subclasses(SegMambaError))
    tested = {case.error for case in CASES}
    untested = sorted(f"{c.__module__}.{c.__qualname__}" for c in found - tested - set(CLI_UNREACHABLE))
    assert not untested, f"add a row to CASES (or a reason to CLI_UNREACHABLE) for: {', '.join(untested)}"
    assert not tested & set(CLI_UNREACHABLE), "a class with a row is not unreachable"


def test_errors_the_cli_pre_empts_come_from_python() -> None:
    """Cards are checked before a network is built; from Python the network code reports the same faults."""
    with pytest.raises(UnknownArchitectureError, match="'segmamba_v3'"):
        build_network("segmamba_v3")
    with pytest.raises(UnexpectedArgumentsError, match="bogus"):
        SegMambaV1(bogus=1)

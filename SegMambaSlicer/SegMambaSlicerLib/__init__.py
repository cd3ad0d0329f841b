"""SegMamba, SegMamba-V2 and MambaClinix segmentation for 3D Slicer and the command line: the public API.

A console user (Slicer's Python console, a notebook, a script) needs only this::

    from SegMambaSlicerLib import SegmentOptions, find_card, segment
    result = segment(["t2w.nii.gz", "t2f.nii.gz", "t1n.nii.gz", "t1c.nii.gz"],
                     find_card("segmamba-brats2023"), SegmentOptions(weights="final_model.pt"))

Everything else is the layered implementation (docs/architecture.md). Names are imported on first use,
so ``import SegMambaSlicerLib`` stays fast and works before PyTorch is installed (the Slicer module
lists models and installs dependencies first).
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import (
    CancelledError,
    CheckpointError,
    DeviceError,
    InputImageError,
    ModelCardError,
    SegMambaError,
)
from .io.atomic import OutputError

#: Public name -> the module (relative to this package) that defines it, or "module:name" where the public
#: name differs; loaded on first access.
_LAZY = {
    "segment": "engine.pipeline",
    "SegmentOptions": "engine.pipeline",
    "SegmentationResult": "engine.pipeline",
    "load_network": "engine.pipeline",
    "segment_folder": "run.batch",
    "BatchResult": "run.batch",
    "find_card": "models.cards",
    "load_card": "models.cards",
    "ModelCard": "models.cards",
    "resolve_model": "models.registry",
    "all_cards": "models.registry",
    "import_weights": "models.registry",
    "download_weights": "models.registry",
    "write_seg_nrrd": "io.seg_nrrd",
    "write_dicom_seg": "io.dicom_seg",
    "read_source_series": "io.dicom_seg",
    "measure_lesions": "evaluation.lesions:measure",
    "compare_lesions": "evaluation.lesions:compare",
    "write_case_report": "evaluation.case_report",
}

__all__ = [
    "BatchResult",
    "CancelledError",
    "CheckpointError",
    "DeviceError",
    "InputImageError",
    "ModelCard",
    "ModelCardError",
    "OutputError",
    "SegMambaError",
    "SegmentOptions",
    "SegmentationResult",
    "all_cards",
    "compare_lesions",
    "download_weights",
    "find_card",
    "import_weights",
    "load_card",
    "load_network",
    "measure_lesions",
    "read_source_series",
    "resolve_model",
    "segment",
    "segment_folder",
    "write_case_report",
    "write_dicom_seg",
    "write_seg_nrrd",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, _, attribute = _LAZY[name].partition(":")  # "module:attribute" where the names differ
    value = getattr(importlib.import_module(f".{module}", __name__), attribute or name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

"""The synthetic BraTS-like case in Slicer's Sample Data module: generated on first use, then cached.

It lets a new user try the module without patient data (docs/user-guide.md). The case is a phantom
(:mod:`..evaluation.phantom`), not anatomy.
"""

from __future__ import annotations

from typing import Any

from ..evaluation.phantom import MODALITIES, sample_case

CATEGORY = "SegMamba"
SAMPLE_NAME = "SegMambaPhantom"


def load_sample_case() -> list[Any]:
    """Load the case's four volumes into the scene (named "Sample t2w" ...), in the BraTS channel order."""
    import slicer

    paths = sample_case()
    return [slicer.util.loadVolume(str(paths[key]), {"name": f"Sample {key}"}) for key in MODALITIES]


def register_sample_data(thumbnail: str) -> None:
    """Register the case with the Sample Data module; loading it calls :func:`load_sample_case`.

    Nothing is downloaded, yet ``uris`` and ``fileNames`` must be empty lists rather than left out: Slicer's
    ``SampleDataSource`` takes ``len()`` of both (``None`` raises TypeError at startup).
    """
    import SampleData

    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category=CATEGORY,
        sampleName=SAMPLE_NAME,
        uris=[],
        fileNames=[],
        thumbnailFileName=thumbnail,
        customDownloader=lambda *source: load_sample_case(),
    )

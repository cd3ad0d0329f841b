"""A DICOM series writer for tests: one MR file per slice with the geometry and identity tags (SimpleITK).

The files carry what a reader needs to place the slices (position, orientation, spacing) and what a
derived object such as a DICOM Segmentation needs to reference them: one study, series and frame of
reference for all slices, a SOP instance UID per slice, MR Image Storage as the SOP class, a patient.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import SimpleITK as sitk

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def new_uid() -> str:
    """A fresh DICOM UID from a random UUID (the ``2.25.`` root needs no registered organisation)."""
    return f"2.25.{uuid.uuid4().int}"


def _slice_tags(image: sitk.Image, k: int, shared: dict[str, str]) -> dict[str, str]:
    """The tags of slice ``k``: the series-wide ``shared`` ones plus its own number, UID and position."""
    direction = image.GetDirection()
    spacing = image.GetSpacing()
    position = image.TransformIndexToPhysicalPoint((0, 0, k))
    return {
        **shared,
        "0008|0018": new_uid(),  # SOP Instance UID
        "0020|0013": str(k + 1),  # Instance Number
        "0020|0032": "\\".join(f"{p:.6f}" for p in position),  # Image Position (Patient)
        "0020|0037": "\\".join(f"{v:.6f}" for v in (*direction[0::3], *direction[1::3])),  # Orientation
        "0028|0030": f"{spacing[1]:.6f}\\{spacing[0]:.6f}",  # Pixel Spacing: row step, then column step
        "0018|0050": f"{spacing[2]:.6f}",  # Slice Thickness
        "0018|0088": f"{spacing[2]:.6f}",  # Spacing Between Slices (GDCM would write 1, a 2-D slice's)
    }


def write_dicom_series(image: sitk.Image, folder: Path, series_uid: str | None = None) -> dict[str, str]:
    """Write a 3-D int16 image as one DICOM MR file per slice; return the series-wide tags written.

    Oblique directions are written as they are (the orientation tag holds the image's own direction
    cosines). The returned dict maps DICOM tags ("0020|000e": the series instance UID, ...) to values.
    """
    folder.mkdir()
    shared = {
        "0008|0016": MR_IMAGE_STORAGE,  # SOP Class UID
        "0008|0060": "MR",  # Modality
        "0010|0010": "Test^Patient",  # Patient's Name
        "0010|0020": "TEST-001",  # Patient ID
        "0020|000d": new_uid(),  # Study Instance UID
        "0020|000e": series_uid or new_uid(),  # Series Instance UID
        "0020|0052": new_uid(),  # Frame of Reference UID
        "0020|0011": "1",  # Series Number
    }
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        slice_k = image[:, :, k : k + 1]  # 3-D, so that GDCM writes the real spacing between slices
        for tag, value in _slice_tags(image, k, shared).items():
            slice_k.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(slice_k)
    return shared

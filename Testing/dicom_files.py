"""A DICOM series writer for tests: one file per slice with the standard geometry tags (SimpleITK)."""

from __future__ import annotations

import time
from pathlib import Path

import SimpleITK as sitk


def write_dicom_series(image: sitk.Image, folder: Path) -> None:
    """Write a 3-D int16 image as one DICOM file per slice with the standard geometry tags."""
    folder.mkdir()
    direction = image.GetDirection()
    orientation = "\\".join(f"{v:.6f}" for v in (*direction[0::3], *direction[1::3]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series_uid = "1.2.826.0.1.3680043.2.1125." + str(int(time.time()))
    for k in range(image.GetDepth()):
        slice_k = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in (
            ("0008|0060", "MR"), ("0020|000e", series_uid), ("0020|0013", str(k + 1)),
            ("0020|0032", "\\".join(f"{p:.6f}" for p in position)), ("0020|0037", orientation),
            ("0028|0030", f"{image.GetSpacing()[1]:.6f}\\{image.GetSpacing()[0]:.6f}"),
            ("0018|0050", f"{image.GetSpacing()[2]:.6f}"),
        ):
            slice_k.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(slice_k)

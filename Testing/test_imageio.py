"""Reading inputs: DICOM series folders keep their geometry; label maps are written atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from dicom_files import write_dicom_series
from SegMambaSlicerLib.errors import InputImageError
from SegMambaSlicerLib.io.images import read_image, write_image_atomic


def test_dicom_series_folder_reads_with_the_same_voxels_and_geometry(tmp_path: Path) -> None:
    arr = np.random.default_rng(0).integers(0, 1000, size=(6, 9, 8)).astype(np.int16)
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing((0.9, 0.9, 2.5))
    image.SetOrigin((-20.0, 11.0, 5.0))
    image.SetDirection((0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0))  # sagittal acquisition
    write_dicom_series(image, tmp_path / "series")
    loaded = read_image(tmp_path / "series")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(loaded), arr.astype(np.float32))
    np.testing.assert_allclose(loaded.GetSpacing(), image.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(loaded.GetOrigin(), image.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(loaded.GetDirection(), image.GetDirection(), atol=1e-5)


def test_folder_without_images_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(InputImageError, match="No image file or DICOM series"):
        read_image(tmp_path)


def test_four_d_and_missing_inputs_are_refused(tmp_path: Path) -> None:
    four_d = sitk.JoinSeries([sitk.Image(4, 4, 4, sitk.sitkFloat32)] * 2)
    with pytest.raises(InputImageError, match="3-D scalar volume"):
        read_image(four_d)
    with pytest.raises(InputImageError, match="does not exist"):
        read_image(tmp_path / "nope.nii.gz")


def test_atomic_write_leaves_no_temporary_file_and_usual_permissions(tmp_path: Path) -> None:
    image = sitk.Image(5, 5, 5, sitk.sitkUInt8)
    out = write_image_atomic(image, tmp_path / "sub" / "seg.nii.gz")
    assert out.exists() and [p.name for p in out.parent.iterdir()] == ["seg.nii.gz"]
    assert out.stat().st_mode & 0o044  # readable by group/others under a normal umask
    assert sitk.ReadImage(str(out)).GetSize() == (5, 5, 5)

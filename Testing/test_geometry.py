"""Reorientation and physical resampling, checked against SimpleITK's own implementations."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import SimpleITK as sitk
from SegMambaSlicerLib.errors import InputImageError
from SegMambaSlicerLib.io.geometry import direction_matrix, reorder_to, resample_onto


def _signed_permutations() -> list[np.ndarray]:
    mats = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            m = np.zeros((3, 3))
            for col, row in enumerate(perm):
                m[row, col] = signs[col]
            mats.append(m)
    return mats


def _image(direction: np.ndarray, size=(5, 6, 7), spacing=(1.0, 2.0, 3.0)) -> sitk.Image:
    arr = np.arange(np.prod(size), dtype=np.float32).reshape(size[::-1])
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin((10.0, -20.0, 5.0))
    img.SetDirection(direction.ravel().tolist())
    return img


@pytest.mark.parametrize("orientation", ["LPS", "RAS", "SAL"])
def test_reorder_matches_dicomorient_for_all_axis_aligned_grids(orientation: str) -> None:
    for direction in _signed_permutations():
        img = _image(direction)
        arr = sitk.GetArrayFromImage(img)
        reorder = reorder_to(direction_matrix(img), orientation)
        expected = sitk.GetArrayFromImage(sitk.DICOMOrient(img, orientation))
        np.testing.assert_array_equal(reorder.forward(arr), expected)
        np.testing.assert_array_equal(reorder.inverse(reorder.forward(arr)), arr)


def test_reorder_handles_leading_channel_axis_and_oblique_grid() -> None:
    angle = np.deg2rad(20)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    direction = rot @ np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], dtype=float)  # sagittal, tilted
    img = _image(direction)
    reorder = reorder_to(direction, "LPS")
    # the oblique grid's closest orientation: same choice as for the untilted one
    assert reorder == reorder_to(np.round(np.linalg.inv(rot) @ direction), "LPS")
    stack = np.stack([sitk.GetArrayFromImage(img)] * 2)
    out = reorder.forward(stack)
    np.testing.assert_array_equal(out[1], reorder.forward(stack[1]))
    np.testing.assert_array_equal(reorder.inverse(out), stack)


def _ramp_image(size, spacing, origin, direction, coeffs=(0.5, -0.25, 0.75), offset=100.0) -> sitk.Image:
    """A linear function of world position, sampled at voxel centres (linear interpolation is exact)."""
    img = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(np.asarray(direction, dtype=float).ravel().tolist())
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in size], indexing="ij"), -1).reshape(-1, 3)
    world = np.asarray(origin) + (idx * np.asarray(spacing)) @ np.asarray(direction, dtype=float).T
    values = world @ np.asarray(coeffs) + offset
    arr = values.reshape(*size).transpose(2, 1, 0)
    out = sitk.GetImageFromArray(arr.astype(np.float32))
    out.CopyInformation(img)
    return out


def test_resample_onto_is_physical_not_voxel_resizing() -> None:
    reference = _ramp_image((12, 10, 8), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), np.eye(3))
    rot = np.array([[0, 1, 0], [-1, 0, 0], [0, 0, 1]], dtype=float)
    moving = _ramp_image((30, 30, 30), (0.7, 0.9, 1.1), (-3.0, 14.0, -4.0), rot)
    out = resample_onto(moving, reference)
    assert out.GetSize() == reference.GetSize()
    np.testing.assert_allclose(sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(reference), atol=1e-3)


def test_resample_onto_same_grid_returns_input_unchanged() -> None:
    reference = _ramp_image((6, 5, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))
    assert resample_onto(reference, reference) is reference


def test_resample_onto_refuses_disjoint_images() -> None:
    reference = _ramp_image((6, 5, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))
    far = _ramp_image((6, 5, 4), (1.0, 1.0, 1.0), (500.0, 0.0, 0.0), np.eye(3))
    with pytest.raises(InputImageError, match="does not overlap"):
        resample_onto(far, reference, name="FLAIR")

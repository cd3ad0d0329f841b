"""End-to-end pipeline with fixed-weight toy networks whose output is computable by hand."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from SegMambaSlicerLib.engine.pipeline import SegmentOptions, segment
from SegMambaSlicerLib.errors import InputImageError
from toy_models import AxisGradientNet, PointwiseNet, pointwise_expected, toy_card

CPU = SegmentOptions(device="cpu")


def _image(
    arr_zyx: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None
) -> sitk.Image:
    direction = np.eye(3) if direction is None else direction
    img = sitk.GetImageFromArray(arr_zyx.astype(np.float32))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(np.asarray(direction, dtype=float).ravel().tolist())
    return img


def _world_ramp_like(grid: sitk.Image, world_axis: int) -> sitk.Image:
    """Positive values increasing along one LPS world axis, sampled on ``grid``'s voxel centres."""
    size = grid.GetSize()
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in size], indexing="ij"), -1).reshape(-1, 3)
    d = np.asarray(grid.GetDirection()).reshape(3, 3)
    world = np.asarray(grid.GetOrigin()) + (idx * np.asarray(grid.GetSpacing())) @ d.T
    values = 1000.0 + world[:, world_axis]
    out = sitk.GetImageFromArray(values.reshape(*size).transpose(2, 1, 0).astype(np.float32))
    out.CopyInformation(grid)
    return out


def test_pointwise_pipeline_equals_hand_computation_and_keeps_geometry() -> None:
    rng = np.random.default_rng(3)
    arrs = [np.zeros((18, 21, 19), np.float32) for _ in range(2)]
    for a in arrs:
        a[3:15, 2:19, 4:17] = rng.normal(10, 3, size=(12, 17, 13))
    direction = np.array([[0, 0, 1], [-1, 0, 0], [0, -1, 0]], dtype=float)
    images = [_image(a, (0.8, 1.3, 2.1), (5.0, -7.0, 11.0), direction) for a in arrs]
    weight, bias = rng.normal(size=(3, 2)), rng.normal(size=3)
    card = toy_card(channels=2, labels=2)
    result = segment(images, card, CPU, network=PointwiseNet(weight, bias))

    out = result.labelmap
    assert out.GetSize() == images[0].GetSize()
    assert out.GetSpacing() == images[0].GetSpacing() and out.GetOrigin() == images[0].GetOrigin()
    assert out.GetDirection() == images[0].GetDirection()
    # independent expectation: crop to nonzero union, z-score (float64), W·x+b, argmax, paste
    stack = np.stack(arrs).astype(np.float64)
    crop = stack[:, 3:15, 2:19, 4:17]
    z = (crop - crop.mean(axis=(1, 2, 3), keepdims=True)) / crop.std(axis=(1, 2, 3), keepdims=True)
    expected = np.zeros(arrs[0].shape, np.uint8)
    expected[3:15, 2:19, 4:17] = pointwise_expected(z, weight, bias)
    got = sitk.GetArrayFromImage(out)
    assert (got == expected).mean() > 0.999  # float rounding may flip an exact tie
    voxel_ml = np.prod(images[0].GetSpacing()) / 1000
    assert result.volumes["Label 1"] == pytest.approx((got == 1).sum() * voxel_ml)
    assert result.volumes["ALL"] == pytest.approx((got > 0).sum() * voxel_ml)


GRIDS = {
    "axial_identity": (np.eye(3), (1.0, 1.0, 1.0)),
    "flipped_LAS_like": (np.diag([1.0, -1.0, 1.0]), (1.0, 1.0, 1.0)),
    "sagittal_anisotropic": (np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], float), (0.9, 1.1, 3.0)),
    "coronal_flipped": (np.array([[-1, 0, 0], [0, 0, 1], [0, -1, 0]], float), (1.2, 1.2, 2.5)),
    "oblique_20deg": (
        np.array([[np.cos(0.35), -np.sin(0.35), 0], [np.sin(0.35), np.cos(0.35), 0], [0, 0, 1]])
        @ np.diag([1, -1, 1]),
        (1.0, 1.5, 2.0),
    ),
}


@pytest.mark.parametrize("grid_name", sorted(GRIDS))
@pytest.mark.parametrize("world_axis", [0, 1, 2])
def test_network_sees_card_orientation_for_any_input_grid(grid_name: str, world_axis: int) -> None:
    """A ramp toward L/P/S must increase along the network's x/y/z array axis (LPS card)."""
    direction, spacing = GRIDS[grid_name]
    grid = _image(np.zeros((16, 17, 18)), spacing, (3.0, -2.0, 7.0), direction)
    ramp = _world_ramp_like(grid, world_axis)
    net = AxisGradientNet(axis=4 - world_axis)  # LPS x = array axis 4, y = 3, z = 2
    result = segment([ramp], toy_card(channels=1, labels=1, roi=16), CPU, network=net)
    labels = sitk.GetArrayFromImage(result.labelmap)
    assert labels.mean() > 0.99, f"{grid_name}: network axis {4 - world_axis} does not follow world axis"


def _nibabel_file(name: str) -> Path:
    nib = pytest.importorskip("nibabel")
    path = Path(nib.__file__).parent / "tests" / "data" / name
    if not path.exists():
        pytest.skip(f"nibabel test file {name} not shipped in this nibabel version")
    return path


@pytest.mark.parametrize("name", ["anatomical.nii", "resampled_anat_moved.nii", "example4d.nii.gz"])
def test_real_file_grids_flipped_anisotropic_oblique(name: str, tmp_path: Path) -> None:
    """Real public NIfTI geometries (LAS flip, 4×4×8 mm, oblique): label map lands on the file's grid."""
    img = sitk.ReadImage(str(_nibabel_file(name)))
    if img.GetDimension() == 4:
        img = img[:, :, :, 0]
    src = tmp_path / "input.nii.gz"
    sitk.WriteImage(_world_ramp_like(img, 2), str(src))
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    roi = min(16, *img.GetSize()) if min(img.GetSize()) >= 3 else 3
    result = segment([src], toy_card(channels=1, labels=1, roi=roi), CPU, network=AxisGradientNet(axis=2))
    out = result.labelmap
    assert out.GetSize() == img.GetSize()
    np.testing.assert_allclose(out.GetOrigin(), img.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(out.GetDirection(), img.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(out.GetSpacing(), img.GetSpacing(), atol=1e-6)
    assert sitk.GetArrayFromImage(out).mean() > 0.99  # superior ramp seen along network z
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before  # input file untouched


def test_other_channels_are_resampled_physically_onto_the_first() -> None:
    ref = _image(np.ones((10, 12, 14)) * 5, (1.0, 1.0, 2.0), (0.0, 0.0, 0.0))
    moving_grid = _image(
        np.zeros((40, 40, 40)), (0.7, 0.8, 0.9), (-4.0, -3.0, -5.0), np.diag([1.0, 1.0, 1.0])
    )
    ramp = _world_ramp_like(moving_grid, 0)  # increases toward L; exact under linear interpolation
    net = PointwiseNet(np.array([[0.0, 0.0], [0.0, 1.0]]), np.zeros(2))  # label 1 where z-scored ramp > 0
    result = segment([ref, ramp], toy_card(channels=2, labels=1), CPU, network=net)
    x_world = np.arange(14) * 1.0  # reference voxel centres along x (identity direction)
    ramp_ref = np.broadcast_to(1000.0 + x_world, (10, 12, 14))
    expected = (ramp_ref > ramp_ref.mean()).astype(np.uint8)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(result.labelmap), expected)


def test_input_images_are_not_modified() -> None:
    arr = np.random.default_rng(0).normal(5, 1, (16, 16, 16)).astype(np.float32)
    img = _image(arr)
    segment(
        [img],
        toy_card(channels=1, labels=1),
        CPU,
        network=PointwiseNet(np.array([[0.0], [1.0]]), np.zeros(2)),
    )
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), arr)


def test_wrong_number_of_inputs_says_what_is_needed() -> None:
    img = _image(np.ones((8, 8, 8)))
    with pytest.raises(InputImageError, match="needs 2 input images in this order: Channel 0, Channel 1"):
        segment(
            [img], toy_card(channels=2, labels=1), CPU, network=PointwiseNet(np.zeros((2, 2)), np.zeros(2))
        )


def test_case_folder_with_brats_names(tmp_path: Path) -> None:
    card = toy_card(channels=2, labels=1)
    case = tmp_path / "BraTS-GLI-00001-000"
    case.mkdir()
    arrs = {"c0": np.full((16, 16, 16), 2.0), "c1": np.zeros((16, 16, 16))}
    arrs["c1"][4:12, 4:12, 4:12] = 9.0
    for key, a in arrs.items():
        sitk.WriteImage(_image(a), str(case / f"{case.name}-{key}.nii.gz"))
    (case / "notes.txt").write_text("not an image")
    net = PointwiseNet(np.array([[0.0, 0.0], [0.0, 1.0]]), np.zeros(2))
    labels = sitk.GetArrayFromImage(segment([case], card, CPU, network=net).labelmap)
    np.testing.assert_array_equal(labels, (arrs["c1"] > 0).astype(np.uint8))


def test_case_folder_missing_channel_lists_what_it_found(tmp_path: Path) -> None:
    sitk.WriteImage(_image(np.ones((4, 4, 4))), str(tmp_path / "case-c0.nii.gz"))
    with pytest.raises(InputImageError, match=r"no file for channel Channel 1.*case-c0.nii.gz"):
        segment(
            [tmp_path],
            toy_card(channels=2, labels=1),
            CPU,
            network=PointwiseNet(np.zeros((2, 2)), np.zeros(2)),
        )


def test_unreadable_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a nifti")
    with pytest.raises(InputImageError, match="Cannot read the Channel 0 image"):
        segment(
            [bad], toy_card(channels=1, labels=1), CPU, network=PointwiseNet(np.zeros((2, 1)), np.zeros(2))
        )


def test_an_operation_apple_gpus_lack_falls_back_to_the_cpu_with_a_message() -> None:
    """MPS misses some 3-D operations: the run is redone on the CPU and the user is told, never a crash."""
    import torch
    from SegMambaSlicerLib.engine.devices import run_with_cpu_fallback
    from SegMambaSlicerLib.errors import CancelledError

    def run(device: torch.device) -> str:
        if device.type == "mps":
            raise NotImplementedError("The operator 'aten::max_pool3d_with_indices' is not implemented for MPS")
        return f"logits on {device}"

    assert run_with_cpu_fallback(run, torch.device("cpu")) == ("logits on cpu", None)
    result, message = run_with_cpu_fallback(run, torch.device("mps"))
    assert result == "logits on cpu" and "max_pool3d" in message and "ran on the CPU instead" in message

    def fails_everywhere(device: torch.device) -> str:
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):  # other devices: the error is the user's to see
        run_with_cpu_fallback(fails_everywhere, torch.device("cuda"))

    def cancelled(device: torch.device) -> str:
        raise CancelledError("Segmentation cancelled.")

    with pytest.raises(CancelledError):  # a cancel is not a device failure
        run_with_cpu_fallback(cancelled, torch.device("mps"))

"""Cards that run the network at their own voxel size (``preprocessing.spacing``): the label map must still
land on the input grid, voxel for voxel where the resampling is exact by construction."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from SegMambaSlicerLib.engine.pipeline import SegmentOptions, segment
from SegMambaSlicerLib.engine.recipes.segmamba import resample_linear, resampled_shape
from SegMambaSlicerLib.models.cards import ModelCard
from toy_models import PointwiseNet, toy_card

CPU = SegmentOptions(device="cpu")


class ShapeRecorder(PointwiseNet):
    """A pointwise network that remembers the spatial shapes of the windows it was given."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray) -> None:
        super().__init__(weight, bias)
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape[2:]))
        return super().forward(x)


def _card(spacing: tuple[float, float, float] | None, window: tuple[int, int, int]) -> ModelCard:
    """A one-channel card whose window is exactly ``window``: one window, no padding, if the grid is that."""
    card = toy_card(channels=1, labels=1)
    return dataclasses.replace(card, preprocessing=dataclasses.replace(card.preprocessing, spacing=spacing),
                               inference=dataclasses.replace(card.inference, roi_size=window))


def _upsampled_indicator(n: int, lo: int, hi: int) -> np.ndarray:
    """The 1-D indicator of fine voxels [lo, hi) after a 2× linear down- and up-sampling (lo, hi even).

    Down: coarse voxel j averages fine 2j and 2j+1, so the box stays exact. Up: fine voxel i sits at coarse
    coordinate i/2 − 1/4, so the fine voxels next to each edge get 3/4 (inside) and 1/4 (outside).
    """
    u = np.zeros(n)
    u[lo:hi] = 1.0
    u[lo], u[hi - 1] = 0.75, 0.75
    if lo > 0:
        u[lo - 1] = 0.25
    if hi < n:
        u[hi] = 0.25
    return u


def test_resampled_shape_covers_the_same_extent() -> None:
    assert resampled_shape((126, 179, 143), (1.0, 1.0, 1.0), (2.0, 2.0, 2.0)) == (63, 90, 72)
    assert resampled_shape((155, 240, 240), (1.0, 1.0, 1.0), (3.0, 2.0, 2.0)) == (52, 120, 120)
    assert resampled_shape((1, 5, 40), (1.0, 0.5, 2.0), (4.0, 4.0, 1.0)) == (1, 1, 80)


def test_linear_resampling_is_exact_on_a_ramp_inside_the_grid() -> None:
    z = np.arange(16, dtype=np.float32)
    ramp = np.broadcast_to(z[:, None, None], (16, 4, 6))[None].copy()
    down = resample_linear(ramp, (8, 4, 6))
    assert np.allclose(down[0, :, 0, 0], 2 * np.arange(8) + 0.5)  # the mean of voxels 2j and 2j+1
    assert np.array_equal(resample_linear(ramp, ramp.shape[1:]), ramp)


@pytest.mark.parametrize(
    ("direction", "spacing", "network_shape"),
    [
        # index axes i, j, k along x, y, z; z is already 2 mm so only x and y are halved
        (np.eye(3), (1.0, 1.0, 2.0), (10, 12, 10)),
        # index axis i points to world z (2 mm), k to world x: the network's (z, y, x) come from (i, j, k)
        (np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=float), (2.0, 1.0, 1.0), (20, 12, 5)),
    ],
    ids=["axial", "permuted-axes"],
)
def test_a_card_spacing_runs_the_network_coarser_and_maps_labels_back_exactly(
    direction: np.ndarray, spacing: tuple[float, float, float], network_shape: tuple[int, int, int]
) -> None:
    size_ijk = (20, 24, 10)
    fine_axes = [i for i in range(3) if spacing[i] == 1.0]
    box = {0: (4, 14), 1: (6, 18), 2: (2, 8)}  # even edges along the axes that are halved
    array = np.ones(size_ijk[::-1], np.float32)  # (k, j, i): non-zero everywhere, so the crop is the grid
    array[box[2][0]:box[2][1], box[1][0]:box[1][1], box[0][0]:box[0][1]] = 5.0
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin((3.0, -2.0, 7.5))
    image.SetDirection(direction.ravel().tolist())

    zscored = (array - array.mean()) / array.std()
    threshold = 0.5 * (zscored.max() + zscored.min())  # label 1 where the z-scored value is above the middle
    network = ShapeRecorder(np.array([[0.0], [1.0]]), np.array([threshold, 0.0]))
    result = segment([image], _card((2.0, 2.0, 2.0), network_shape), CPU, network=network)

    assert network.shapes == [network_shape]
    indicators = [
        _upsampled_indicator(size_ijk[a], *box[a]) if a in fine_axes else
        np.isin(np.arange(size_ijk[a]), np.arange(*box[a])).astype(float)
        for a in range(3)
    ]
    expected = np.einsum("i,j,k->kji", *indicators) > 0.5  # box edges kept, its 8 corners (0.42) lost
    labels = sitk.GetArrayFromImage(result.labelmap)
    assert result.labelmap.GetSize() == image.GetSize()
    assert result.labelmap.GetSpacing() == image.GetSpacing()
    assert result.labelmap.GetOrigin() == image.GetOrigin()
    assert result.labelmap.GetDirection() == image.GetDirection()
    assert np.array_equal(labels == 1, expected)


def test_without_a_card_spacing_the_network_sees_the_crop_itself() -> None:
    array = np.zeros((12, 14, 16), np.float32)
    array[2:10, 3:11, 4:15] = np.arange(8 * 8 * 11, dtype=np.float32).reshape(8, 8, 11)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.5, 0.7, 3.0))
    network = ShapeRecorder(np.array([[0.0], [1.0]]), np.zeros(2))
    segment([image], _card(None, (8, 8, 11)), CPU, network=network)
    assert network.shapes == [(8, 8, 11)]

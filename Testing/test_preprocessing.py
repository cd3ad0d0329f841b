"""Crop-to-nonzero and z-score as the official BraTS preprocessing defines them; nnU-Net's steps."""

from __future__ import annotations

import numpy as np
import pytest
from SegMambaSlicerLib.engine.crop import nonzero_box
from SegMambaSlicerLib.engine.recipes.nnunet import (
    nnunet_export,
    nnunet_target_shape,
    normalize_nnunet,
    preprocess_nnunet,
    resample_to_shape,
    separate_z_axis,
)
from SegMambaSlicerLib.engine.recipes.segmamba import preprocess, zscore
from SegMambaSlicerLib.errors import InputImageError
from SegMambaSlicerLib.models.cards import Preprocessing
from SegMambaSlicerLib.models.nnunet import NnunetChannel, NnunetResampling, NnunetSettings


def test_nonzero_box_is_union_over_channels_half_open() -> None:
    data = np.zeros((2, 10, 12, 14), dtype=np.float32)
    data[0, 2:5, 3:4, 6:9] = 1.0
    data[1, 7, 10, 1] = -2.0  # negative values count as non-zero
    box = nonzero_box(data)
    assert box.lo == (2, 3, 1) and box.hi == (8, 11, 9)
    assert box.full_shape == (10, 12, 14)


def test_fill_holes_does_not_change_box_but_keeps_hollow_objects() -> None:
    data = np.zeros((1, 9, 9, 9), dtype=np.float32)
    data[0, 2:7, 2:7, 2:7] = 1.0
    data[0, 3:6, 3:6, 3:6] = 0.0
    box = nonzero_box(data, fill_holes=True)
    assert (box.lo, box.hi) == ((2, 2, 2), (7, 7, 7))


def test_all_zero_input_is_refused() -> None:
    with pytest.raises(InputImageError, match="zero everywhere"):
        nonzero_box(np.zeros((2, 4, 4, 4), dtype=np.float32))


def test_zscore_uses_population_std_over_the_whole_crop_including_zeros() -> None:
    x = np.array([[[[0.0, 2.0], [4.0, 6.0]]]], dtype=np.float32)  # one channel, values 0,2,4,6
    out = zscore(x)
    mean, std = 3.0, np.sqrt(5.0)  # population std of 0,2,4,6
    np.testing.assert_allclose(out.ravel(), (np.array([0, 2, 4, 6]) - mean) / std, rtol=1e-6)


def test_zscore_constant_channel_gives_zeros_not_nan() -> None:
    out = zscore(np.full((1, 2, 2, 2), 7.0, dtype=np.float32))
    assert np.all(out == 0.0)


def test_preprocess_crops_then_normalises_and_paste_restores_grid() -> None:
    rng = np.random.default_rng(0)
    data = np.zeros((2, 8, 9, 10), dtype=np.float32)
    data[:, 1:6, 2:8, 3:7] = rng.normal(5, 2, size=(2, 5, 6, 4))
    out, box = preprocess(data, Preprocessing())
    assert out.shape == (2, 5, 6, 4)
    np.testing.assert_allclose(out.mean(axis=(1, 2, 3)), 0.0, atol=1e-5)
    np.testing.assert_allclose(out.std(axis=(1, 2, 3)), 1.0, atol=1e-5)
    labels = np.ones(out.shape[1:], dtype=np.uint8)
    full = box.paste(labels)
    assert full.sum() == labels.size and full[1:6, 2:8, 3:7].all()


# ---------------------------------------------------------------- nnU-Net v2 steps (hand-computed cases;
# the comparison with nnunetv2 itself on real volumes is in test_nnunet_reference.py)

CT = NnunetChannel(
    "CTNormalization",
    intensity={"mean": 50.0, "std": 20.0, "percentile_00_5": -100.0, "percentile_99_5": 200.0},
)


def test_ct_normalisation_clips_to_the_percentiles_then_uses_dataset_mean_and_std() -> None:
    image = np.array([[[-1000.0, 50.0, 90.0, 3000.0]]], dtype=np.float32)
    out = normalize_nnunet(image, CT, np.ones(image.shape, bool))
    np.testing.assert_allclose(out.ravel(), [(-100 - 50) / 20, 0.0, 2.0, (200 - 50) / 20], rtol=1e-6)
    assert out.dtype == np.float32


def test_masked_zscore_normalises_inside_and_keeps_outside_values() -> None:
    image = np.array([[[0.0, 2.0, 4.0, 9.0]]], dtype=np.float32)
    mask = np.array([[[False, True, True, False]]])
    out = normalize_nnunet(image, NnunetChannel("ZScoreNormalization", use_mask=True), mask)
    np.testing.assert_allclose(out.ravel(), [0.0, -1.0, 1.0, 9.0], rtol=1e-6)  # mean 3, std 1 inside
    plain = normalize_nnunet(image, NnunetChannel("ZScoreNormalization"), mask)
    np.testing.assert_allclose(plain.ravel(), (image.ravel() - 3.75) / image.std(), rtol=1e-6)


def test_rescale_and_rgb_schemes() -> None:
    image = np.array([[[10.0, 20.0, 60.0]]], dtype=np.float32)
    mask = np.ones(image.shape, bool)
    np.testing.assert_allclose(
        normalize_nnunet(image, NnunetChannel("RescaleTo01Normalization"), mask).ravel(), [0.0, 0.2, 1.0]
    )
    np.testing.assert_allclose(
        normalize_nnunet(image, NnunetChannel("RGBTo01Normalization"), mask).ravel(), image.ravel() / 255
    )
    with pytest.raises(InputImageError, match="0-255"):
        normalize_nnunet(image * 10, NnunetChannel("RGBTo01Normalization"), mask)


@pytest.mark.parametrize(
    ("current", "new", "force", "axis"),
    [
        ((3.5, 1.0, 1.0), (1.0, 1.0, 1.0), None, 0),  # anisotropic input grid: its coarse axis
        ((1.0, 1.0, 1.0), (1.0, 4.0, 1.0), None, 1),  # isotropic input, anisotropic target: target's axis
        ((3.0, 1.0, 1.0), (1.0, 1.0, 1.0), None, None),  # ratio exactly 3 is not above the threshold
        ((0.24, 1.25, 1.25), (1.0, 1.0, 1.0), None, None),  # two coarse axes: no separate z
        ((1.0, 1.0, 2.0), (1.0, 1.0, 1.0), True, 2),  # forced on: coarsest current axis
        ((5.0, 1.0, 1.0), (1.0, 1.0, 1.0), False, None),  # forced off
    ],
)
def test_separate_z_decision(current, new, force, axis) -> None:
    assert separate_z_axis(current, new, NnunetResampling(force_separate_z=force)) == axis


def test_target_shape_rounds_per_axis() -> None:
    assert nnunet_target_shape((25, 41, 33), (2.0, 2.0, 2.0), (3.0, 2.5, 1.7)) == (17, 33, 39)


def test_resampling_keeps_dtype_and_range_and_returns_input_when_shape_matches() -> None:
    data = np.random.default_rng(1).normal(size=(2, 5, 6, 7)).astype(np.float32)
    same = resample_to_shape(data, (5, 6, 7), (1, 1, 1), (1, 1, 1), NnunetResampling())
    assert same is data
    up = resample_to_shape(data, (9, 11, 13), (1, 1, 1), (0.5, 0.5, 0.5), NnunetResampling())
    assert up.dtype == np.float32 and up.shape == (2, 9, 11, 13)
    assert up.min() >= data.min() and up.max() <= data.max()  # cubic overshoot is clipped as skimage does


def test_separate_z_takes_nearest_slices_across_and_interpolates_in_plane() -> None:
    """Order 0 across slices: 4 slices → 2 samples at 2·(i + 0.5) − 0.5 = 0.5, 2.5, i.e. slices 1 and 3."""
    data = np.stack([np.full((3, 3), v) for v in (10.0, 20.0, 30.0, 40.0)])[None].astype(np.float32)
    out = resample_to_shape(data, (2, 3, 3), (1.0, 1.0, 1.0), (8.0, 1.0, 1.0), NnunetResampling())
    np.testing.assert_array_equal(out[0, :, 1, 1], [20.0, 40.0])


def test_nnunet_preprocess_and_export_round_trip_on_a_transposed_grid() -> None:
    data = np.zeros((1, 6, 7, 8), dtype=np.float32)
    data[0, 1:5, 2:6, 3:7] = np.arange(64, dtype=np.float32).reshape(4, 4, 4) + 1
    settings = NnunetSettings(
        transpose_forward=(2, 0, 1), spacing=(1.0, 1.0, 1.0), channels=(NnunetChannel("NoNormalization"),)
    )
    out, geometry = preprocess_nnunet(data, (1.0, 1.0, 1.0), settings)
    np.testing.assert_array_equal(out[0], np.transpose(data[0, 1:5, 2:6, 3:7], (2, 0, 1)))
    logits = np.stack([np.zeros_like(out[0]), out[0] - 32.5])  # class 1 where value > 32.5
    labels = nnunet_export(logits, geometry, settings, (0, 7))
    np.testing.assert_array_equal(labels, np.where(data[0] > 32.5, 7, 0))

"""Crop-to-nonzero and z-score as the official BraTS preprocessing defines them."""

from __future__ import annotations

import numpy as np
import pytest

from SegMambaSlicerLib.cards import Preprocessing
from SegMambaSlicerLib.errors import InputImageError
from SegMambaSlicerLib.preprocessing import nonzero_box, preprocess, zscore


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

"""Tests of the synthetic BraTS-like phantom: determinism, BraTS geometry, labels and their contrasts."""

from __future__ import annotations

import inspect
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage
from SegMambaSlicerLib.evaluation import phantom
from SegMambaSlicerLib.evaluation.phantom import (
    MODALITIES,
    PhantomCase,
    make_phantom,
    sample_case,
    write_brats_case,
)

SMALL = (48, 48, 32)  # (x, y, z)


def _arrays(case: PhantomCase) -> tuple[dict[str, np.ndarray], np.ndarray]:
    images = {name: sitk.GetArrayFromImage(case.images[name]) for name in MODALITIES}
    return images, sitk.GetArrayFromImage(case.seg)


def _mean(image: np.ndarray, mask: np.ndarray) -> float:
    return float(image[mask].mean())


@pytest.fixture(scope="module")
def small_cases() -> list[PhantomCase]:
    return [make_phantom(SMALL, seed=seed) for seed in range(5)]


def test_same_seed_is_bit_identical_and_other_seed_differs() -> None:
    first_images, first_seg = _arrays(make_phantom(SMALL, seed=7))
    again_images, again_seg = _arrays(make_phantom(SMALL, seed=7))
    other_images, other_seg = _arrays(make_phantom(SMALL, seed=8))
    for name in MODALITIES:
        np.testing.assert_array_equal(first_images[name], again_images[name])
        assert not np.array_equal(first_images[name], other_images[name])
    np.testing.assert_array_equal(first_seg, again_seg)
    tumour_overlap = np.logical_and(first_seg > 0, other_seg > 0).sum() / np.logical_or(first_seg, other_seg).sum()
    assert tumour_overlap < 0.9  # a different tumour, not the same one with other noise


def test_brats_geometry_and_pixel_types() -> None:
    case = make_phantom((40, 36, 24), seed=0, spacing=(0.8, 0.9, 2.0))
    assert list(case.images) == list(MODALITIES)
    for image in [*case.images.values(), case.seg]:
        assert image.GetSize() == (40, 36, 24)
        assert image.GetSpacing() == pytest.approx((0.8, 0.9, 2.0))
        assert image.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
        assert image.GetOrigin() == pytest.approx((0.0, -35 * 0.9, 0.0))
    assert all(image.GetPixelID() == sitk.sitkFloat32 for image in case.images.values())
    assert case.seg.GetPixelID() == sitk.sitkUInt8


def test_default_grid_is_brats() -> None:
    """The defaults must be the BraTS 2023 grid (240×240×155 voxels of 1 mm); the full case is slow-marked."""
    params = inspect.signature(make_phantom).parameters
    assert params["shape"].default == (240, 240, 155)
    assert params["spacing"].default == (1.0, 1.0, 1.0)


def test_background_is_exactly_zero_in_every_channel(small_cases: list[PhantomCase]) -> None:
    for case in small_cases:
        images, seg = _arrays(case)
        brain = np.zeros(seg.shape, dtype=bool)
        for image in images.values():
            brain |= image != 0
        for name, image in images.items():
            assert np.all(image[brain] > 0), f"{name} has zeros inside the brain"
            assert np.all(image[~brain] == 0.0)
        assert 0.1 < brain.mean() < 0.5  # a brain surrounded by background, as after skull stripping
        faces = [brain[0], brain[-1], brain[:, 0], brain[:, -1], brain[:, :, 0], brain[:, :, -1]]
        assert not any(face.any() for face in faces)
        labels, count = ndimage.label(brain)
        assert count == 1 and np.array_equal(ndimage.binary_fill_holes(brain), brain)
        assert np.all(brain[seg > 0]), "tumour labels outside the brain"


def test_all_tumour_labels_present_with_reasonable_size(small_cases: list[PhantomCase]) -> None:
    for case in small_cases:
        images, seg = _arrays(case)
        counts = np.bincount(seg.ravel(), minlength=4)
        assert len(counts) == 4  # labels 0..3 only
        assert counts[1] >= 20 and counts[3] >= 100 and counts[2] >= 500, counts
        assert counts[1:].sum() < 0.4 * np.count_nonzero(images["t1n"])  # the tumour leaves normal brain


def test_enhancing_rim_separates_necrosis_from_edema(small_cases: list[PhantomCase]) -> None:
    """Necrosis (1) is enclosed by the enhancing rim (3), which is enclosed by oedema (2)."""
    for case in small_cases:
        _, seg = _arrays(case)
        necrosis_neighbours = ndimage.binary_dilation(seg == 1) & (seg != 1)
        assert set(np.unique(seg[necrosis_neighbours])) <= {3}
        core_neighbours = ndimage.binary_dilation((seg == 1) | (seg == 3)) & (seg != 1) & (seg != 3)
        assert (seg[core_neighbours] == 2).mean() > 0.9


def test_label_intensity_relations(small_cases: list[PhantomCase]) -> None:
    """The BraTS appearance that lets a network learn the labels from the images."""
    for case in small_cases:
        images, seg = _arrays(case)
        normal = (images["t1n"] != 0) & (seg == 0)
        assert _mean(images["t1c"], seg == 3) > 1.4 * _mean(images["t1c"], seg == 1)  # enhancing rim vs necrosis
        assert _mean(images["t1c"], seg == 3) > 1.3 * _mean(images["t1c"], normal)
        assert _mean(images["t1c"], seg == 1) < _mean(images["t1c"], normal)  # necrosis does not enhance
        assert _mean(images["t2f"], seg == 2) > 1.3 * _mean(images["t2f"], normal)  # oedema bright on FLAIR
        assert _mean(images["t2w"], seg == 2) > 1.2 * _mean(images["t2w"], normal)  # and on T2
        assert _mean(images["t2w"], seg == 1) > _mean(images["t2w"], normal)  # necrosis bright-ish on T2


def test_normal_tissue_contrasts_like_mri(small_cases: list[PhantomCase]) -> None:
    """CSF is dark on T1 and FLAIR but bright on T2, so in normal brain T1 and T2 are anti-correlated."""
    for case in small_cases:
        images, seg = _arrays(case)
        normal = (images["t1n"] != 0) & (seg == 0)
        t2_bright = normal & (images["t2w"] > np.percentile(images["t2w"][normal], 95))  # CSF
        t2_dark = normal & (images["t2w"] < np.percentile(images["t2w"][normal], 50))  # white matter
        assert images["t1n"][t2_bright].mean() < 0.7 * images["t1n"][t2_dark].mean()
        assert images["t2f"][t2_bright].mean() < 0.7 * images["t2f"][t2_dark].mean()


def test_anisotropic_spacing_keeps_all_labels() -> None:
    _, seg = _arrays(make_phantom((64, 64, 24), seed=3, spacing=(1.0, 1.0, 3.0)))
    assert set(np.unique(seg)) == {0, 1, 2, 3}


def test_write_brats_case_round_trip(tmp_path: Path) -> None:
    case = make_phantom((32, 40, 24), seed=1, spacing=(1.0, 1.0, 1.5))
    paths = write_brats_case(case, tmp_path, "BraTS-GLI-99999-000")
    case_dir = tmp_path / "BraTS-GLI-99999-000"
    expected = {key: case_dir / f"BraTS-GLI-99999-000-{key}.nii.gz" for key in (*MODALITIES, "seg")}
    assert paths == expected
    assert sorted(p.name for p in case_dir.iterdir()) == sorted(p.name for p in expected.values())
    for key, path in paths.items():
        original = case.seg if key == "seg" else case.images[key]
        read = sitk.ReadImage(str(path))
        assert read.GetSize() == original.GetSize()
        assert read.GetSpacing() == pytest.approx(original.GetSpacing())
        assert read.GetOrigin() == pytest.approx(original.GetOrigin())
        assert read.GetDirection() == pytest.approx(original.GetDirection())
        assert read.GetPixelID() == original.GetPixelID()
        np.testing.assert_array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(original))


@pytest.mark.parametrize(("shape", "case_id"), [((8, 48, 48), "ok"), ((48, 48, 32), "../escape")])
def test_invalid_inputs_are_rejected(shape: tuple[int, int, int], case_id: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_brats_case(make_phantom(shape, seed=0), tmp_path, case_id)


@pytest.mark.slow
def test_full_brats_case_is_fast_and_complete() -> None:
    start = time.perf_counter()
    case = make_phantom(seed=2)
    elapsed = time.perf_counter() - start
    images, seg = _arrays(case)
    assert case.seg.GetSize() == (240, 240, 155)
    assert case.images["t1c"].GetOrigin() == (0.0, -239.0, 0.0)
    assert set(np.unique(seg)) == {0, 1, 2, 3}
    assert np.bincount(seg.ravel())[1:].sum() > 10_000  # a tumour of clinically plausible volume (> 10 ml)
    assert elapsed < 15.0


# ---------------------------------------------------------------- sample data


def test_sample_case_is_generated_once_then_reused(home, monkeypatch) -> None:
    paths = sample_case(shape=(24, 24, 16))
    assert set(paths) == {"t2w", "t2f", "t1n", "t1c", "seg"}
    assert all(p.is_file() and p.is_relative_to(home / "samples" / "24x24x16") for p in paths.values())

    def refuse(*args, **kwargs):
        raise AssertionError("the cached case must be reused")

    monkeypatch.setattr(phantom, "make_phantom", refuse)
    assert sample_case(shape=(24, 24, 16)) == paths
    paths["t1c"].unlink()  # an incomplete case is regenerated
    with pytest.raises(AssertionError, match="reused"):
        sample_case(shape=(24, 24, 16))

"""Our nnU-Net preprocessing, tiling, ensembling and export against the nnunetv2 package's own output.

The expected values were computed once by nnunetv2 2.8.1's own functions (DefaultPreprocessor,
compute_steps_for_sliding_window, compute_gaussian, nnUNetPredictor with two folds,
convert_predicted_logits_to_segmentation_with_correct_shape) on real NIfTI volumes shipped with
nibabel; see fixtures_nnunet/make_reference.py (run in a scratch environment with nnunetv2).
nnunetv2 2.1.2, the release closest to the MambaClinix fork, gave identical preprocessing,
window starts and exports.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from SegMambaSlicerLib.engine.inference import (
    WindowSettings,
    count_windows,
    nnunet_gaussian,
    nnunet_steps,
    predict_logits,
)
from SegMambaSlicerLib.engine.pipeline import SegmentOptions, segment, window_settings
from SegMambaSlicerLib.engine.recipes.nnunet import nnunet_export, preprocess_nnunet
from SegMambaSlicerLib.models.nnunet import FoldEnsemble, settings_from_plans
from toy_models import nnunet_result_card

HERE = Path(__file__).resolve().parent / "fixtures_nnunet"
pytest.importorskip("nibabel", reason="the reference volumes are nibabel's test data")
_spec = importlib.util.spec_from_file_location("nnunet_reference_cases", HERE / "make_reference.py")
cases = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(cases)  # type: ignore[union-attr]
REF = np.load(HERE / "reference.npz")
CPU = torch.device("cpu")


def _settings(case: str):
    return settings_from_plans(cases.plans_for(case), cases.dataset_for(case), "3d_fullres")


def _label_values(case: str) -> tuple[int, ...]:
    return (0, 1, 2, 3) if cases.CASES[case].get("regions") else tuple(range(cases.num_outputs(case)))


@pytest.mark.parametrize("case", cases.PREPROCESSING_CASES)
def test_preprocessing_equals_nnunetv2(case: str) -> None:
    """Transpose, crop, every normalisation scheme, resampling incl. separate z (forced and by anisotropy)."""
    data, spacing = cases.case_input(case)
    out, geometry = preprocess_nnunet(data, spacing, _settings(case))
    expected = REF[f"{case}__data"]
    assert out.shape == expected.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    bbox = REF[f"{case}__bbox"]
    assert list(geometry.box.lo) == bbox[:, 0].tolist() and list(geometry.box.hi) == bbox[:, 1].tolist()


@pytest.mark.parametrize("case", cases.PREPROCESSING_CASES)
def test_export_equals_nnunetv2(case: str) -> None:
    """Resample logits back (order 1, separate z), softmax-argmax or regions, uncrop, transpose back."""
    data, spacing = cases.case_input(case)
    settings = _settings(case)
    _, geometry = preprocess_nnunet(data, spacing, settings)
    logits = cases.synthetic_logits(REF[f"{case}__data"].shape[1:], cases.num_outputs(case))
    labels = nnunet_export(logits, geometry, settings, _label_values(case))
    expected = REF[f"{case}__export"]
    assert labels.shape == data.shape[1:] == expected.shape
    np.testing.assert_array_equal(labels, expected)
    assert len(np.unique(expected)) > 1  # the case exercises more than background


def test_window_starts_equal_nnunetv2() -> None:
    for i, (size, tile, step) in enumerate(cases.STEP_CASES):
        assert nnunet_steps(size, tile, step) == REF[f"steps__{i}"].tolist(), (size, tile, step)


@pytest.mark.parametrize("tile", cases.GAUSSIAN_TILES)
def test_importance_map_equals_nnunetv2(tile: tuple[int, int, int]) -> None:
    expected = REF["gaussian__" + "x".join(map(str, tile))].astype(np.float32)
    np.testing.assert_allclose(nnunet_gaussian(tile).numpy(), expected, rtol=1e-3, atol=0)
    assert expected.max() == 10.0


@pytest.mark.parametrize("case", cases.E2E_CASES)
def test_sliding_window_two_folds_and_mirroring_equal_nnunet_predictor(case: str, tmp_path: Path) -> None:
    """Padding, window starts, Gaussian blending, per-window mirroring, fold mean (float32 buffers)."""
    card = nnunet_result_card(cases, case, tmp_path)
    settings = window_settings(card, SegmentOptions(device="cpu", tta=True, sw_batch_size=8))
    assert settings.tiling == "nnunet"
    image = torch.from_numpy(REF[f"{case}__input"])[None]
    logits = predict_logits(FoldEnsemble(cases.toy_folds(case)), image, settings, CPU)
    expected = REF[f"{case}__logits32"]
    np.testing.assert_allclose(logits[0].numpy(), expected, rtol=1e-5, atol=2e-5 * np.abs(expected).max())


@pytest.mark.parametrize("case", cases.E2E_CASES)
def test_segment_equals_nnunet_predictor_on_real_files(case: str, tmp_path: Path) -> None:
    """The whole pipeline on a real NIfTI file: read, preprocess, 2-fold ensemble, export, input geometry."""
    card = nnunet_result_card(cases, case, tmp_path)
    path = cases.nibabel_data(cases.CASES[case]["input"])
    options = SegmentOptions(device="cpu", tta=cases.CASES[case]["mirror"] is not None, sw_batch_size=8)
    result = segment([path], card, options, network=FoldEnsemble(cases.toy_folds(case)))
    labels = sitk.GetArrayFromImage(result.labelmap)
    np.testing.assert_array_equal(labels, REF[f"{case}__labels32"])
    # nnU-Net's own float16 buffers flip a handful of boundary voxels (2 and 5 here), no more
    assert (labels != REF[f"{case}__labels"]).sum() <= 8
    source = sitk.ReadImage(str(path))
    assert result.labelmap.GetSize() == source.GetSize()
    np.testing.assert_allclose(result.labelmap.GetDirection(), source.GetDirection(), atol=1e-7)
    np.testing.assert_allclose(result.labelmap.GetOrigin(), source.GetOrigin(), atol=1e-5)
    shape = REF[f"{case}__input"].shape[1:]
    assert result.windows == count_windows(
        shape, WindowSettings(card.inference.roi_size, 0.5, 1, tiling="nnunet")
    )

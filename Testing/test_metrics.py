"""Dice / HD95 per label and BraTS region, cross-checked against MONAI and SimpleITK and hand-computed cases."""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from scipy import ndimage
from SegMambaSlicerLib.cli import build_parser
from SegMambaSlicerLib.evaluation import metrics
from SegMambaSlicerLib.evaluation.metrics import (
    BRATS_GROUPS,
    FAILED,
    MISSING,
    OK,
    Group,
    MetricsError,
    evaluate_folders,
    image_diagonal_mm,
    score_case,
)

SPACING = (0.7, 1.3, 2.9)  # SimpleITK order (x, y, z): strongly anisotropic, so an axis mix-up shows


def _labels(array_zyx: np.ndarray, spacing=SPACING, origin=(3.0, -5.0, 7.5)) -> sitk.Image:
    image = sitk.GetImageFromArray(array_zyx.astype(np.uint8))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


def _blobs(rng: np.random.Generator, shape=(14, 22, 18)) -> np.ndarray:
    """A random label map with labels 1-3 as smooth nested blobs; some touch the image border."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), 2.5)
    field /= np.abs(field).max()
    labels = np.zeros(shape, np.uint8)
    labels[field > 0.0] = 2
    labels[field > 0.25] = 3
    labels[field > 0.5] = 1
    return labels


def _monai(pred: np.ndarray, ref: np.ndarray, spacing_zyx) -> tuple[float, float]:
    p = torch.from_numpy(pred)[None, None].float()
    r = torch.from_numpy(ref)[None, None].float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd = compute_hausdorff_distance(p, r, percentile=95, spacing=list(spacing_zyx)).item()
    return compute_dice(p, r).item(), hd


def test_scores_match_monai_and_simpleitk_per_label_and_region() -> None:
    rng = np.random.default_rng(7)
    for _ in range(4):
        pred_arr, ref_arr = _blobs(rng), _blobs(rng)
        pred, ref = _labels(pred_arr), _labels(ref_arr)
        scores = score_case(pred, ref, BRATS_GROUPS)
        overlap = sitk.LabelOverlapMeasuresImageFilter()
        overlap.Execute(ref, pred)
        for score in scores:
            p, r = np.isin(pred_arr, score.group.values), np.isin(ref_arr, score.group.values)
            assert p.any() and r.any()
            dice, hd = _monai(p, r, SPACING[::-1])
            assert score.dice == pytest.approx(dice, abs=1e-6)
            assert score.hd95 == pytest.approx(hd, rel=1e-5)
            if score.group.kind == "label":
                assert score.dice == pytest.approx(overlap.GetDiceCoefficient(score.group.values[0]), abs=1e-6)


def test_hd95_uses_the_spacing_of_each_axis() -> None:
    """Single voxels 3 apart: 3 × 0.7 mm along x, 3 × 2.9 mm along z (array axis 0)."""
    pred = np.zeros((8, 6, 6), np.uint8)
    pred[2, 3, 1] = 1
    along_x, along_z = np.zeros_like(pred), np.zeros_like(pred)
    along_x[2, 3, 4] = 1
    along_z[5, 3, 1] = 1
    group = (Group("label", "one", (1,)),)
    assert score_case(_labels(pred), _labels(along_x), group)[0].hd95 == pytest.approx(2.1)
    assert score_case(_labels(pred), _labels(along_z), group)[0].hd95 == pytest.approx(8.7)


def test_hd95_is_the_larger_directed_95th_percentile() -> None:
    """A 4×4×4 cube against itself plus one voxel 10 voxels away (1 mm grid).

    Prediction → reference: 56 surface voxels at 0 and the stray voxel at 10 mm; the 95th percentile of
    these 57 values (linear interpolation) is 0. Reference → prediction: every surface voxel is at 0.
    With more stray voxels (4 in a row) the prediction's 95th percentile reaches them: 60 values, four of
    them 10, 11, 12, 13 mm → position 0.95 × 59 = 56.05 → 10 + 0.05 × 1 = 10.05 mm.
    """
    ref = np.zeros((20, 8, 8), np.uint8)
    ref[2:6, 2:6, 2:6] = 1
    pred = ref.copy()
    pred[15, 3, 3] = 1
    ones = (Group("label", "one", (1,)),)
    spacing = (1.0, 1.0, 1.0)
    assert score_case(_labels(pred, spacing), _labels(ref, spacing), ones)[0].hd95 == pytest.approx(0.0)
    pred[15:19, 3, 3] = 1
    assert score_case(_labels(pred, spacing), _labels(ref, spacing), ones)[0].hd95 == pytest.approx(10.05)


def test_empty_masks_follow_the_documented_convention() -> None:
    empty, tumour = np.zeros((6, 7, 8), np.uint8), np.zeros((6, 7, 8), np.uint8)
    tumour[2:4, 2:5, 3:6] = 3
    diagonal = math.sqrt((8 * 0.7) ** 2 + (7 * 1.3) ** 2 + (6 * 2.9) ** 2)
    scores = {(s.group.kind, s.group.name): s for s in score_case(_labels(empty), _labels(empty))}
    assert {(s.dice, s.hd95, s.note) for s in scores.values()} == {(1.0, 0.0, metrics.BOTH_EMPTY)}

    scores = {(s.group.kind, s.group.name): s for s in score_case(_labels(empty), _labels(tumour))}
    et = scores["region", "ET"]
    assert (et.dice, et.note) == (0.0, metrics.PRED_EMPTY) and et.hd95 == pytest.approx(diagonal)
    assert scores["label", "NCR"].hd95 == 0.0 and scores["label", "NCR"].dice == 1.0
    missed = score_case(_labels(tumour), _labels(empty), one_empty_hd95=math.nan)
    assert math.isnan({s.group.name: s for s in missed}["WT"].hd95)
    assert {s.group.name: s for s in missed}["WT"].note == metrics.REF_EMPTY
    assert image_diagonal_mm(sitk.Image(240, 240, 155, sitk.sitkUInt8)) == pytest.approx(373.1287, abs=1e-4)


def test_regions_pool_labels() -> None:
    """Necrosis and enhancement swapped: the labels disagree, the TC and WT regions agree exactly."""
    ref = np.zeros((10, 10, 10), np.uint8)
    ref[2:8, 2:8, 2:8] = 2
    ref[3:7, 3:7, 3:7] = 3
    ref[4:6, 4:6, 4:6] = 1
    pred = ref.copy()
    pred[ref == 1], pred[ref == 3] = 3, 1
    scores = {(s.group.kind, s.group.name): s for s in score_case(_labels(pred), _labels(ref))}
    assert scores["region", "TC"].dice == 1.0 and scores["region", "TC"].hd95 == 0.0
    assert scores["region", "WT"].dice == 1.0
    assert scores["label", "ED"].dice == 1.0
    assert scores["label", "NCR"].dice == 0.0 and scores["label", "ET"].dice < 0.5
    assert scores["label", "NCR"].pred_voxels == 56 and scores["label", "NCR"].ref_voxels == 8


def test_grids_and_values_are_checked() -> None:
    ref = _labels(np.zeros((4, 5, 6)))
    with pytest.raises(MetricsError, match="size"):
        score_case(_labels(np.zeros((4, 5, 7))), ref)
    with pytest.raises(MetricsError, match="spacing"):
        score_case(_labels(np.zeros((4, 5, 6)), spacing=(1.0, 1.0, 1.0)), ref)
    probabilities = sitk.GetImageFromArray(np.full((4, 5, 6), 0.4, np.float32))
    probabilities.CopyInformation(ref)
    with pytest.raises(MetricsError, match="non-integer"):
        score_case(probabilities, ref)


# ---------------------------------------------------------------- folders and command line


def _write(image: sitk.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """BraTS-layout references (with image files beside them) and flat predictions for three cases."""
    rng = np.random.default_rng(1)
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    pred_dir.mkdir()
    arrays = {}
    for case in ("C1", "C2", "C3"):
        ref, pred = _blobs(rng), _blobs(rng)
        arrays[case] = (pred, ref)
        _write(_labels(ref), ref_dir / case / f"{case}-seg.nii.gz")
        _write(_labels(rng.normal(size=ref.shape).astype(np.float32)), ref_dir / case / f"{case}-t2w.nii.gz")
        _write(_labels(pred), pred_dir / f"{case}.nii.gz")
    return pred_dir, ref_dir, arrays


def test_evaluate_folders_scores_every_reference(folders) -> None:
    pred_dir, ref_dir, arrays = folders
    (pred_dir / "C2.nii.gz").unlink()
    _write(_labels(np.zeros((3, 3, 3))), pred_dir / "C3.nii.gz")
    _write(_labels(np.zeros((3, 3, 3))), pred_dir / "extra.nii.gz")
    (pred_dir / ".C1.nii.gz.tmp123.nii.gz").write_bytes(b"half written")
    evaluation = evaluate_folders(pred_dir, ref_dir)
    assert [(c.case, c.status) for c in evaluation.cases] == [("C1", OK), ("C2", MISSING), ("C3", FAILED)]
    assert "size" in evaluation.cases[2].error and evaluation.unmatched_predictions == ("extra",)
    assert not evaluation.complete
    pred, ref = arrays["C1"]
    wt = {s.group.name: s for s in evaluation.cases[0].scores}["WT"]
    assert (wt.dice, wt.hd95) == pytest.approx(_monai(pred > 0, ref > 0, SPACING[::-1]), rel=1e-5)


def test_evaluate_command_writes_csvs_and_a_summary(folders, capsys) -> None:
    pred_dir, ref_dir, arrays = folders
    args = build_parser().parse_args(["evaluate", str(pred_dir), str(ref_dir)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:5] == ["KIND", "SEGMENT", "LABELS", "N", "DICE"]
    with open(pred_dir / "metrics.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 * len(BRATS_GROUPS)
    assert list(rows[0]) == list(metrics.CASE_COLUMNS)
    wt = {r["case"]: r for r in rows if r["segment"] == "WT"}
    expected = {case: _monai(pred > 0, ref > 0, SPACING[::-1]) for case, (pred, ref) in arrays.items()}
    for case, (dice, hd) in expected.items():
        assert float(wt[case]["dice"]) == pytest.approx(dice, abs=1e-5)
        assert float(wt[case]["hd95_mm"]) == pytest.approx(hd, abs=1e-3)
        voxel_ml = np.prod(SPACING) / 1000.0
        assert float(wt[case]["ref_ml"]) == pytest.approx((arrays[case][1] > 0).sum() * voxel_ml, abs=1e-5)
    with open(pred_dir / "metrics_summary.csv", newline="", encoding="utf-8") as fh:
        summary = {(r["kind"], r["segment"]): r for r in csv.DictReader(fh)}
    assert float(summary["region", "WT"]["dice_mean"]) == pytest.approx(
        np.mean([d for d, _ in expected.values()]), abs=1e-4)
    assert float(summary["region", "WT"]["hd95_median_mm"]) == pytest.approx(
        np.median([h for _, h in expected.values()]), abs=0.01)
    assert summary["region", "WT"]["cases"] == "3"

    (pred_dir / "C2.nii.gz").unlink()
    args = build_parser().parse_args(["evaluate", str(pred_dir), str(ref_dir), "--csv", str(pred_dir / "x.csv"),
                                      "--one-empty-hd95", "nan"])
    assert args.func(args) == 1
    assert "not scored: C2: no prediction" in capsys.readouterr().out
    assert (pred_dir / "x_summary.csv").is_file()


def test_flat_reference_folders_and_missing_folders(tmp_path, folders) -> None:
    pred_dir, ref_dir, _ = folders
    flat = tmp_path / "labelsTs"
    for case in ("C1", "C2", "C3"):
        _write(sitk.ReadImage(str(ref_dir / case / f"{case}-seg.nii.gz")), flat / f"{case}.nii.gz")
    assert [c.status for c in evaluate_folders(pred_dir, flat).cases] == [OK, OK, OK]
    with pytest.raises(MetricsError, match="does not exist"):
        evaluate_folders(pred_dir, tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MetricsError, match="No reference label maps"):
        evaluate_folders(pred_dir, tmp_path / "empty")

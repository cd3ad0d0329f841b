"""Report files: the volumes CSV against hand counts, preview slices in radiological convention, the PNG."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image
from SegMambaSlicerLib.engine.volumes import volumes_ml
from SegMambaSlicerLib.io.report import ReportError, preview_panels, write_preview_png, write_volumes_csv
from SegMambaSlicerLib.models.cards import builtin_cards

CARD = builtin_cards()["segmamba-brats2023"]
SHAPE_ZYX = (12, 16, 20)


def _lps_pair(spacing=(1.0, 1.0, 1.0)) -> tuple[sitk.Image, sitk.Image]:
    """An identity-direction (LPS) image with a gradient and a label blob left, anterior, superior.

    Index i grows toward the patient's left, j toward posterior, k toward superior.
    """
    z, y, x = np.meshgrid(*[np.arange(n) for n in SHAPE_ZYX], indexing="ij")
    image = (100.0 + x + 10 * y + 100 * z).astype(np.float32)
    labels = np.zeros(SHAPE_ZYX, np.uint8)
    labels[8:11, 2:6, 13:18] = 1  # superior (high k), anterior (low j), left (high i)
    labels[9, 3:5, 14:16] = 3
    pair = []
    for array in (image, labels):
        img = sitk.GetImageFromArray(array)
        img.SetSpacing(spacing)
        img.SetOrigin((-5.0, 7.0, 2.0))
        pair.append(img)
    return pair[0], pair[1]


def test_volumes_csv_matches_hand_counts_and_measure(tmp_path) -> None:
    _, labelmap = _lps_pair(spacing=(0.5, 1.0, 2.0))  # 1 mm³ = 0.001 mL per voxel
    volumes = volumes_ml(labelmap, CARD)
    path = write_volumes_csv(volumes, CARD, tmp_path / "sub" / "volumes.csv")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    n3 = 1 * 2 * 2
    n1 = 3 * 4 * 5 - n3
    expected = {  # segment -> (label_values, mL) by hand
        "Necrotic tumor core": ("1", n1 / 1000), "Peritumoral edema": ("2", 0.0), "Enhancing tumor": ("3", n3 / 1000),
        "TC": ("1+3", (n1 + n3) / 1000), "WT": ("1+2+3", (n1 + n3) / 1000), "ET": ("3", n3 / 1000),
    }
    assert [row["segment"] for row in rows] == list(expected)
    for row in rows:
        values, ml = expected[row["segment"]]
        assert row["label_values"] == values
        assert float(row["volume_ml"]) == pytest.approx(ml, abs=1e-9)
        assert float(row["volume_ml"]) == pytest.approx(volumes[row["segment"]], abs=1e-9)
    assert rows[0]["description"] == "NCR" and rows[3]["description"] == "Tumor core (NCR + ET)"
    assert [p.name for p in path.parent.iterdir()] == ["volumes.csv"]  # no temporary file left


def test_volumes_csv_refuses_unmeasured_segments(tmp_path) -> None:
    with pytest.raises(ReportError, match="No volume was measured for TC, WT, ET"):
        write_volumes_csv({lab.name: 1.0 for lab in CARD.labels}, CARD, tmp_path / "v.csv")
    assert not (tmp_path / "v.csv").exists()


def test_panels_are_radiological_and_pass_through_the_labels() -> None:
    image, labelmap = _lps_pair(spacing=(0.8, 1.0, 2.5))
    axial, coronal, sagittal = preview_panels(image, labelmap)
    # centre of mass of the blob (hand-computed from the boxes above; label 3 is inside label 1's box)
    assert (axial.index, coronal.index, sagittal.index) == (9, 4, 15)
    assert axial.labels.shape == (16, 20) and coronal.labels.shape == (12, 20) and sagittal.labels.shape == (12, 16)
    for panel in (axial, coronal, sagittal):
        assert (panel.labels == 1).any() and (panel.labels == 3).any()
    rows, cols = np.nonzero(axial.labels)
    assert cols.min() >= 10 and rows.max() < 8  # patient's left on the viewer's right; anterior at the top
    rows, cols = np.nonzero(coronal.labels)
    assert cols.min() >= 10 and rows.max() < 6  # superior at the top
    rows, cols = np.nonzero(sagittal.labels)
    assert cols.max() < 8 and rows.max() < 6  # anterior on the left, superior at the top
    assert (axial.left, axial.right, sagittal.left, sagittal.right) == ("R", "L", "A", "P")
    # image values: x grows to the viewer's right, superior (high z) is the top row
    assert axial.image[0, 0] == 100 + 0 + 0 + 900 and axial.image[0, 1] - axial.image[0, 0] == 1
    assert coronal.image[0, 0] == 100 + 0 + 40 + 1100 and coronal.image[1, 0] == coronal.image[0, 0] - 100
    assert axial.aspect == pytest.approx(1.0 / 0.8) and coronal.aspect == pytest.approx(2.5 / 0.8)
    assert sagittal.aspect == pytest.approx(2.5)


@pytest.mark.parametrize("orientation", ["RAS", "PIR", "ASL"])
def test_panels_do_not_depend_on_the_voxel_order_on_disk(orientation) -> None:
    image, labelmap = _lps_pair(spacing=(0.8, 1.0, 2.5))
    reference = preview_panels(image, labelmap)
    moved_image, moved_labels = sitk.DICOMOrient(image, orientation), sitk.DICOMOrient(labelmap, orientation)
    assert moved_image.GetDirection() != image.GetDirection()
    for got, want in zip(preview_panels(moved_image, moved_labels), reference):
        assert (got.view, got.index, got.aspect) == (want.view, want.index, pytest.approx(want.aspect))
        np.testing.assert_array_equal(got.image, want.image)
        np.testing.assert_array_equal(got.labels, want.labels)


def test_empty_label_map_gives_middle_slices() -> None:
    image, labelmap = _lps_pair()
    empty = sitk.Image(labelmap.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(labelmap)
    assert [p.index for p in preview_panels(image, empty)] == [6, 8, 10]


def test_preview_png_has_three_panels_with_label_colours(tmp_path) -> None:
    image, labelmap = _lps_pair()
    path = write_preview_png([image, image], labelmap, CARD, tmp_path / "preview.png")
    with Image.open(path) as png:
        assert png.format == "PNG"
        width, height = png.size
        pixels = np.asarray(png.convert("RGB")).astype(int)
    assert width > 2 * height  # three panels side by side
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    # label 1 is pure red at 45 % over grey: red exceeds green and blue by about 0.45 * 255
    assert ((red - green > 80) & (red - blue > 80)).sum() > 50
    assert [p.name for p in tmp_path.iterdir()] == ["preview.png"]


def test_preview_refuses_a_label_map_on_another_grid(tmp_path) -> None:
    image, _ = _lps_pair()
    other = sitk.Image((5, 5, 5), sitk.sitkUInt8)
    with pytest.raises(ReportError, match="not on the image's grid"):
        write_preview_png(image, other, CARD, tmp_path / "p.png")
    assert not (tmp_path / "p.png").exists()

"""DICOM Segmentation output: the SEG holds the label map voxel for voxel on its DICOM source series.

Small MR series (axial, sagittal with flipped axes, oblique) are written with SimpleITK; a known label
map on the grid the pipeline reads from them is written as a SEG; two independent readers rebuild it:
pydicom frame by frame (each frame placed by its own ImagePositionPatient) and highdicom's own reader.
The command line is tested end to end with a tiny model whose first input is a DICOM folder, and for
its one-line refusals before any work.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from dicom_files import write_dicom_series
from filesystems import fill_up, mounted_tmpfs
from SegMambaSlicerLib.cli import EXIT_USER_ERROR, main
from SegMambaSlicerLib.errors import ModelCardError
from SegMambaSlicerLib.io.atomic import OutputError
from SegMambaSlicerLib.io.dicom_seg import (
    TISSUE,
    Coded,
    Terminology,
    label_terminology,
    parse_terminology,
    write_dicom_seg,
)
from SegMambaSlicerLib.io.images import read_image
from SegMambaSlicerLib.models.cards import LabelSpec, find_card
from toy_models import case_inputs

hd = pytest.importorskip("highdicom", reason="DICOM SEG output needs the 'dicom' extra (highdicom)")
pydicom = pytest.importorskip("pydicom")

SHAPE = (40, 36, 24)
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
_DICOM_LIST = "Segmentation category and type - DICOM master list"
_ANATOMY_LIST = "Anatomic codes - DICOM master list"
KIDNEY_LEFT = (f"{_DICOM_LIST}~SCT^123037004^Anatomical Structure~SCT^64033007^Kidney~SCT^7771000^Left"
               f"~{_ANATOMY_LIST}~SCT^818981001^Abdomen~SCT^24028007^Right|")


def _brats_labels() -> list[LabelSpec]:
    return list(find_card("segmamba-brats2023").labels)


def _labels() -> list[LabelSpec]:
    """BraTS labels renumbered 1, 2, 4 (as BraTS 2021 numbers them), one with modifiers, one uncoded."""
    necrosis, edema, enhancing = _brats_labels()
    return [
        necrosis,
        edema,  # absent from the label map: an empty segment
        LabelSpec(4, enhancing.name, enhancing.color, enhancing.terminology),
        LabelSpec(5, "Left kidney", (0.2, 0.4, 0.6), KIDNEY_LEFT),
        LabelSpec(6, "Something else", (0.5, 0.5, 0.5)),
    ]


def _rotation(a: float, b: float) -> tuple[float, ...]:
    """A rotation by ``a`` about z then ``b`` about x, row-major, as SimpleITK's direction."""
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return tuple((rz @ rx).ravel())


GEOMETRIES = {
    "axial": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
    "sagittal-flipped": (0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0),
    "oblique": _rotation(0.3, 0.2),
}


def _series(folder: Path, direction: tuple[float, ...]) -> tuple[sitk.Image, dict[str, str]]:
    """An MR series (9 x 8 x 6 voxels, anisotropic) in ``folder`` and the grid the pipeline reads from it."""
    voxels = np.random.default_rng(0).integers(0, 1000, size=(6, 8, 9)).astype(np.int16)
    image = sitk.GetImageFromArray(voxels)
    image.SetSpacing((0.9, 1.1, 2.5))
    image.SetOrigin((-20.0, 11.0, 5.0))
    image.SetDirection(direction)
    tags = write_dicom_series(image, folder)
    return read_image(folder), tags


def _known_labels(grid: sitk.Image) -> sitk.Image:
    """Blocks of labels 1 and 4, a few voxels of 5 and 6, no 2, and a value (7) that is no label."""
    array = np.zeros(grid.GetSize()[::-1], dtype=np.uint8)
    array[1:4, 2:6, 3:7] = 1
    array[2:5, 5:8, 1:3] = 4
    array[0, 0, 0] = array[5, 7, 8] = 5
    array[3, 0, 8] = 6
    array[4, 1, 1] = 7
    labelmap = sitk.GetImageFromArray(array)
    labelmap.CopyInformation(grid)
    return labelmap


def _expected_masks(labelmap: sitk.Image, labels: list[LabelSpec]) -> np.ndarray:
    """(segment, z, y, x): segment i + 1 is where the label map holds label i's value."""
    array = sitk.GetArrayFromImage(labelmap)
    return np.stack([array == label.value for label in labels]).astype(np.uint8)


def _source_instances(folder: Path, grid: sitk.Image) -> dict[str, int]:
    """SOP instance UID of each source file -> its slice index on the grid (by its own position)."""
    return {ds.SOPInstanceUID: _slice_index(grid, ds.ImagePositionPatient)
            for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in folder.iterdir())}


def _slice_index(grid: sitk.Image, position: object) -> int:
    """The slice k whose corner voxel (0, 0, k) lies at ``position``; fails when it lies elsewhere."""
    index = grid.TransformPhysicalPointToContinuousIndex([float(v) for v in position])
    k = round(index[2])
    np.testing.assert_allclose(index, (0.0, 0.0, k), atol=1e-3)
    return k


def _read_with_pydicom(path: Path, grid: sitk.Image, segments: int, sources: dict[str, int]) -> np.ndarray:
    """(segment, z, y, x) rebuilt frame by frame: segment number and position from each frame's own items."""
    ds = pydicom.dcmread(path)
    shared = ds.SharedFunctionalGroupsSequence[0]
    direction = np.asarray(grid.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(shared.PlaneOrientationSequence[0].ImageOrientationPatient,
                               [*direction[:, 0], *direction[:, 1]], atol=1e-5)
    spacing = grid.GetSpacing()
    np.testing.assert_allclose(shared.PixelMeasuresSequence[0].PixelSpacing, (spacing[1], spacing[0]), rtol=1e-6)
    assert (ds.Rows, ds.Columns) == (grid.GetSize()[1], grid.GetSize()[0])
    frames = ds.pixel_array.reshape(int(ds.NumberOfFrames), ds.Rows, ds.Columns)
    out = np.zeros((segments, *grid.GetSize()[::-1]), dtype=np.uint8)
    for frame, item in zip(frames, ds.PerFrameFunctionalGroupsSequence, strict=True):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        k = _slice_index(grid, item.PlanePositionSequence[0].ImagePositionPatient)
        referenced = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert sources[referenced] == k  # each frame names the source slice it lies on
        out[number - 1, k] = frame
    return out


def _grid_volume(grid: sitk.Image) -> object:
    """An empty highdicom Volume on the grid: index (slice, row, column) = SimpleITK's (z, y, x)."""
    steps = np.asarray(grid.GetDirection()).reshape(3, 3) @ np.diag(grid.GetSpacing())
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2] = steps[:, 2], steps[:, 1], steps[:, 0]
    affine[:3, 3] = grid.GetOrigin()
    return hd.Volume(np.zeros(grid.GetSize()[::-1], dtype=np.uint8), affine, coordinate_system="PATIENT")


def _read_with_highdicom(path: Path, grid: sitk.Image) -> np.ndarray:
    """(z, y, x) segment numbers by highdicom's reader, moved onto the grid (padding slices with no frames)."""
    volume = hd.seg.segread(path).get_volume(combine_segments=True)
    return volume.match_geometry(_grid_volume(grid), tol=1e-3).array


def _coded(item: object) -> Coded:
    return Coded(item.CodingSchemeDesignator, item.CodeValue, item.CodeMeaning)


# ---------------------------------------------------------------- terminology


def test_slicer_terminology_strings_become_codes() -> None:
    necrosis = parse_terminology(_brats_labels()[0].terminology)
    assert necrosis == Terminology(Coded("SCT", "49755003", "Morphologically Altered Structure"),
                                   Coded("SCT", "6574001", "Necrosis"), None, Coded("SCT", "12738006", "Brain"))
    assert parse_terminology(KIDNEY_LEFT) == Terminology(
        Coded("SCT", "123037004", "Anatomical Structure"), Coded("SCT", "64033007", "Kidney"),
        Coded("SCT", "7771000", "Left"), Coded("SCT", "818981001", "Abdomen"), Coded("SCT", "24028007", "Right"),
    )
    assert label_terminology(LabelSpec(1, "x", (1.0, 0.0, 0.0))) == TISSUE  # Slicer's default


@pytest.mark.parametrize("text", ["Necrosis", f"{_DICOM_LIST}~^^~SCT^6574001^Necrosis~^^~~^^~^^",
                                  f"{_DICOM_LIST}~SCT^49755003~SCT^6574001^Necrosis~^^~~^^~^^"])
def test_malformed_terminology_is_a_card_error_naming_the_label(text: str) -> None:
    with pytest.raises(ModelCardError, match="Label 'Odd' of the model card has a terminology"):
        label_terminology(LabelSpec(1, "Odd", (1.0, 0.0, 0.0), text))


# ---------------------------------------------------------------- the SEG, read back two ways


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_seg_reads_back_voxel_for_voxel_on_its_source_series(tmp_path: Path, geometry: str) -> None:
    folder = tmp_path / "series"
    grid, tags = _series(folder, GEOMETRIES[geometry])
    labelmap, labels = _known_labels(grid), _labels()
    source = tuple(pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.iterdir()))
    out = write_dicom_seg(labelmap, labels, source, tmp_path / "seg.dcm",
                          algorithm_name="Test model", algorithm_version="test-1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.dcm", "series"]  # no temporary file left

    expected = _expected_masks(labelmap, labels)
    rebuilt = _read_with_pydicom(out, grid, len(labels), _source_instances(folder, grid))
    np.testing.assert_array_equal(rebuilt, expected)
    numbers = (expected * np.arange(1, len(labels) + 1)[:, None, None, None]).sum(axis=0)
    np.testing.assert_array_equal(_read_with_highdicom(out, grid), numbers)

    ds = pydicom.dcmread(out)
    assert ds.SOPClassUID == SEGMENTATION_STORAGE
    assert ds.SegmentationType == "BINARY" and ds.Modality == "SEG"
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == tags["0020|000e"]
    assert (ds.StudyInstanceUID, ds.FrameOfReferenceUID, ds.PatientID) == (
        tags["0020|000d"], tags["0020|0052"], tags["0010|0020"])
    assert [int(s.SegmentNumber) for s in ds.SegmentSequence] == [1, 2, 3, 4, 5]  # the empty one included
    for item, label in zip(ds.SegmentSequence, labels, strict=True):
        terms = label_terminology(label)
        assert item.SegmentLabel == label.name
        assert _coded(item.SegmentedPropertyCategoryCodeSequence[0]) == terms.category
        assert _coded(item.SegmentedPropertyTypeCodeSequence[0]) == terms.type
        assert [_coded(c) for c in item.get("AnatomicRegionSequence", [])] == [c for c in [terms.region] if c]
        rgb = hd.color.CIELabColor.from_dicom_value(item.RecommendedDisplayCIELabValue).to_rgb()
        np.testing.assert_allclose(rgb, np.asarray(label.color) * 255, atol=1.5)
    kidney = ds.SegmentSequence[3]
    assert _coded(kidney.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0]) == \
        Coded("SCT", "7771000", "Left")
    assert _coded(kidney.AnatomicRegionSequence[0].AnatomicRegionModifierSequence[0]) == \
        Coded("SCT", "24028007", "Right")
    assert hd.seg.segread(out).get_segment_description(2).segment_label == "Peritumoral edema"


def test_an_empty_label_map_is_a_seg_with_empty_frames(tmp_path: Path) -> None:
    grid, _ = _series(tmp_path / "series", GEOMETRIES["oblique"])
    empty = sitk.Image(grid.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(grid)
    source = [pydicom.dcmread(p, stop_before_pixels=True) for p in (tmp_path / "series").iterdir()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # highdicom warns when it must keep the frames it was told to omit
        out = write_dicom_seg(empty, _labels(), source, tmp_path / "seg.dcm", algorithm_name="m",
                              algorithm_version="1")
    assert not _read_with_highdicom(out, grid).any()


# ---------------------------------------------------------------- the command line


def _predict(card: Path, inputs: list[str], output: Path, *extra: str) -> list[str]:
    return ["predict", "--model", str(card), "-i", *inputs, "-o", str(output), "--device", "cpu", "--quiet",
            *extra]


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _dicom_first(case: dict[str, Path], folder: Path) -> tuple[list[str], dict[str, str]]:
    """The case's inputs with the first channel (T2W) given as a DICOM series folder."""
    tags = write_dicom_series(sitk.Cast(sitk.ReadImage(str(case["t2w"])), sitk.sitkInt16), folder)
    return [str(folder), *case_inputs(case)[1:]], tags


def test_predict_writes_a_seg_equal_to_the_label_map_and_leaves_the_label_map_as_it_was(
    card_path, case, tmp_path, capsys
) -> None:
    inputs, tags = _dicom_first(case, tmp_path / "t2w-dicom")
    out = tmp_path / "out"
    assert main(_predict(card_path, inputs, out / "plain.nii.gz")) == 0
    plain = capsys.readouterr().out
    assert main(_predict(card_path, inputs, out / "seg.nii.gz", "--dicom-seg", str(out / "seg.dcm"))) == 0
    printed = capsys.readouterr().out
    assert f"DICOM segmentation: {out / 'seg.dcm'}" in printed and "DICOM" not in plain
    assert (out / "seg.nii.gz").read_bytes() == (out / "plain.nii.gz").read_bytes()

    labelmap = sitk.ReadImage(str(out / "seg.nii.gz"))
    grid = read_image(tmp_path / "t2w-dicom")
    assert sitk.GetArrayViewFromImage(labelmap).any()  # the tiny model labels something
    labels = _brats_labels()
    expected = _expected_masks(labelmap, labels)
    rebuilt = _read_with_pydicom(out / "seg.dcm", grid, len(labels), _source_instances(tmp_path / "t2w-dicom", grid))
    np.testing.assert_array_equal(rebuilt, expected)
    np.testing.assert_array_equal(_read_with_highdicom(out / "seg.dcm", grid), sitk.GetArrayFromImage(labelmap))
    ds = pydicom.dcmread(out / "seg.dcm")
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == tags["0020|000e"]
    assert [s.SegmentLabel for s in ds.SegmentSequence] == [label.name for label in labels]


def test_a_seg_of_inputs_that_are_no_dicom_series_is_refused_before_any_work(card_path, case, tmp_path,
                                                                            capsys) -> None:
    for inputs in (case_inputs(case), [str(case["t2w"].parent)]):  # image files; a case folder of them
        code = main(_predict(card_path, inputs, tmp_path / "out" / "seg.nii.gz",
                             "--dicom-seg", str(tmp_path / "out" / "seg.dcm")))
        err = capsys.readouterr().err
        assert code == EXIT_USER_ERROR
        assert f"{inputs[0]} is not a DICOM series folder" in _one_line_error(err)
        assert not (tmp_path / "out").exists()  # refused before the outputs' folder was even made


def test_seg_output_paths_are_checked_like_the_others(card_path, case, tmp_path, capsys) -> None:
    inputs, _ = _dicom_first(case, tmp_path / "t2w-dicom")
    before = sorted(p.name for p in (tmp_path / "t2w-dicom").iterdir())
    for seg, message in ((tmp_path / "t2w-dicom" / "seg.dcm", "inside the input folder"),
                         (tmp_path / "seg.nii.gz", "Unsupported format for the DICOM segmentation")):
        assert main(_predict(card_path, inputs, tmp_path / "out.nii.gz", "--dicom-seg", str(seg))) == EXIT_USER_ERROR
        assert message in _one_line_error(capsys.readouterr().err)
    assert sorted(p.name for p in (tmp_path / "t2w-dicom").iterdir()) == before


def test_seg_without_highdicom_is_refused_with_the_install_line(card_path, case, tmp_path, capsys,
                                                                monkeypatch) -> None:
    inputs, _ = _dicom_first(case, tmp_path / "t2w-dicom")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "highdicom" else find_spec(name, *a))
    assert main(_predict(card_path, inputs, tmp_path / "o.nii.gz", "--dicom-seg", str(tmp_path / "o.dcm"))) == 1
    assert "pip install 'segmamba-slicer[dicom]'" in _one_line_error(capsys.readouterr().err)


def test_a_full_disk_leaves_no_seg_and_no_temporary_file(tmp_path: Path) -> None:
    grid, _ = _series(tmp_path / "series", GEOMETRIES["axial"])
    source = [pydicom.dcmread(p, stop_before_pixels=True) for p in (tmp_path / "series").iterdir()]
    with mounted_tmpfs(tmp_path / "disk", 256) as disk:
        fill_up(disk, 2048)
        with pytest.raises(OutputError, match="Could not write the DICOM segmentation"):
            write_dicom_seg(_known_labels(grid), _labels(), source, disk / "seg.dcm", algorithm_name="m",
                            algorithm_version="1")
        assert sorted(p.name for p in disk.iterdir()) == ["filler"]

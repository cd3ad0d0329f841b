""".seg.nrrd writer checked with Slicer's own storage node (slicer-core), slicerio and our reader."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import SimpleITK as sitk
from SegMambaSlicerLib.io.atomic import OutputError
from SegMambaSlicerLib.io.seg_nrrd import SegmentationFileError, read_seg_nrrd, write_seg_nrrd
from SegMambaSlicerLib.models.cards import builtin_cards

CARD = builtin_cards()["segmamba-brats2023"]
LABELS = CARD.labels
RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _index_to_lps(image: sitk.Image) -> np.ndarray:
    """4x4 matrix index -> LPS point, written out from SimpleITK's documented convention."""
    matrix = np.eye(4)
    matrix[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    matrix[:3, 3] = image.GetOrigin()
    return matrix


def _expected_layer(labelmap: sitk.Image) -> np.ndarray:
    """Input labels with values that no LabelSpec names (the stray 7) cleared."""
    array = sitk.GetArrayFromImage(labelmap)
    return np.where(np.isin(array, [label.value for label in LABELS]), array, 0)


def _header(path) -> str:
    raw = path.read_bytes()
    return raw[: raw.index(b"\n\n")].decode()


def test_header_has_slicer_fields_and_geometry(tmp_path, oblique_labelmap):
    path = write_seg_nrrd(oblique_labelmap, LABELS, tmp_path / "out.seg.nrrd")
    header = _header(path)
    lines = dict(line.split(":=", 1) for line in header.splitlines() if ":=" in line)
    assert "space: left-posterior-superior" in header
    assert "encoding: gzip" in header
    assert "sizes: 11 9 7" in header
    assert lines["Segmentation_MasterRepresentation"] == "Binary labelmap"
    assert lines["Segmentation_ContainedRepresentationNames"] == "Binary labelmap|"
    assert lines["Segmentation_ReferenceImageExtentOffset"] == "0 0 0"
    assert lines["Segment1_Name"] == "Peritumoral edema"
    assert lines["Segment1_LabelValue"] == "2"
    assert lines["Segment1_Layer"] == "0"
    assert lines["Segment1_Extent"] == "0 10 0 8 0 6"
    assert lines["Segment2_Color"] == "1 0.85 0"
    assert lines["Segment0_Tags"] == f"TerminologyEntry:{LABELS[0].terminology.rstrip('|')}|"
    # space directions: column c = LPS step along index c (spacing x direction column)
    directions = header.split("space directions: ")[1].splitlines()[0]
    vectors = [[float(v) for v in t.strip("()").split(",")] for t in directions.split()]
    np.testing.assert_allclose(np.array(vectors).T, _index_to_lps(oblique_labelmap)[:3, :3], atol=1e-12)
    assert not list(tmp_path.glob(".*part")), "temporary file left behind"


def test_slicer_storage_node_reads_segments_at_the_right_places(mrml_scene, tmp_path, oblique_labelmap):
    import slicer
    import vtk
    from SegMambaSlicerLib.slicer.mrml import volume_node_from_image

    path = write_seg_nrrd(oblique_labelmap, LABELS, tmp_path / "out.seg.nrrd", CARD.regions)
    scene = mrml_scene.scene
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    segmentation = node.GetSegmentation()
    ids = [label.name for label in LABELS] + [region.name for region in CARD.regions]
    assert list(segmentation.GetSegmentIDs()) == ids
    assert segmentation.GetNumberOfLayers() == 1 + len(CARD.regions)

    reference = volume_node_from_image(oblique_labelmap, scene, "reference")
    expected_ras = RAS_FROM_LPS @ _index_to_lps(oblique_labelmap)
    layer = _expected_layer(oblique_labelmap)
    expected = {label.name: (label.name, label.color, label.value, layer == label.value) for label in LABELS}
    for region in CARD.regions:
        expected[region.name] = (region.display_name, region.color, 1, np.isin(layer, region.labels))
    for segment_id, (name, color, value, mask) in expected.items():
        segment = segmentation.GetSegment(segment_id)
        assert (segment.GetName(), segment.GetLabelValue()) == (name, value)
        np.testing.assert_allclose(segment.GetColor(), color)
        labelmap_node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            node, [segment_id], labelmap_node, reference
        )
        matrix = vtk.vtkMatrix4x4()
        labelmap_node.GetIJKToRASMatrix(matrix)
        got_ras = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
        np.testing.assert_allclose(got_ras, expected_ras, atol=1e-9)
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(labelmap_node), mask)
    for label in LABELS:
        assert segmentation.GetSegment(label.name).GetTerminology() == label.terminology.rstrip("|")


def test_slicerio_reads_the_same(tmp_path, oblique_labelmap):
    slicerio = pytest.importorskip("slicerio")
    path = write_seg_nrrd(oblique_labelmap, LABELS, tmp_path / "out.seg.nrrd")
    segmentation = slicerio.read_segmentation(str(path))
    np.testing.assert_allclose(segmentation["ijkToLPS"], _index_to_lps(oblique_labelmap), atol=1e-12)
    layer = _expected_layer(oblique_labelmap)
    assert slicerio.segment_names(segmentation) == [label.name for label in LABELS]
    for label in LABELS:
        segment = slicerio.segment_from_name(segmentation, label.name)
        assert segment["labelValue"] == label.value
        np.testing.assert_allclose(segment["color"], label.color)
        context, category, type_ = label.terminology.split("~")[:3]
        assert segment["terminology"]["contextName"] == context
        assert segment["terminology"]["category"] == category.split("^")
        assert segment["terminology"]["type"] == type_.split("^")
        # slicerio gives voxels in (i, j, k) order; SimpleITK arrays are (k, j, i)
        np.testing.assert_array_equal(
            slicerio.segment_mask(segmentation, label.name), (layer == label.value).T
        )


def test_our_reader_round_trips_labels_and_regions(tmp_path, oblique_labelmap):
    path = write_seg_nrrd(oblique_labelmap, LABELS, tmp_path / "out.seg.nrrd", CARD.regions)
    image, segments = read_seg_nrrd(path)
    layer = _expected_layer(oblique_labelmap)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(image), layer)
    np.testing.assert_allclose(_index_to_lps(image), _index_to_lps(oblique_labelmap), atol=1e-12)
    assert [(s["name"], s["value"], s["color"]) for s in segments] == [
        (x.name, x.value, x.color) for x in LABELS
    ]
    assert segments[0]["terminology"] == LABELS[0].terminology.rstrip("|")
    whole_tumour = [r.name for r in CARD.regions].index("WT")
    region_image, region_segments = read_seg_nrrd(path, layer=1 + whole_tumour)
    assert [s["id"] for s in region_segments] == ["WT"]
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(region_image), np.isin(layer, [1, 2, 3]))


def test_reader_handles_a_file_cropped_by_slicer(mrml_scene, tmp_path, oblique_labelmap):
    """Slicer saves only the occupied box, shifting the origin; our reader must place it correctly."""
    import slicer

    scene = mrml_scene.scene
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(write_seg_nrrd(oblique_labelmap, LABELS, tmp_path / "ours.seg.nrrd")))
    assert storage.ReadData(node)
    # without a reference geometry Slicer writes only the occupied box (as for a segmentation drawn by hand)
    node.GetSegmentation().SetConversionParameter("Reference image geometry", "")
    storage.SetFileName(str(tmp_path / "slicer.seg.nrrd"))
    assert storage.WriteData(node)
    cropped, segments = read_seg_nrrd(tmp_path / "slicer.seg.nrrd")
    assert cropped.GetSize() != oblique_labelmap.GetSize()
    start = oblique_labelmap.TransformPhysicalPointToIndex(cropped.GetOrigin())
    np.testing.assert_allclose(
        oblique_labelmap.TransformIndexToPhysicalPoint(start), cropped.GetOrigin(), atol=1e-3
    )
    box = tuple(slice(start[a], start[a] + cropped.GetSize()[a]) for a in (2, 1, 0))
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(cropped), _expected_layer(oblique_labelmap)[box])
    assert [s["name"] for s in segments] == [label.name for label in LABELS]


def test_write_failure_is_reported_and_leaves_no_partial_file(tmp_path, oblique_labelmap):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="Could not write"):
        write_seg_nrrd(oblique_labelmap, LABELS, blocker / "out.seg.nrrd")
    target = tmp_path / "kept.seg.nrrd"
    target.write_bytes(b"previous result")
    with pytest.raises(ValueError, match="integer"):
        write_seg_nrrd(sitk.Cast(oblique_labelmap, sitk.sitkFloat32), LABELS, target)
    assert target.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "kept.seg.nrrd"]


def test_reader_rejects_non_segmentation_files(tmp_path):
    text = tmp_path / "notes.seg.nrrd"
    text.write_text("hello")
    with pytest.raises(SegmentationFileError, match="not a NRRD"):
        read_seg_nrrd(text)
    truncated = tmp_path / "cut.seg.nrrd"
    header = "NRRD0004\ntype: unsigned char\ndimension: 3\nsizes: 4 4 4\nencoding: gzip\n"
    truncated.write_bytes(
        (header + "space directions: (1,0,0) (0,1,0) (0,0,1)\nspace origin: (0,0,0)\n\n").encode()
        + gzip.compress(bytes(10))
    )
    with pytest.raises(SegmentationFileError, match="truncated"):
        read_seg_nrrd(truncated)


def test_the_same_segmentation_always_gives_the_same_bytes(tmp_path, oblique_labelmap):
    """Reproducible outputs: the random temporary name of the atomic write must not leak into the file."""
    first = write_seg_nrrd(oblique_labelmap, LABELS, tmp_path / "a" / "out.seg.nrrd", CARD.regions)
    second = write_seg_nrrd(oblique_labelmap, LABELS, tmp_path / "b" / "out.seg.nrrd", CARD.regions)
    assert first.read_bytes() == second.read_bytes()

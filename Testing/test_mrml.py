"""MRML adapter on real slicer-core MRML: geometry round trips with Slicer's own reader, segment import."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from SegMambaSlicerLib.errors import InputImageError
from SegMambaSlicerLib.models.cards import LabelSpec, builtin_cards

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
nib = pytest.importorskip("nibabel", reason="nibabel (test data) is not installed")
mrml = pytest.importorskip("SegMambaSlicerLib.slicer.mrml")
vtk = pytest.importorskip("vtk")

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
LABELS = builtin_cards()["segmamba-brats2023"].labels


def _index_to_lps(image: sitk.Image) -> np.ndarray:
    """4x4 matrix index -> LPS point, written out from SimpleITK's documented convention."""
    matrix = np.eye(4)
    matrix[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    matrix[:3, 3] = image.GetOrigin()
    return matrix


def _corners(image: sitk.Image) -> np.ndarray:
    ranges = [(0, s - 1) for s in image.GetSize()]
    return np.array([image.TransformIndexToPhysicalPoint(c) for c in itertools.product(*ranges)])


def assert_same_voxels_in_space(image: sitk.Image, reference: sitk.Image) -> None:
    """Every voxel of ``image`` holds the reference's value at the same physical point (no resampling)."""
    assert image.GetSize() == reference.GetSize()
    corners, ref_corners = _corners(image), _corners(reference)
    distances = np.linalg.norm(corners[:, None, :] - ref_corners[None, :, :], axis=-1)
    assert distances.min(axis=1).max() < 1e-4, "the volume's corners are not where the reference has them"
    # index in image -> index in reference must be an exact signed permutation plus integer shift
    mapping = np.linalg.inv(_index_to_lps(reference)) @ _index_to_lps(image)
    assert np.allclose(mapping, np.round(mapping), atol=1e-5)
    size = image.GetSize()
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in size], indexing="ij"), -1).reshape(-1, 3)
    ref_ijk = np.round(ijk @ mapping[:3, :3].T + mapping[:3, 3]).astype(int)
    values = sitk.GetArrayViewFromImage(image)[ijk[:, 2], ijk[:, 1], ijk[:, 0]]
    ref_values = sitk.GetArrayViewFromImage(reference)[ref_ijk[:, 2], ref_ijk[:, 1], ref_ijk[:, 0]]
    np.testing.assert_array_equal(values, ref_values)


@pytest.fixture(scope="module")
def oblique_nifti(tmp_path_factory) -> Path:
    """Volume 0 of nibabel's oblique 4-D example, saved with its original affine by nibabel."""
    source = nib.load(NIBABEL_DATA / "example4d.nii.gz")
    path = tmp_path_factory.mktemp("nifti") / "example4d_vol0.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(source.dataobj)[..., 0], source.affine, source.header), path)
    return path


@pytest.mark.parametrize(
    "name", ["anatomical.nii", "resampled_anat_moved.nii", "reoriented_anat_moved.nii", "oblique"]
)
def test_volume_loaded_by_slicer_matches_simpleitk(mrml_scene, oblique_nifti, name):
    path = oblique_nifti if name == "oblique" else NIBABEL_DATA / name
    node = mrml.load_volume_file(path, mrml_scene.scene, "input")
    image = mrml.image_from_volume_node(node)
    reference = sitk.ReadImage(str(path))
    assert_same_voxels_in_space(image, reference)
    # Slicer's own numpy view of the node is the array we hand to the network
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(image), slicer.util.arrayFromVolume(node))


def test_oblique_example_is_really_oblique_and_flipped_by_slicer(mrml_scene, oblique_nifti):
    """Guards the test above: this file exercises oblique axes and Slicer's k-axis flip."""
    image = mrml.image_from_volume_node(mrml.load_volume_file(oblique_nifti, mrml_scene.scene, "input"))
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    assert 0.1 < abs(direction[1, 2]) < 0.9
    reference = sitk.ReadImage(str(oblique_nifti))
    assert not np.array_equal(sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(reference))


def test_volume_node_round_trip_keeps_geometry(mrml_scene, oblique_labelmap):
    image = sitk.Cast(oblique_labelmap, sitk.sitkFloat32) * 2.5
    node = mrml.volume_node_from_image(image, mrml_scene.scene, "vol")
    ijk_to_ras = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(ijk_to_ras)
    got = np.array([[ijk_to_ras.GetElement(r, c) for c in range(4)] for r in range(4)])
    expected = np.diag([-1.0, -1.0, 1.0, 1.0]) @ _index_to_lps(image)
    np.testing.assert_allclose(got, expected, atol=1e-12)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), sitk.GetArrayViewFromImage(image))
    back = mrml.image_from_volume_node(node)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image))
    np.testing.assert_allclose(_index_to_lps(back), _index_to_lps(image), atol=1e-9)


def test_linear_parent_transform_moves_the_geometry(mrml_scene, oblique_labelmap):
    node = mrml.volume_node_from_image(oblique_labelmap, mrml_scene.scene, "vol")
    transform = mrml_scene.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    to_parent = vtk.vtkMatrix4x4()
    to_parent.SetElement(0, 3, 10.0)  # 10 mm toward Right = -10 in LPS x
    transform.SetMatrixTransformToParent(to_parent)
    node.SetAndObserveTransformNodeID(transform.GetID())
    moved = mrml.image_from_volume_node(node)
    np.testing.assert_allclose(
        np.asarray(moved.GetOrigin()) - oblique_labelmap.GetOrigin(), [-10.0, 0.0, 0.0], atol=1e-9
    )
    np.testing.assert_allclose(moved.GetDirection(), oblique_labelmap.GetDirection(), atol=1e-12)


def test_load_volume_file_errors(mrml_scene, tmp_path):
    with pytest.raises(InputImageError, match="does not exist"):
        mrml.load_volume_file(tmp_path / "missing.nii.gz", mrml_scene.scene, "x")
    junk = tmp_path / "junk.nii"
    junk.write_bytes(b"not an image at all" * 30)
    with pytest.raises(InputImageError, match="could not read"):
        mrml.load_volume_file(junk, mrml_scene.scene, "x")


def test_headless_scene_installs_and_restores_slicer_globals(mrml_scene):
    node = mrml.volume_node_from_image(sitk.Image(3, 3, 3, sitk.sitkUInt8), mrml_scene.scene, "findme")
    assert slicer.util.getNode("findme") is node
    assert slicer.modules.volumes.logic() is mrml_scene.volumes_logic
    with mrml.headless_scene() as inner:
        assert slicer.mrmlScene is inner.scene
    assert slicer.mrmlScene is mrml_scene.scene


def _export_segment(scene, segmentation_node, segment_id, reference_node) -> sitk.Image:
    labelmap_node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
        segmentation_node, [segment_id], labelmap_node, reference_node
    )
    return mrml.image_from_volume_node(labelmap_node)


def test_import_labelmap_exports_back_identically(mrml_scene, oblique_labelmap):
    scene = mrml_scene.scene
    reference = mrml.volume_node_from_image(sitk.Cast(oblique_labelmap, sitk.sitkInt16), scene, "t1c")
    node = mrml.import_labelmap_to_segmentation(
        oblique_labelmap, LABELS, scene, reference_volume_node=reference
    )
    segmentation = node.GetSegmentation()
    assert list(segmentation.GetSegmentIDs()) == [label.name for label in LABELS]
    assert segmentation.GetNumberOfLayers() == 1  # one shared labelmap, not one image per label
    assert node.GetDisplayNode() is not None
    labels = sitk.GetArrayViewFromImage(oblique_labelmap)
    for label in LABELS:
        segment = segmentation.GetSegment(label.name)
        assert segment.GetName() == label.name
        assert segment.GetLabelValue() == label.value
        np.testing.assert_allclose(segment.GetColor(), label.color)
        assert segment.GetTerminology() == label.terminology.rstrip("|")
        exported = _export_segment(scene, node, label.name, reference)
        assert exported.GetSize() == oblique_labelmap.GetSize()
        np.testing.assert_allclose(_index_to_lps(exported), _index_to_lps(oblique_labelmap), atol=1e-9)
        # the empty label 2 exports as all zeros; the stray value 7 belongs to no segment
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(exported), labels == label.value)


def test_import_without_reference_uses_labelmap_grid(mrml_scene, oblique_labelmap):
    node = mrml.import_labelmap_to_segmentation(oblique_labelmap, LABELS, mrml_scene.scene)
    converter = slicer.vtkSegmentationConverter
    geometry = node.GetSegmentation().GetConversionParameter(
        converter.GetReferenceImageGeometryParameterName()
    )
    numbers = [float(v) for v in geometry.strip(";").split(";")]
    expected = np.diag([-1.0, -1.0, 1.0, 1.0]) @ _index_to_lps(oblique_labelmap)
    np.testing.assert_allclose(np.reshape(numbers[:16], (4, 4)), expected, atol=1e-5)
    assert numbers[16:] == [0, 10, 0, 8, 0, 6]
    assert node.GetName() == "SegMamba segmentation"


def test_reusing_a_segmentation_node_replaces_its_segments(mrml_scene, oblique_labelmap):
    scene = mrml_scene.scene
    reference = mrml.volume_node_from_image(oblique_labelmap, scene, "ref")
    node = mrml.import_labelmap_to_segmentation(
        oblique_labelmap, LABELS, scene, reference_volume_node=reference
    )
    relabelled = sitk.BinaryThreshold(oblique_labelmap, 3, 3, 5, 0)  # enhancing voxels -> 5, rest 0
    relabelled.CopyInformation(oblique_labelmap)
    tumour = LabelSpec(value=5, name="Tumour", color=(0.2, 0.4, 0.6))
    again = mrml.import_labelmap_to_segmentation(
        relabelled, [tumour], scene, segmentation_node=node, reference_volume_node=reference
    )
    assert again is node
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1
    assert list(node.GetSegmentation().GetSegmentIDs()) == ["Tumour"]
    exported = _export_segment(scene, node, "Tumour", reference)
    np.testing.assert_array_equal(
        sitk.GetArrayViewFromImage(exported), sitk.GetArrayViewFromImage(oblique_labelmap) == 3
    )


# ---------------------------------------------------------------- a prior segmentation back as a label map


def _without_stray(labelmap: sitk.Image) -> sitk.Image:
    """The fixture's label map without its stray value 7, which no segment can hold."""
    clean = sitk.GetImageFromArray(np.where(sitk.GetArrayViewFromImage(labelmap) == 7, 0,
                                            sitk.GetArrayViewFromImage(labelmap)).astype(np.uint8))
    clean.CopyInformation(labelmap)
    return clean


def test_prior_segmentation_comes_back_as_its_label_map_on_its_own_oblique_grid(mrml_scene, oblique_labelmap):
    scene = mrml_scene.scene
    reference = mrml.volume_node_from_image(sitk.Cast(oblique_labelmap, sitk.sitkInt16), scene, "t1c")
    node = mrml.import_labelmap_to_segmentation(oblique_labelmap, LABELS, scene, reference_volume_node=reference)
    nodes_before = scene.GetNumberOfNodes()
    prior = mrml.prior_labelmap(node, LABELS)
    assert scene.GetNumberOfNodes() == nodes_before  # nothing left behind in the scene
    np.testing.assert_allclose(_index_to_lps(prior), _index_to_lps(oblique_labelmap), atol=1e-9)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(prior),
                                  sitk.GetArrayFromImage(_without_stray(oblique_labelmap)))


def test_prior_segments_are_found_by_name_or_abbreviation_and_get_the_models_values(mrml_scene,
                                                                                   oblique_labelmap):
    stored = sitk.GetArrayFromImage(_without_stray(oblique_labelmap))  # values 1 and 3
    other_tool = sitk.GetImageFromArray(np.select([stored == 1, stored == 3], [7, 8], 0).astype(np.uint8))
    other_tool.CopyInformation(oblique_labelmap)
    named = [LabelSpec(7, "ncr", (1, 0, 0)), LabelSpec(8, "PERITUMORAL EDEMA", (0, 1, 0))]  # no enhancing segment
    node = mrml.import_labelmap_to_segmentation(other_tool, named, mrml_scene.scene)
    prior = mrml.prior_labelmap(node, LABELS)
    expected = np.select([stored == 1, stored == 3], [1, 2], 0)  # NCR by abbreviation, edema by name
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(prior), expected)

    unrelated = mrml.import_labelmap_to_segmentation(other_tool, [LabelSpec(7, "Liver", (1, 0, 0))],
                                                     mrml_scene.scene)
    with pytest.raises(InputImageError, match="has no segment named after the model's labels"):
        mrml.prior_labelmap(unrelated, LABELS)


def test_prior_segmentation_under_a_transform_and_label_map_volumes_are_where_the_user_sees_them(
        mrml_scene, oblique_labelmap):
    scene = mrml_scene.scene
    node = mrml.import_labelmap_to_segmentation(oblique_labelmap, LABELS, scene)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    to_parent = vtk.vtkMatrix4x4()
    to_parent.SetElement(1, 3, 7.5)  # 7.5 mm toward Anterior = -7.5 in LPS y
    transform.SetMatrixTransformToParent(to_parent)
    node.SetAndObserveTransformNodeID(transform.GetID())
    moved = mrml.prior_labelmap(node, LABELS)
    np.testing.assert_allclose(np.asarray(moved.GetOrigin()) - oblique_labelmap.GetOrigin(), [0.0, -7.5, 0.0],
                               atol=1e-9)

    volume = mrml.volume_node_from_image(oblique_labelmap, scene, "prior labels", labelmap=True)
    as_volume = mrml.prior_labelmap(volume, LABELS)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(as_volume), sitk.GetArrayViewFromImage(oblique_labelmap))


def test_prior_segmentation_on_another_grid_compares_like_its_label_map(mrml_scene):
    """The MRML conversion loses nothing: the change equals that of the label map file it was made from."""
    from SegMambaSlicerLib.engine.pipeline import SegmentationResult
    from SegMambaSlicerLib.engine.volumes import volumes_ml
    from SegMambaSlicerLib.slicer.review import compare_with_prior

    card = builtin_cards()["segmamba-brats2023"]
    current = np.zeros((14, 40, 44), np.uint8)
    current[3:11, 8:30, 10:34] = 2
    current[5:9, 12:26, 14:30] = 3
    now = sitk.GetImageFromArray(current)
    now.SetSpacing((0.9, 0.9, 2.5))
    now.SetOrigin((-20.0, -18.0, 4.0))
    before_array = np.zeros((20, 26, 30), np.uint8)  # another grid of the same space: 1.3 mm, shifted, turned
    before_array[4:16, 5:21, 6:24] = 2
    before_array[6:14, 8:18, 9:21] = 3
    before_array[9, 12, 14] = 1
    before = sitk.GetImageFromArray(before_array)
    before.SetSpacing((1.3, 1.3, 1.3))
    before.SetOrigin((-21.0, -19.5, 2.0))
    before.SetDirection(sitk.Euler3DTransform((0, 0, 0), 0.0, 0.0, 0.05).GetMatrix())
    node = mrml.import_labelmap_to_segmentation(before, card.labels, mrml_scene.scene)
    result = SegmentationResult(now, card, "cpu", 1.0, 1, volumes_ml(now, card))
    through_mrml = compare_with_prior(result, mrml.prior_labelmap(node, card.labels), "The prior")
    from_file = compare_with_prior(result, before, "The prior")
    assert through_mrml == from_file
    assert through_mrml.enhancing.prior_sum_of_products_mm2 > 0 and through_mrml.prior_volumes_ml["WT"] > 0

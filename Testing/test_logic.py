"""The Qt-free Slicer logic on a real headless MRML scene: same result as the file pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from toy_models import PointwiseNet, toy_card

from SegMambaSlicerLib.errors import InputImageError
from SegMambaSlicerLib.pipeline import SegmentOptions, segment

CPU = SegmentOptions(device="cpu")


def _real_file(tmp_path: Path) -> Path:
    nib = pytest.importorskip("nibabel")
    src = Path(nib.__file__).parent / "tests" / "data" / "example4d.nii.gz"  # oblique, flipped x
    if not src.exists():
        pytest.skip("nibabel test data not shipped")
    img = sitk.ReadImage(str(src))[:, :, :, 0]
    path = tmp_path / "oblique.nii.gz"
    sitk.WriteImage(img, str(path))
    return path


def test_logic_on_slicer_loaded_volume_matches_file_pipeline(mrml_scene, tmp_path: Path) -> None:
    slicer = pytest.importorskip("slicer")
    from SegMambaSlicerLib.logic import SegmentationLogic
    from SegMambaSlicerLib.mrml import load_volume_file

    path = _real_file(tmp_path)
    card = toy_card(channels=1, labels=2, roi=16)
    net = PointwiseNet(np.array([[0.0], [1.0], [2.0]]), np.array([0.0, -0.5, -2.5]))
    node = load_volume_file(path, mrml_scene.scene, "oblique")  # Slicer's own reader
    seg_node, result = SegmentationLogic(mrml_scene.scene).segment_nodes([node], card, CPU, network=net)

    # Slicer's reader flips k for this left-handed file (SLICER.md §4), so compare in world space:
    # voxel centres coincide, so nearest-neighbour resampling onto the file grid is exact.
    from_file = segment([path], card, CPU, network=net).labelmap
    on_file_grid = sitk.Resample(result.labelmap, from_file, sitk.Transform(), sitk.sitkNearestNeighbor, 255)
    assert set(np.unique(sitk.GetArrayFromImage(from_file))) == {0, 1, 2}
    np.testing.assert_array_equal(sitk.GetArrayFromImage(on_file_grid), sitk.GetArrayFromImage(from_file))
    expected = sitk.GetArrayFromImage(result.labelmap)
    segmentation = seg_node.GetSegmentation()
    assert [segmentation.GetNthSegment(i).GetName() for i in range(2)] == ["Label 1", "Label 2"]
    for index, value in enumerate((1, 2)):
        segment_id = segmentation.GetNthSegmentID(index)
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(seg_node, segment_id, node)
        np.testing.assert_array_equal(mask.astype(bool), expected == value)


def test_logic_reuses_output_node_and_refuses_missing_inputs(mrml_scene) -> None:
    from SegMambaSlicerLib.logic import SegmentationLogic
    from SegMambaSlicerLib.mrml import volume_node_from_image

    arr = np.zeros((12, 12, 12), np.float32)
    arr[3:9, 3:9, 3:9] = 5.0
    arr[5:7, 5:7, 5:7] = 40.0
    node = volume_node_from_image(sitk.GetImageFromArray(arr), mrml_scene.scene, "t1")
    card = toy_card(channels=1, labels=1, roi=8)
    net = PointwiseNet(np.array([[0.0], [1.0]]), np.array([0.0, -1.0]))
    logic = SegmentationLogic(mrml_scene.scene)
    first, _ = logic.segment_nodes([node], card, CPU, network=net)
    second, _ = logic.segment_nodes([node], card, CPU, segmentation_node=first, network=net)
    assert second is first and first.GetSegmentation().GetNumberOfSegments() == 1
    with pytest.raises(InputImageError, match="Select one volume for each input"):
        logic.segment_nodes([None], card, CPU, network=net)

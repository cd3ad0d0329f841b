"""The Qt-free Slicer logic on a real headless MRML scene: same result as the file pipeline."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from SegMambaSlicerLib.engine.pipeline import SegmentationResult, SegmentOptions, segment
from SegMambaSlicerLib.errors import InputImageError
from toy_models import PointwiseNet, toy_card

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
    from SegMambaSlicerLib.slicer.logic import SegmentationLogic
    from SegMambaSlicerLib.slicer.mrml import load_volume_file

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
    from SegMambaSlicerLib.slicer.logic import SegmentationLogic
    from SegMambaSlicerLib.slicer.mrml import volume_node_from_image

    arr = np.zeros((12, 12, 12), np.float32)
    arr[3:9, 3:9, 3:9] = 5.0
    arr[5:7, 5:7, 5:7] = 40.0
    node = volume_node_from_image(sitk.GetImageFromArray(arr), mrml_scene.scene, "t1")
    card = toy_card(channels=1, labels=1, roi=8)
    net = PointwiseNet(np.array([[0.0], [1.0]]), np.array([0.0, -1.0]))
    logic = SegmentationLogic(mrml_scene.scene)
    first, _ = logic.segment_nodes([node], card, CPU, network=net)
    second, _ = logic.segment_nodes([node], card, CPU, segmentation_node=first, network=net)
    segmentation = first.GetSegmentation()
    names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
    assert second is first and names == ["Label 1", "ALL"]  # replaced, not appended
    assert mrml_scene.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1  # no scratch node left
    with pytest.raises(InputImageError, match="Select one volume for each input"):
        logic.segment_nodes([None], card, CPU, network=net)


# ---------------------------------------------------------------- review: volumes, regions, surfaces

BRATS_LIKE = {"labels": [(1, "Necrosis"), (2, "Edema"), (3, "Enhancing")],
              "regions": [("TC", "Tumor core", (1, 3)), ("WT", "Whole tumor", (1, 2, 3)), ("ET", "Enhancing", (3,))]}


def _brats_like_card():
    from SegMambaSlicerLib.models.cards import card_from_dict

    return card_from_dict({
        "id": "brats-like", "architecture": {"name": "toy"}, "channels": [{"key": "t1"}],
        "labels": [{"value": v, "name": n, "color": [0.2 * v, 0.5, 0.5]} for v, n in BRATS_LIKE["labels"]],
        "regions": [{"name": n, "display_name": d, "labels": list(ls), "color": [1, 1, 0]}
                    for n, d, ls in BRATS_LIKE["regions"]],
    })


def _imported_result(mrml_scene, labelmap: sitk.Image):
    from SegMambaSlicerLib.engine.pipeline import SegmentationResult
    from SegMambaSlicerLib.engine.volumes import volumes_ml
    from SegMambaSlicerLib.slicer.logic import SegmentationLogic
    from SegMambaSlicerLib.slicer.mrml import volume_node_from_image

    card = _brats_like_card()
    reference = volume_node_from_image(sitk.Cast(labelmap, sitk.sitkFloat32), mrml_scene.scene, "t1")
    result = SegmentationResult(labelmap, card, "cpu", 1.0, 1, volumes_ml(labelmap, card))
    node = SegmentationLogic(mrml_scene.scene).import_result(result, reference)
    return node, result, reference


def test_volumes_table_equals_voxel_counting_on_an_anisotropic_oblique_grid(mrml_scene, oblique_labelmap) -> None:
    slicer = pytest.importorskip("slicer")
    from SegMambaSlicerLib.slicer.logic import volume_rows

    node, result, reference = _imported_result(mrml_scene, oblique_labelmap)
    voxel_ml = 0.7 * 1.3 * 2.9 / 1000.0
    # hand counts of the fixture: label 1 is a 3x5x4 block, label 3 a 2x2x4 block plus one voxel, 7 is unknown
    expected = {"Necrosis": 60, "Edema": 0, "Enhancing": 17, "Tumor core": 77, "Whole tumor": 77}
    rows = volume_rows(result)
    assert [(r.name, r.kind) for r in rows] == [
        ("Necrosis", "label"), ("Edema", "label"), ("Enhancing", "label"),
        ("Tumor core", "region"), ("Whole tumor", "region"), ("Enhancing", "region")]
    for row in rows:
        assert row.volume_ml == pytest.approx(expected[row.name] * voxel_ml, rel=1e-12)
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(node, row.segment_id, reference)
        assert int(np.count_nonzero(mask)) * voxel_ml == pytest.approx(row.volume_ml, rel=1e-12)
    assert [r.segment_id for r in rows][3:] == ["TC", "WT", "ET"]  # the CLI's .seg.nrrd segment IDs


def test_display_switches_between_labels_and_regions_and_shows_surfaces(mrml_scene, oblique_labelmap) -> None:
    from SegMambaSlicerLib.slicer.logic import show_regions, show_surfaces

    node, result, _ = _imported_result(mrml_scene, oblique_labelmap)
    display = node.GetDisplayNode()
    labels, regions = ["Necrosis", "Edema", "Enhancing"], ["TC", "WT", "ET"]

    def visible(ids):
        return [bool(display.GetSegmentVisibility(i)) for i in ids]

    assert visible(labels) == [True] * 3 and visible(regions) == [False] * 3  # labels first
    show_regions(node, result.card, True)
    assert visible(labels) == [False] * 3 and visible(regions) == [True] * 3
    show_regions(node, result.card, False)
    assert visible(labels) == [True] * 3 and visible(regions) == [False] * 3
    show_surfaces(node, True)
    assert node.GetSegmentation().ContainsRepresentation("Closed surface") and display.GetVisibility3D()
    show_surfaces(node, False)
    assert not display.GetVisibility3D()


# ---------------------------------------------------------------- review: confidence overlay, prior


def _oblique_case(mrml_scene):
    """(input node, its image): one channel on an oblique, anisotropic grid, bright block inside a body."""
    from SegMambaSlicerLib.slicer.mrml import volume_node_from_image

    array = np.zeros((9, 14, 12), np.float32)
    array[1:8, 2:12, 2:10] = 5.0
    array[3:6, 5:9, 4:8] = 40.0
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.8, 1.1, 2.5))
    image.SetOrigin((3.0, -7.0, 11.0))
    image.SetDirection(sitk.Euler3DTransform((0, 0, 0), 0.2, -0.1, 0.3).GetMatrix())
    return volume_node_from_image(image, mrml_scene.scene, "t1"), image


def test_a_result_with_confidence_adds_one_overlay_volume_on_the_input_grid(mrml_scene) -> None:
    from SegMambaSlicerLib.slicer.logic import CONFIDENCE_COLOR_NODE_ID, CONFIDENCE_ROLE, SegmentationLogic
    from SegMambaSlicerLib.slicer.mrml import image_from_volume_node

    node, image = _oblique_case(mrml_scene)
    card = toy_card(channels=1, labels=1, roi=8)
    net = PointwiseNet(np.array([[0.0], [0.2]]), np.array([0.0, -3.0]))  # unsure where 0.2 x ≈ 3
    options = SegmentOptions(device="cpu", confidence=True)
    logic = SegmentationLogic(mrml_scene.scene)
    segmentation, result = logic.segment_nodes([node], card, options, network=net)
    confidence = segmentation.GetNodeReference(CONFIDENCE_ROLE)
    assert confidence.GetName() == f"{segmentation.GetName()} confidence"
    assert confidence.IsA("vtkMRMLScalarVolumeNode") and not confidence.IsA("vtkMRMLLabelMapVolumeNode")
    shown = image_from_volume_node(confidence)
    for get in (sitk.Image.GetSize, sitk.Image.GetSpacing, sitk.Image.GetOrigin, sitk.Image.GetDirection):
        np.testing.assert_allclose(get(shown), get(image), atol=1e-9)  # the input's grid
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(shown), sitk.GetArrayViewFromImage(result.confidence))
    display = confidence.GetDisplayNode()
    assert display.GetColorNodeID() == CONFIDENCE_COLOR_NODE_ID
    assert (display.GetAutoWindowLevel(), display.GetWindowLevelMin(), display.GetWindowLevelMax()) == (0, 0.0, 1.0)
    assert display.GetApplyThreshold() == 1 and display.GetAutoThreshold() == 0

    again, _ = logic.segment_nodes([node], card, options, segmentation_node=segmentation, network=net)
    replaced = again.GetNodeReference(CONFIDENCE_ROLE)
    assert again is segmentation and replaced is not confidence
    assert mrml_scene.scene.GetNodeByID(confidence.GetID()) is None  # the earlier run's volume is gone
    names = [mrml_scene.scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode").GetName()
             for i in range(mrml_scene.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"))]
    assert names == ["t1", replaced.GetName()]
    without, _ = logic.segment_nodes([node], card, CPU, network=net)
    assert without.GetNodeReference(CONFIDENCE_ROLE) is None  # only when asked for


def test_confidence_overlay_follows_the_checkbox_and_threshold_in_every_slice_view(mrml_scene) -> None:
    import math

    from SegMambaSlicerLib.slicer.logic import (
        CONFIDENCE_OPACITY,
        CONFIDENCE_ROLE,
        SegmentationLogic,
        show_confidence,
    )
    from SegMambaSlicerLib.slicer.mrml import volume_node_from_image

    scene = mrml_scene.scene
    views = [scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode") for _ in range(3)]
    node, image = _oblique_case(mrml_scene)
    card = toy_card(channels=1, labels=1, roi=8)
    net = PointwiseNet(np.array([[0.0], [0.2]]), np.array([0.0, -3.0]))
    segmentation, _ = SegmentationLogic(scene).segment_nodes(
        [node], card, SegmentOptions(device="cpu", confidence=True), network=net)
    overlay = segmentation.GetNodeReference(CONFIDENCE_ROLE)
    other = volume_node_from_image(image, scene, "user's overlay")

    show_confidence(segmentation, True, 0.5)
    assert [v.GetForegroundVolumeID() for v in views] == [overlay.GetID()] * 3
    assert [v.GetForegroundOpacity() for v in views] == [CONFIDENCE_OPACITY] * 3
    display = overlay.GetDisplayNode()
    assert display.GetLowerThreshold() == 0.0 and display.GetUpperThreshold() == math.nextafter(0.5, 0.0)
    show_confidence(segmentation, True, 0.8)
    assert display.GetUpperThreshold() == math.nextafter(0.8, 0.0)
    views[2].SetForegroundVolumeID(other.GetID())  # the user put another volume in one view
    show_confidence(segmentation, False, 0.8)
    assert [v.GetForegroundVolumeID() for v in views] == [None, None, other.GetID()]


def test_finishing_a_worker_run_imports_its_confidence(mrml_scene) -> None:
    """The GUI's path: the worker's result (here a stand-in) reaches the scene with its confidence volume."""
    from SegMambaSlicerLib.engine.volumes import volumes_ml
    from SegMambaSlicerLib.slicer.logic import CONFIDENCE_ROLE, SegmentationLogic, SegmentationRun

    node, image = _oblique_case(mrml_scene)
    card = toy_card(channels=1, labels=1, roi=8)
    labels = sitk.Cast(image > 20, sitk.sitkUInt8)
    confidence = sitk.Cast(image, sitk.sitkFloat32) / 40.0
    result = SegmentationResult(labels, card, "cpu", 1.0, 1, volumes_ml(labels, card), confidence=confidence)

    class FinishedWorker:
        def result(self) -> SegmentationResult:
            return result

    segmentation, got = SegmentationLogic(mrml_scene.scene).finish_segmentation(
        SegmentationRun(FinishedWorker(), card, [node], None))
    assert got is result and segmentation.GetNodeReference(CONFIDENCE_ROLE) is not None


def _halved(image: sitk.Image) -> sitk.Image:
    """The same space at half the spacing: each voxel splits into 2 x 2 x 2 whose nearest old voxel is it."""
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing())
    fine = sitk.Image([2 * n for n in image.GetSize()], sitk.sitkUInt8)
    fine.SetSpacing((spacing / 2).tolist())
    fine.SetDirection(image.GetDirection())
    fine.SetOrigin((np.asarray(image.GetOrigin()) - direction @ (spacing / 4)).tolist())
    return sitk.Resample(image, fine, sitk.Transform(), sitk.sitkNearestNeighbor, 0)


def test_prior_segmentation_node_on_another_grid_is_compared_like_its_label_map(mrml_scene,
                                                                               oblique_labelmap) -> None:
    from SegMambaSlicerLib.engine.pipeline import SegmentationResult
    from SegMambaSlicerLib.engine.volumes import volumes_ml
    from SegMambaSlicerLib.evaluation.lesions import LesionError
    from SegMambaSlicerLib.slicer.logic import prior_comparison
    from SegMambaSlicerLib.slicer.mrml import volume_node_from_image
    from SegMambaSlicerLib.slicer.review import compare_with_prior

    prior_map = sitk.Threshold(oblique_labelmap, 0, 3, 0)  # without the stray 7: a prior the card can read
    prior_node, prior_result, _ = _imported_result(mrml_scene, prior_map)  # has region segments too
    now = _halved(prior_map)
    now_array = sitk.GetArrayFromImage(now)
    now_array[now_array == 1] = 3  # the necrosis became enhancing
    grown = sitk.GetImageFromArray(now_array)
    grown.CopyInformation(now)
    card = prior_result.card
    result = SegmentationResult(grown, card, "cpu", 1.0, 1, volumes_ml(grown, card))

    comparison = prior_comparison(result, prior_node)
    assert comparison == compare_with_prior(result, prior_map, "The prior")
    assert dict(comparison.prior_volumes_ml) == pytest.approx(prior_result.volumes, rel=1e-12)  # resampled exactly
    assert comparison.enhancing.volume_ml == pytest.approx(prior_result.volumes["TC"], rel=1e-12)

    odd = volume_node_from_image(oblique_labelmap, mrml_scene.scene, "odd labels", labelmap=True)
    with pytest.raises(LesionError, match="The prior 'odd labels' holds the values 7"):
        prior_comparison(result, odd)


# ---------------------------------------------------------------- device list, info line, progress


def _info(**changes):
    from SegMambaSlicerLib.slicer.logic import GpuInfo, SystemInfo

    base = {"torch_version": "2.5.1+cu124", "cuda_build": "12.4", "gpus": (GpuInfo(0, "NVIDIA RTX 4090", 23.99),),
            "mps": False, "fused_kernels": None, "nvidia_driver": True}
    return SystemInfo(**{**base, **changes})


def test_device_choices_and_info_line_explain_the_gpu_state() -> None:
    from SegMambaSlicerLib.slicer.logic import describe_system, device_choices

    gpu = _info()
    assert device_choices(gpu) == [("auto", "Automatic (GPU 0: NVIDIA RTX 4090)"),
                                   ("cuda:0", "GPU 0: NVIDIA RTX 4090 (24 GB)"),
                                   ("cpu", "CPU (slow: several minutes per case)")]
    assert describe_system(gpu) == ("PyTorch 2.5.1+cu124 (CUDA 12.4 build); GPU 0: NVIDIA RTX 4090, 24.0 GB; "
                                    "fast fused Mamba kernels: yes.")
    broken = _info(gpus=(), fused_kernels="no CUDA device is available")
    assert [value for value, _ in device_choices(broken)] == ["auto", "cpu"]
    assert "built for CUDA but finds no usable NVIDIA GPU" in describe_system(broken)
    cpu_build = _info(cuda_build=None, gpus=(), fused_kernels="no CUDA", torch_version="2.5.1+cpu")
    assert "reinstall PyTorch with CUDA" in describe_system(cpu_build)
    mac = _info(cuda_build=None, gpus=(), mps=True, nvidia_driver=False, fused_kernels="no CUDA")
    assert device_choices(mac)[0] == ("auto", "Automatic (Apple GPU)") and ("mps", "Apple GPU (MPS)") in device_choices(mac)
    assert "pure PyTorch scan" in describe_system(mac) and "reinstall" not in describe_system(mac)


def test_system_info_probes_this_python() -> None:
    import torch
    from SegMambaSlicerLib.slicer.logic import system_info

    info = system_info()
    assert info.torch_version == torch.__version__ and info.cuda_usable == torch.cuda.is_available()


def test_progress_clock_estimates_time_left_from_the_window_rate() -> None:
    from SegMambaSlicerLib.slicer.logic import ProgressClock, format_seconds, progress_text

    now = [100.0]
    clock = ProgressClock(clock=lambda: now[0])
    assert clock.update(0.0) is None  # reading images
    now[0] = 130.0
    assert clock.update(0.0) is None  # loading the model: the rate is measured from here
    now[0] = 160.0
    assert clock.update(0.25) == pytest.approx(90.0)  # 30 s for a quarter -> 90 s left
    now[0] = 190.0
    assert clock.update(0.5) == pytest.approx(60.0)
    assert format_seconds(59.2) == "1:00" and format_seconds(3725) == "1:02:05" and format_seconds(-1) == "0:00"
    assert progress_text("window 20/40", 61.0) == "window 20/40 · about 1:01 left"
    assert progress_text("loading model", None) == "loading model"
    assert progress_text("window 40/40", 0.0) == "window 40/40"


class _ScriptedWorker:
    """Stands in for a worker process: hands out a fixed list of events once."""

    def __init__(self, events: list) -> None:
        self.events = events

    def poll(self) -> list:
        events, self.events = self.events, []
        return events


def test_run_updates_turn_worker_events_into_progress_bar_states_and_log_lines() -> None:
    from SegMambaSlicerLib.run.worker import WorkerEvent
    from SegMambaSlicerLib.slicer.logic import ProgressClock, RunUpdate, SegmentationRun

    times = iter([100.0, 110.0, 130.0])
    events = [
        WorkerEvent("started", data={"pid": 42, "python": "PythonSlicer"}),
        WorkerEvent("progress", "loading model", 0.0),
        WorkerEvent("progress", "window 1/4", 0.25),
        WorkerEvent("stderr", "   "),  # blank output is not logged
        WorkerEvent("log", "Selective scan backend: torch"),
        WorkerEvent("progress", "window 3/4", 0.75),
    ]
    run = SegmentationRun(_ScriptedWorker(events), card=None, input_nodes=[], segmentation_node=None,
                          clock=ProgressClock(clock=lambda: next(times)))
    assert run.updates() == [
        RunUpdate(log="Worker process 42 started (PythonSlicer)."),
        RunUpdate(0, "loading model"),
        RunUpdate(250, "window 1/4 · about 0:30 left"),  # 10 s for a quarter: 30 s for the rest
        RunUpdate(log="Selective scan backend: torch"),
        RunUpdate(750, "window 3/4 · about 0:10 left"),  # 30 s for three quarters
    ]
    assert run.updates() == []
    warm = [WorkerEvent("network", data={"reused": False, "loads": 1, "pid": 42}),
            WorkerEvent("network", data={"reused": True, "loads": 1, "pid": 42})]
    assert SegmentationRun(_ScriptedWorker(warm), None, [], None).updates() == [
        RunUpdate(log="Worker process 42 loaded the network."),
        RunUpdate(log="Worker process 42 reused the network it had loaded."),
    ]


def test_starting_without_weights_fails_at_once_with_the_cards_instructions(mrml_scene) -> None:
    import dataclasses

    from SegMambaSlicerLib.errors import CheckpointError
    from SegMambaSlicerLib.slicer.logic import SegmentationLogic
    from SegMambaSlicerLib.slicer.mrml import volume_node_from_image

    node = volume_node_from_image(sitk.GetImageFromArray(np.ones((8, 8, 8), np.float32)), mrml_scene.scene, "t1")
    card = toy_card(channels=1, labels=1)
    card = dataclasses.replace(card, weights=dataclasses.replace(card.weights, instructions="Ask the lab for it."))
    logic = SegmentationLogic(mrml_scene.scene)
    with pytest.raises(CheckpointError, match="No weights for Toy model. Ask the lab for it."):
        logic.start_segmentation([node], card, CPU)
    with pytest.raises(CheckpointError, match="No weights for Toy model at .*missing.pt"):
        logic.start_segmentation([node], card, SegmentOptions(device="cpu", weights="/nowhere/missing.pt"))


def test_node_groups_are_segmented_case_by_case_with_overall_progress(mrml_scene) -> None:
    from SegMambaSlicerLib.slicer.logic import SegmentationLogic
    from SegMambaSlicerLib.slicer.mrml import volume_node_from_image

    groups, expected = [], []
    for size in (10, 14):
        arr = np.zeros((size, size, size), np.float32)
        arr[2:-2, 2:-2, 2:-2] = 5.0
        arr[4:7, 4:7, 4:7] = 40.0
        groups.append([volume_node_from_image(sitk.GetImageFromArray(arr), mrml_scene.scene, f"case{size}")])
        expected.append(27)
    card = toy_card(channels=1, labels=1, roi=8)
    net = PointwiseNet(np.array([[0.0], [1.0]]), np.array([0.0, -1.0]))
    seen: list[float] = []
    out = SegmentationLogic(mrml_scene.scene).segment_node_groups(
        groups, card, CPU, progress=lambda f, m: seen.append(f), network=net
    )
    assert len(out) == 2 and out[0][0] is not out[1][0]
    assert [int((sitk.GetArrayFromImage(r.labelmap) == 1).sum()) for _, r in out] == expected
    assert seen == sorted(seen) and seen[-1] == pytest.approx(1.0) and min(seen) < 0.5 < max(seen)


def test_background_runs_reuse_the_warm_worker_and_match_the_in_process_run(
    mrml_scene, card_path: Path, case: dict[str, Path], one_thread, home: Path
) -> None:
    """The GUI's path twice, then the console's ``in_worker=True``: one process, the network loaded once.

    The worker also measures its runs, so the estimate shown before the next click has a time.
    """
    import time

    from SegMambaSlicerLib.models.cards import load_card
    from SegMambaSlicerLib.slicer.logic import SegmentationLogic
    from SegMambaSlicerLib.slicer.mrml import volume_node_from_image

    card = load_card(card_path)
    nodes = [volume_node_from_image(sitk.ReadImage(str(case[c.key])), mrml_scene.scene, c.key)
             for c in card.channels]
    logic = SegmentationLogic(mrml_scene.scene)
    logs, pids, labelmaps = [], [], []
    assert logic.estimate(nodes, card, CPU, threads=1).seconds is None  # nothing measured in this fresh cache
    try:
        for _ in range(2):
            run = logic.start_segmentation(nodes, card, CPU, threads=1, idle_timeout=30.0)
            pids.append(logic.worker.pid)
            while not run.finished:  # what the widget's timer does
                logs += [update.log for update in run.updates() if update.log]
                time.sleep(0.02)
            labelmaps.append(logic.finish_segmentation(run)[1].labelmap)
        _, console = logic.segment_nodes(nodes, card, CPU, in_worker=True)
        assert pids[0] == pids[1] == logic.worker.pid is not None and logic.worker.idle_timeout == 30.0
        assert [line.split(" ", 3)[3] for line in logs if "network" in line] == [
            "loaded the network.", "reused the network it had loaded."]
        _, in_process = logic.segment_nodes(nodes, card, CPU)
        want = sitk.GetArrayFromImage(in_process.labelmap)
        assert set(np.unique(want)) == {0, 1, 2, 3}  # a real comparison
        for labelmap in (*labelmaps, console.labelmap):
            np.testing.assert_array_equal(sitk.GetArrayFromImage(labelmap), want)
        after = logic.estimate(nodes, card, CPU, threads=1)
        assert after.seconds is not None and not after.peak_is_lower_bound and after.windows == in_process.windows
    finally:
        logic.worker.release()
    assert logic.worker.pid is None


def test_the_report_of_a_result_in_the_scene_is_a_one_page_pdf(mrml_scene, tmp_path: Path) -> None:
    """The module's "Save report" path: the input volume nodes and the run's options give the same PDF page."""
    from SegMambaSlicerLib.slicer.logic import SegmentationLogic, write_report
    from SegMambaSlicerLib.slicer.mrml import volume_node_from_image

    rng = np.random.default_rng(7)
    arrays = [np.zeros((12, 16, 14), np.float32) for _ in range(2)]
    for a in arrays:
        a[2:10, 3:13, 2:12] = rng.normal(10, 3, size=(8, 10, 10))
    images = [sitk.GetImageFromArray(a) for a in arrays]
    nodes = [volume_node_from_image(image, mrml_scene.scene, f"c{i}") for i, image in enumerate(images)]
    card = toy_card(channels=2, labels=2)
    options = SegmentOptions(device="cpu", confidence=True)
    network = PointwiseNet(rng.normal(size=(3, 2)), rng.normal(size=3))
    _, result = SegmentationLogic(mrml_scene.scene).segment_nodes(nodes, card, options, network=network)
    path = write_report(tmp_path / "report.pdf", result, nodes, options)
    data = path.read_bytes()
    assert data.startswith(b"%PDF") and len(re.findall(rb"/Type\s*/Page(?!s)", data)) == 1  # one page
    assert [p.name for p in tmp_path.iterdir()] == ["report.pdf"]  # written atomically, nothing else left


def test_a_dicom_seg_is_exported_for_a_volume_loaded_from_dicom(mrml_scene, tmp_path: Path) -> None:
    """The module's "Export DICOM SEG": the series is found through the node's instance UIDs, as Slicer's
    DICOM module records them, and the SEG references it."""
    pydicom = pytest.importorskip("pydicom")
    pytest.importorskip("highdicom")
    from dicom_files import write_dicom_series
    from SegMambaSlicerLib.io.dicom_seg import DicomSegError
    from SegMambaSlicerLib.slicer.logic import (
        DICOM_INSTANCES_ATTRIBUTE,
        SegmentationLogic,
        write_dicom_segmentation,
    )
    from SegMambaSlicerLib.slicer.mrml import volume_node_from_image

    array = np.zeros((6, 12, 10), np.int16)
    array[1:5, 3:9, 2:8] = 100
    array[2:4, 5:7, 4:6] = 300
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.9, 0.9, 3.0))
    tags = write_dicom_series(image, tmp_path / "series")
    files = sorted((tmp_path / "series").iterdir())
    by_uid = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): str(f) for f in files}
    loaded = sitk.ReadImage([str(f) for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(tmp_path / "series"))])
    node = volume_node_from_image(sitk.Cast(loaded, sitk.sitkFloat32), mrml_scene.scene, "t1")
    card = toy_card(channels=1, labels=2)
    network = PointwiseNet(np.array([[0.0], [0.02], [0.04]]), np.array([0.0, -1.0, -7.0]))
    _, result = SegmentationLogic(mrml_scene.scene).segment_nodes([node], card, SegmentOptions(device="cpu"),
                                                                  network=network)
    with pytest.raises(DicomSegError, match="was not loaded from DICOM"):
        write_dicom_segmentation(tmp_path / "seg.dcm", result, node, by_uid.get)
    node.SetAttribute(DICOM_INSTANCES_ATTRIBUTE, " ".join(by_uid))
    seg = pydicom.dcmread(write_dicom_segmentation(tmp_path / "seg.dcm", result, node, by_uid.get))
    assert seg.Modality == "SEG" and len(seg.SegmentSequence) == len(card.labels)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == tags["0020|000e"]
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [label.name for label in card.labels]


def test_the_estimate_of_volume_nodes_counts_the_windows_the_run_makes(mrml_scene, home: Path) -> None:
    """Each volume's grid is read once per modification; a changed volume is read again."""
    slicer = pytest.importorskip("slicer")
    from SegMambaSlicerLib.slicer.logic import SegmentationLogic
    from SegMambaSlicerLib.slicer.mrml import volume_node_from_image

    arrays = [np.zeros((30, 40, 44), np.float32) for _ in range(2)]
    arrays[0][2:20, 5:30, 4:40] = 5.0
    arrays[1][8:28, 3:25, 10:30] = 2.0
    arrays[0][10, 10, 10] = arrays[1][10, 10, 10] = 9.0
    nodes = [volume_node_from_image(sitk.GetImageFromArray(a), mrml_scene.scene, f"c{i}") for i, a in enumerate(arrays)]
    card = toy_card(channels=2, labels=1, roi=8)
    net = PointwiseNet(np.array([[0.0, 0.0], [1.0, 1.0]]), np.array([0.0, -4.0]))
    logic = SegmentationLogic(mrml_scene.scene)
    estimate = logic.estimate(nodes, card, CPU)
    _, result = logic.segment_nodes(nodes, card, CPU, network=net)
    assert estimate.windows == result.windows > 1 and estimate.seconds is None
    assert estimate.network_shape == (26, 27, 36)  # the union of both volumes' content
    grids = dict(logic._grids)
    assert logic.estimate(nodes, card, CPU).windows == estimate.windows and logic._grids == grids
    smaller = np.zeros_like(arrays[1])
    smaller[10:12, 10:12, 10:12] = 3.0
    slicer.util.updateVolumeFromArray(nodes[1], smaller)
    assert logic.estimate(nodes, card, CPU).network_shape == (18, 25, 36)  # only the first volume's box now
    with pytest.raises(InputImageError, match="Select one volume for each input"):
        logic.estimate(nodes[:1], card, CPU)

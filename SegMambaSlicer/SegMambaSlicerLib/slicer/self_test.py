"""The module's self-test (SegMambaSlicerTest): its cases, each with an answer known in advance, and checks.

A fixed-weight network whose label map is known exactly, run in-process through the module logic; and a
small seeded SegMamba (or the demo model when it is installed) run in the worker process, as the GUI
does, and compared with an in-process run. The checks take the running ``unittest.TestCase`` (for its
assertions) and the module's logic facade, so the module file keeps only the test's entry points.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import tempfile
import time
import unittest
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import SimpleITK as sitk

from ..evaluation.phantom import make_phantom
from ..models.cards import ModelCard, builtin_cards, load_card
from ..networks import build_network

if TYPE_CHECKING:
    from torch import nn

#: Said (and logged) when the self-test cannot run: extension build machines test modules without torch.
NO_TORCH = ("SegMamba self-test skipped: PyTorch is not installed in this Slicer (as on the extension build "
            "machines). Open the SegMamba module and let it install PyTorch to run the test.")


def skip_reason() -> str | None:
    """Why the self-test cannot run here, or None; checked without importing torch."""
    return NO_TORCH if importlib.util.find_spec("torch") is None else None

#: The fixed-weight case's volumes: label 3 (and every region containing it) on 4 x 5 x 5 voxels of 1 mm^3.
FIXED_WEIGHT_VOLUMES_ML = {"Necrotic tumor core": 0.0, "Peritumoral edema": 0.0, "Enhancing tumor": 0.1,
                           "TC": 0.1, "WT": 0.1, "ET": 0.1}


def fixed_weight_case() -> tuple[ModelCard, list[np.ndarray], nn.Module]:
    """(card, one array per channel, network): label 3 exactly where channel 0 is brightest.

    The BraTS card on 16-voxel windows; each channel has a body of its own brightness and a
    shared bright core, and a 1x1x1 convolution scores label 3 from channel 0 alone.
    """
    card = builtin_cards()["segmamba-brats2023"]
    card = dataclasses.replace(card, inference=dataclasses.replace(card.inference, roi_size=(16, 16, 16)))
    arrays = []
    for index in range(len(card.channels)):
        array = np.zeros((20, 24, 22), dtype=np.float32)
        array[4:16, 5:20, 3:18] = 10.0 + index
        array[8:12, 9:14, 7:12] = 50.0
        arrays.append(array)
    import torch
    from torch import nn

    network = nn.Conv3d(4, 4, 1)
    with torch.no_grad():
        network.weight.zero_()
        network.bias.copy_(torch.tensor([0.0, -1.0, -2.0, -3.0]))
        network.weight[3, 0] = 10.0  # label 3 where channel 0 is above its mean
    return card, arrays, network.eval()


def worker_case(folder: str | Path, demo_model_id: str) -> tuple[ModelCard, list[sitk.Image]]:
    """(card, images): the demo model on a phantom when installed, else a tiny seeded SegMamba in ``folder``."""
    demo = builtin_cards().get(demo_model_id)
    if demo is not None and demo.weights_path() is not None and demo.weights_path().is_file():
        case = make_phantom(shape=(64, 64, 48), seed=11)
        return demo, [case.images[channel.key] for channel in demo.channels]
    import torch

    folder = Path(folder)
    kwargs = {"in_chans": 1, "out_chans": 2, "depths": [1, 1, 1, 1], "feat_size": [48, 16, 16, 16],
              "hidden_size": 32}
    torch.manual_seed(3)
    torch.save(build_network("segmamba_v1", **kwargs).state_dict(), folder / "tiny.pt")
    card = {"id": "tiny-segmamba", "architecture": {"name": "segmamba_v1", "kwargs": kwargs},
            "channels": [{"key": "t1"}], "labels": [{"value": 1, "name": "Lesion", "color": [1, 0, 0]}],
            "regions": [{"name": "ALL", "labels": [1], "color": [0, 0, 1]}],
            "inference": {"roi_size": [32, 32, 32], "sw_batch_size": 1},
            "weights": {"kind": "file", "file": "tiny.pt"}}
    (folder / "tiny.json").write_text(json.dumps(card), encoding="utf-8")
    image = sitk.GetImageFromArray((np.random.default_rng(0).random((20, 28, 30)) * 100 + 1).astype(np.float32))
    image.SetSpacing((0.9, 1.1, 1.7))
    return load_card(folder / "tiny.json"), [image]


def check_in_process(test: unittest.TestCase, logic: Any) -> str:
    """Segment the fixed-weight case in-process; segments, names and volumes are the known ones."""
    import slicer

    card, arrays, network = fixed_weight_case()
    volumes = [slicer.util.addVolumeFromArray(array, name=channel.key)
               for array, channel in zip(arrays, card.channels)]
    node, result = logic.impl.segment_nodes(volumes, card, network=network)
    segmentation = node.GetSegmentation()
    names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
    test.assertEqual(names, [label.name for label in card.labels] + [r.display_name for r in card.regions])
    test.assertEqual(result.volumes.keys(), FIXED_WEIGHT_VOLUMES_ML.keys())
    for key, value in FIXED_WEIGHT_VOLUMES_ML.items():
        test.assertAlmostEqual(result.volumes[key], value, places=9)
    assert_segments_match_volumes(test, node, result, volumes[0])
    return "SegMamba in-process segmentation passed"


def check_worker(test: unittest.TestCase, logic: Any, demo_model_id: str) -> str:
    """Segment in the worker process, as the widget's timer polls it; the in-process run gives the same."""
    import slicer
    import torch

    from ..engine.pipeline import SegmentOptions
    from .mrml import volume_node_from_image

    with tempfile.TemporaryDirectory() as folder:
        card, images = worker_case(folder, demo_model_id)
        volumes = [volume_node_from_image(image, slicer.mrmlScene, channel.key)
                   for image, channel in zip(images, card.channels)]
        options = SegmentOptions(device="cpu", mixed_precision=False)
        run = logic.impl.start_segmentation(volumes, card, options, threads=torch.get_num_threads())
        while not run.finished:  # what the widget's timer does
            run.poll()
            time.sleep(0.05)
        node, result = logic.finish(run)
        reference_node, reference = logic.impl.segment_nodes(volumes, card, options)
    test.assertEqual(result.volumes, reference.volumes)
    segmentation = node.GetSegmentation()
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        got = slicer.util.arrayFromSegmentBinaryLabelmap(node, segment_id, volumes[0])
        want = slicer.util.arrayFromSegmentBinaryLabelmap(reference_node, segment_id, volumes[0])
        np.testing.assert_array_equal(got, want)
    assert_segments_match_volumes(test, node, result, volumes[0])
    return f"SegMamba background worker passed ({card.id}, {result.seconds:.1f} s)"


def assert_segments_match_volumes(test: unittest.TestCase, node: Any, result: Any, reference_volume: Any) -> None:
    """Every segment's voxel count times the voxel volume equals the volumes table."""
    import slicer

    from .logic import volume_rows

    voxel_ml = float(np.prod(reference_volume.GetSpacing())) / 1000.0
    for row in volume_rows(result):
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(node, row.segment_id, reference_volume)
        test.assertAlmostEqual(int(np.count_nonzero(mask)) * voxel_ml, row.volume_ml, places=9)

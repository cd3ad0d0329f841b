"""The inputs of the module's self-test (SegMambaSlicerTest), each with an answer known in advance.

Built here, without Slicer, so that the self-test in the module file reads as its checks: a
fixed-weight network whose label map is known exactly, and a small seeded SegMamba (or the demo
model when it is installed) for comparing the worker process with an in-process run.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn

from ..evaluation.phantom import make_phantom
from ..models.cards import ModelCard, builtin_cards, load_card
from ..networks import build_network

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

"""Small fixed-weight networks and cards whose outputs are computable by hand (numpy)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from SegMambaSlicerLib.models.cards import ModelCard, card_from_dict
from SegMambaSlicerLib.models.resources import models_dir
from torch import nn

#: A SegMamba V1 small enough for 32³ windows in a fraction of a second on one core.
TINY_SEGMAMBA_KWARGS = {"in_chans": 4, "out_chans": 4, "feat_size": [48, 8, 8, 8], "hidden_size": 16,
                        "depths": [1, 1, 1, 1], "nslices": [16, 8, 4, 2]}


def case_inputs(case: dict[str, Path]) -> list[str]:
    """The four channel files of a phantom case in the BraTS card's order (t2w, t2f, t1n, t1c)."""
    return [str(case[key]) for key in ("t2w", "t2f", "t1n", "t1c")]


def write_tiny_brats_card(folder: Path) -> Path:
    """The BraTS card with a tiny SegMamba V1 (32³ windows) and seeded random weights saved beside it.

    Its outputs mean nothing clinically, but they depend on every input channel, through the real
    pipeline, checkpoint loading and network.
    """
    from SegMambaSlicerLib.networks.segmamba_v1 import SegMambaV1

    torch.manual_seed(0)
    torch.save(SegMambaV1(**TINY_SEGMAMBA_KWARGS).state_dict(), folder / "tiny.pt")
    data = json.loads((models_dir() / "segmamba-brats2023.json").read_text(encoding="utf-8"))
    data.update(id="tiny-segmamba", architecture={"name": "segmamba_v1", "kwargs": TINY_SEGMAMBA_KWARGS},
                weights={"kind": "file", "file": "tiny.pt"})
    data["inference"].update(roi_size=[32, 32, 32], sw_batch_size=1)
    path = folder / "tiny.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def toy_card(channels: int = 2, labels: int = 2, roi: int = 16, **inference: Any) -> ModelCard:
    """A card for ``channels`` inputs and ``labels`` foreground labels (values 1..labels), tiny windows."""
    data = {
        "id": "toy",
        "display_name": "Toy model",
        "architecture": {"name": "toy", "kwargs": {}},
        "channels": [{"key": f"c{i}", "display_name": f"Channel {i}", "synonyms": []} for i in range(channels)],
        "labels": [
            {"value": v, "name": f"Label {v}", "color": [v / labels, 0.5, 1 - v / labels]}
            for v in range(1, labels + 1)
        ],
        "regions": [{"name": "ALL", "labels": list(range(1, labels + 1)), "color": [1, 1, 1]}],
        "inference": {"roi_size": [roi] * 3, "overlap": 0.5, "sw_batch_size": 2, **inference},
    }
    return card_from_dict(data)


class PointwiseNet(nn.Module):
    """logits = W·x + b per voxel (a 1×1×1 conv); sliding windows cannot change its output."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray) -> None:
        super().__init__()
        self.conv = nn.Conv3d(weight.shape[1], weight.shape[0], 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.as_tensor(weight, dtype=torch.float32)[..., None, None, None])
            self.conv.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += x.shape[0]
        return self.conv(x)


def pointwise_expected(data: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """argmax over W·x + b for a (C, ...) array (numpy, independent of torch)."""
    logits = np.tensordot(weight, data.astype(np.float64), axes=([1], [0])) + bias.reshape(-1, *[1] * (data.ndim - 1))
    return logits.argmax(axis=0)


class AxisGradientNet(nn.Module):
    """Label 1 where channel 0 increases along network array axis ``axis`` (2=z, 3=y, 4=x).

    Used to check orientation: a ramp that increases toward a world direction must give
    label 1 only if the pipeline presented the array in the card's orientation.
    """

    def __init__(self, axis: int) -> None:
        super().__init__()
        self.axis = axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grad = torch.diff(x[:, :1], dim=self.axis, append=x[:, :1].narrow(self.axis, -1, 1))
        grad = grad + torch.diff(x[:, :1], dim=self.axis, prepend=x[:, :1].narrow(self.axis, 0, 1))
        return torch.cat([torch.zeros_like(grad), grad], dim=1)


def nnunet_result_card(cases: Any, case: str, folder: Path) -> ModelCard:
    """An nnU-Net result folder (plans, dataset, two toy folds) of a reference case, and its card.

    ``cases`` is Testing/fixtures_nnunet/make_reference.py loaded as a module: its plans, dataset and
    toy fold networks are those the nnunetv2 reference outputs were computed with.
    """
    from SegMambaSlicerLib.models.nnunet import nnunet_card_data

    plans, dataset_json = cases.plans_for(case), cases.dataset_for(case)
    (folder / "plans.json").write_text(json.dumps(plans), encoding="utf-8")
    (folder / "dataset.json").write_text(json.dumps(dataset_json), encoding="utf-8")
    for fold, net in enumerate(cases.toy_folds(case)):
        (folder / f"fold_{fold}").mkdir()
        torch.save({"network_weights": net.state_dict()}, folder / f"fold_{fold}" / "checkpoint_final.pth")
    return card_from_dict(nnunet_card_data(
        plans, dataset_json, "3d_fullres", folder, ("0", "1"), "checkpoint_final.pth", cases.TRAINER,
        mirror_axes=cases.CASES[case].get("mirror"),
    ))


def write_cohort(root: Path, good: tuple[str, ...], corrupt: str) -> Path:
    """Phantom cases in the BraTS 2023 layout under ``root`` and one case whose T1c file is not an image."""
    from SegMambaSlicerLib.evaluation.phantom import make_phantom, write_brats_case

    for seed, case_id in enumerate((*good, corrupt)):
        write_brats_case(make_phantom(shape=(40, 36, 24), seed=seed, spacing=(1.0, 1.2, 1.5)), root, case_id)
    (root / corrupt / f"{corrupt}-t1c.nii.gz").write_bytes(b"this is not a NIfTI file" * 10)
    return root

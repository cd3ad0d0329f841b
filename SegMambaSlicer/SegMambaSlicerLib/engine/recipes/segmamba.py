"""The SegMamba recipe (V1 and V2): reorient, crop to the content, z-score; undone exactly for the result.

As the official code (docs/models.md, "SegMamba preprocessing"): crop to the union of non-zero voxels over
channels (holes filled), then z-score each channel over the whole crop, zeros included, with the
population std. The network sees the image in the card's orientation by axis permutations and flips
only, so the label map lands back on the input grid exactly.

A card may also name a voxel size to run at (``preprocessing.spacing``; the official cards do not): the
normalised crop is then resampled to it, and the logits back to the crop's own grid before the argmax,
so the label map is still on the input grid voxel for voxel (nnU-Net's way of exporting: resample
logits, then take labels).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from torch import nn

from ...errors import CheckpointError
from ...io.geometry import AxisReorder, direction_matrix, reorder_to
from ...models.cards import ModelCard, Preprocessing
from ...models.checkpoints import load_into, load_state_dict_file, verified_weights_path
from ...networks import build_network
from ..crop import CropBox, nonzero_box
from ..inputs import split_nonfinite
from .base import OUTSIDE_CROP_CONFIDENCE, Folds, Recipe, Restore, Restored, Weights, softmax_confidence

#: ``preprocessing.scheme`` of the cards this recipe runs.
SCHEME = "crop_nonzero_zscore"


def zscore(data: np.ndarray, eps: float = 1e-8, valid: np.ndarray | None = None) -> np.ndarray:
    """Per-channel ``(x - mean) / max(std, eps)`` over all voxels, float32 as the official code.

    With ``valid`` (a boolean array shaped like ``data``) the statistics are taken over the valid
    voxels only; the others must already hold 0 and are normalised as 0.
    """
    data = data.astype(np.float32, copy=False)
    out = np.empty_like(data)
    for c in range(data.shape[0]):
        sample = data[c] if valid is None or valid[c].all() else data[c][valid[c]]
        mean = sample.mean(dtype=np.float64) if sample.size else 0.0
        std = sample.std(dtype=np.float64) if sample.size else 0.0
        out[c] = (data[c] - np.float32(mean)) / np.float32(max(std, eps))
    return out


def preprocess(data: np.ndarray, settings: Preprocessing) -> tuple[np.ndarray, CropBox]:
    """Apply the card's preprocessing to a (C, z, y, x) array; return the network input and crop box."""
    data, finite = split_nonfinite(data)
    if settings.crop_nonzero:
        box = nonzero_box(data, settings.fill_holes)
    else:
        box = CropBox(lo=(0, 0, 0), hi=tuple(data.shape[1:]), full_shape=tuple(data.shape[1:]))
    crop = (slice(None), *box.slices)
    return zscore(data[crop], settings.eps, None if finite is None else finite[crop]), box


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> tuple[int, ...]:
    """Grid size covering the same extent at the ``target`` voxel size: ``round(n · spacing / target)``, ≥ 1."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target))


def resample_linear(volumes: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Trilinear resampling of (C, z, y, x) float volumes to ``shape``, the grids' outer edges aligned.

    Voxel centres map as ``(i + 0.5) · n_in / n_out − 0.5`` (``align_corners=False``), the same mapping
    both ways, so a crop resampled down and its logits resampled up cover exactly the same box.
    """
    if tuple(volumes.shape[1:]) == tuple(shape):
        return volumes
    tensor = torch.from_numpy(np.ascontiguousarray(volumes, dtype=np.float32))[None]
    return F.interpolate(tensor, size=tuple(shape), mode="trilinear", align_corners=False)[0].numpy()


def array_spacing(reference: sitk.Image, reorder: AxisReorder) -> tuple[float, float, float]:
    """Voxel size (mm) along the (z, y, x) axes of the array once reordered to the card's orientation."""
    spacing = reference.GetSpacing()
    z, y, x = (float(spacing[reorder.source_axis[t]]) for t in (2, 1, 0))
    return z, y, x


def network_grid(crop_shape: Sequence[int], spacing_zyx: Sequence[float], settings: Preprocessing) -> tuple[int, ...]:
    """The (z, y, x) grid the network runs on for a crop: the crop itself, or resampled to the card's spacing."""
    if settings.spacing is None:
        return tuple(crop_shape)
    return resampled_shape(crop_shape, spacing_zyx, settings.spacing[::-1])


def prepare(data: np.ndarray, reference: sitk.Image, card: ModelCard, weights: Weights = None,
            folds: Folds = None) -> tuple[np.ndarray, Restore]:
    """Reorient to the card's orientation, crop and z-score (and resample when the card names a spacing).

    The returned function undoes it for logits: back to the crop's grid, argmax, pasted into the crop
    box and reoriented back; the confidence (the softmax one, the labels being the argmax) the same way.
    ``weights`` and ``folds`` do not change SegMamba's preprocessing (they do nnU-Net's).
    """
    reorder = reorder_to(direction_matrix(reference), card.orientation)
    net_input, box = preprocess(np.ascontiguousarray(reorder.forward(data)), card.preprocessing)
    crop_shape = net_input.shape[1:]
    net_input = resample_linear(net_input, network_grid(crop_shape, array_spacing(reference, reorder),
                                                        card.preprocessing))

    def restore(logits: np.ndarray, confidence: bool) -> Restored:
        logits = resample_linear(logits, crop_shape)
        values = np.asarray(card.label_values, dtype=np.uint8)[logits.argmax(0)]
        labels = reorder.inverse(box.paste(values))
        if not confidence:
            return Restored(labels, None)
        certainty = box.paste(softmax_confidence(logits), fill=OUTSIDE_CROP_CONFIDENCE)
        return Restored(labels, reorder.inverse(certainty))

    return net_input, restore


def load(card: ModelCard, weights: Weights = None, folds: Folds = None) -> nn.Module:
    """The card's network with its weights loaded strictly (the card's own file checksummed first)."""
    path = Path(weights).expanduser() if weights else verified_weights_path(card)
    if path is None:
        hint = card.weights.instructions or "Provide a weights file."
        raise CheckpointError(f"No weights for {card.display_name}. {hint}")
    network = build_network(card.architecture, **card.architecture_kwargs)
    return load_into(network, load_state_dict_file(path), source=f"weights file {path.name}")


RECIPE = Recipe(scheme=SCHEME, tiling="monai", prepare=prepare, load=load)

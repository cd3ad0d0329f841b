"""What a recipe is: the model-specific steps around the network, chosen by a card's preprocessing scheme.

It also holds the per-voxel confidence both recipes report on request: one definition for every family,
computed from the same logits the label map is taken from.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import SimpleITK as sitk
from torch import nn

from ...models.cards import ModelCard

Weights = str | Path | None
Folds = Sequence[str | int] | None

#: Confidence of voxels the network never sees (outside the crop to the content): background by the
#: pipeline's rule, not by a guess. nnU-Net's own export gives them probability 1 for background
#: (``revert_cropping_on_probabilities``), which is confidence 1 under both measures below.
OUTSIDE_CROP_CONFIDENCE = 1

#: Voxels per slab when computing confidence, so that the float64 temporaries stay small (≤ 32 MB each).
_SLAB_VOXELS = 1 << 22


class Restored(NamedTuple):
    """A label map on the input's array grid and, when asked for, the float32 confidence on the same grid."""

    labels: np.ndarray
    confidence: np.ndarray | None


#: Maps the network's logits (K, ...) back to the input's array grid; ``True`` asks for the confidence too.
Restore = Callable[[np.ndarray, bool], Restored]


@dataclass(frozen=True)
class Recipe:
    """The steps of one family of models; the pipeline runs any of them the same way.

    ``prepare(data, reference, card, weights, folds)`` takes the (C, z, y, x) input on the first
    channel's grid and returns the network input and the function that maps logits back; ``load``
    builds the network with its weights; ``tiling`` names the sliding-window scheme of
    :mod:`..inference` the family was trained with.
    """

    scheme: str
    tiling: str
    prepare: Callable[[np.ndarray, sitk.Image, ModelCard, Weights, Folds], tuple[np.ndarray, Restore]]
    load: Callable[[ModelCard, Weights, Folds], nn.Module]


def softmax_confidence(logits: np.ndarray) -> np.ndarray:
    """``1 − H(softmax(logits)) / log K`` per voxel of (K, ...) logits, float32 in [0, 1].

    Normalised entropy rather than the top probability: it uses the whole distribution (the top
    probability ignores how the rest is spread), it means the same for any K (0: all classes equally
    likely, 1: one-hot) without rescaling from [1/K, 1], and it is the usual voxel-wise uncertainty of
    segmentation networks.
    """
    return _per_slab(_softmax_confidence, logits)


def regions_confidence(logits: np.ndarray) -> np.ndarray:
    """``1 − max_k H(sigmoid(logits[k])) / log 2`` per voxel of (regions, ...) logits, float32 in [0, 1].

    Each region is its own yes/no decision and the label painted from them is only as sure as the
    least sure one, hence the worst region. With one region this equals :func:`softmax_confidence` of
    the two-class logits (0, x), so region and label models read the same.
    """
    return _per_slab(_regions_confidence, logits)


def _per_slab(measure: Callable[[np.ndarray], np.ndarray], logits: np.ndarray) -> np.ndarray:
    """``measure`` over slabs of the first spatial axis, so memory grows with a slab, not the volume."""
    out = np.empty(logits.shape[1:], dtype=np.float32)
    step = max(1, _SLAB_VOXELS // max(1, logits[:, :1].size))
    for start in range(0, out.shape[0], step):
        out[start : start + step] = measure(logits[:, start : start + step])
    return out


def _softmax_confidence(logits: np.ndarray) -> np.ndarray:
    """Entropy as ``log S − Σ e_k (l_k − m) / S``, ``e_k = exp(l_k − m)``, ``m`` = max: no overflow."""
    top = logits.max(0).astype(np.float64)
    total = np.zeros_like(top)
    weighted = np.zeros_like(top)
    for channel in logits:
        shifted = channel - top
        exp = np.exp(shifted)
        total += exp
        weighted += exp * shifted
    entropy = np.log(total) - weighted / total
    # one class (a card without labels) leaves nothing to choose: entropy 0, confidence 1
    return np.clip(1.0 - entropy / np.log(max(len(logits), 2)), 0.0, 1.0)


def _regions_confidence(logits: np.ndarray) -> np.ndarray:
    """Binary entropy of ``sigmoid(x)``, ``log1p(e^−|x|) + |x|·e^−|x| / (1 + e^−|x|)``: no overflow."""
    worst = np.zeros(logits.shape[1:], dtype=np.float64)
    for channel in logits:
        size = np.abs(channel.astype(np.float64))
        tail = np.exp(-size)
        np.maximum(worst, np.log1p(tail) + size * tail / (1.0 + tail), out=worst)
    return np.clip(1.0 - worst / np.log(2.0), 0.0, 1.0)

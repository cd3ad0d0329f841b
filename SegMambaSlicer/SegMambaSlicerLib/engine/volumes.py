"""Volumes of labels and derived regions (e.g. BraTS TC/WT/ET) in millilitres."""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk

from ..models.cards import ModelCard


def volumes_ml(labelmap: sitk.Image, card: ModelCard) -> dict[str, float]:
    """Volume per label name and per region name: voxel count × voxel volume (mm³) / 1000."""
    voxel_ml = math.prod(labelmap.GetSpacing()) / 1000.0
    counts = np.bincount(sitk.GetArrayViewFromImage(labelmap).ravel(), minlength=256)
    result = {label.name: float(counts[label.value] * voxel_ml) for label in card.labels}
    for region in card.regions:
        result[region.name] = float(sum(counts[v] for v in region.labels) * voxel_ml)
    return result

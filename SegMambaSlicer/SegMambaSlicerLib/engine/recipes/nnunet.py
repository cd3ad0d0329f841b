"""The nnU-Net v2 recipe (MambaClinix result folders): nnU-Net's own plans-driven steps, in one place.

MambaClinix runs inside nnU-Net v2, so its inputs go through nnU-Net's preprocessing (docs/models.md,
"nnU-Net preprocessing"): ``transpose_forward``, the same crop as SegMamba, per-channel normalisation
schemes, and resampling to the configuration's spacing (``resample_data_or_seg_to_shape``: spline order 3
in-plane, order 0 across slices when the grid is anisotropic). :func:`nnunet_export` undoes them for the
logits (docs/models.md, "nnU-Net prediction and export"): resample back (order 1), argmax or region
thresholds, paste, transpose back; :func:`nnunet_restore` adds the confidence of that prediction. What
the plans say is read by :mod:`..models.nnunet`; this module only computes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from torch import nn

from ...errors import InputImageError
from ...models.cards import ModelCard
from ...models.nnunet import (
    NNUNET_NORMALIZATIONS,
    NNUNET_SCHEME,
    NnunetChannel,
    NnunetResampling,
    NnunetSettings,
    load_ensemble,
    model_for_card,
)
from ..crop import CropBox, box_of_mask, nonzero_mask
from ..inputs import split_nonfinite
from .base import (
    OUTSIDE_CROP_CONFIDENCE,
    Folds,
    Recipe,
    Restore,
    Restored,
    Weights,
    regions_confidence,
    softmax_confidence,
)

SCHEME = NNUNET_SCHEME


@dataclass(frozen=True)
class NnunetGeometry:
    """What export needs to undo preprocessing: the crop box and original spacing, both transposed."""

    box: CropBox
    spacing: tuple[float, float, float]

    @property
    def cropped_shape(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in zip(self.box.lo, self.box.hi))


def normalize_nnunet(
    image: np.ndarray, channel: NnunetChannel, mask: np.ndarray, valid: np.ndarray | None = None
) -> np.ndarray:
    """One channel, float32, as nnU-Net's scheme classes compute it (``mask`` = filled non-zero region).

    ``valid`` marks the voxels the statistics may use (see :func:`split_nonfinite`); None means all.
    """
    image = image.astype(np.float32)
    valid = np.ones(image.shape, dtype=bool) if valid is None else valid
    scheme = channel.scheme
    if scheme == "CTNormalization":
        props = channel.intensity
        clipped = np.clip(image, props["percentile_00_5"], props["percentile_99_5"])
        return (clipped - props["mean"]) / max(props["std"], 1e-8)
    if scheme == "ZScoreNormalization":
        if channel.use_mask:
            inside = image[mask]
            sample = inside[valid[mask]]
            image[mask] = (inside - sample.mean()) / max(sample.std(), 1e-8)
            return image
        sample = image[valid]
        return (image - sample.mean()) / max(sample.std(), 1e-8)
    if scheme == "NoNormalization":
        return image
    if scheme == "RescaleTo01Normalization":
        shifted = image - image[valid].min()
        return shifted / np.clip(shifted[valid].max(), 1e-8, None)
    if scheme == "RGBTo01Normalization":
        if image.min() < 0 or image.max() > 255:
            raise InputImageError(
                "This model expects 8-bit RGB-like intensities (0-255) but the image has values from "
                f"{image.min():g} to {image.max():g}."
            )
        return image / 255.0
    raise InputImageError(
        f"Normalisation scheme {scheme!r} is not supported; supported: {', '.join(NNUNET_NORMALIZATIONS)}."
    )


def nnunet_target_shape(
    shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]
) -> tuple[int, ...]:
    """Grid size after resampling to ``target`` spacing: ``round(shape · spacing / target)`` per axis."""
    return tuple(int(round(p / t * n)) for p, t, n in zip(spacing, target, shape))


def _lowres_axes(spacing: Sequence[float]) -> list[int]:
    largest = max(spacing)
    return [i for i, s in enumerate(spacing) if largest / s == 1]


def separate_z_axis(current: Sequence[float], new: Sequence[float], spec: NnunetResampling) -> int | None:
    """The axis resampled separately (order_z) or None, decided as nnU-Net does.

    A grid counts as anisotropic when max/min spacing exceeds the threshold (3); the current grid is
    asked first, then the target. The axis is the one with the largest spacing; when two or three
    axes share it nothing is done separately.
    """
    if spec.force_separate_z is not None:
        axes = _lowres_axes(current) if spec.force_separate_z else []
    elif max(current) / min(current) > spec.anisotropy_threshold:
        axes = _lowres_axes(current)
    elif max(new) / min(new) > spec.anisotropy_threshold:
        axes = _lowres_axes(new)
    else:
        axes = []
    return axes[0] if len(axes) == 1 else None


def _resize(image: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """scikit-image ``resize(mode="edge", anti_aliasing=False)`` as nnU-Net calls it, with scipy only.

    Grid-mode spline zoom with edge extension, then clipped to the input's value range.
    """
    zoom = [1.0 / (i / o) for i, o in zip(image.shape, shape)]
    out = ndimage.zoom(image, zoom, order=order, mode="nearest", grid_mode=True)
    return np.clip(out, image.min(), image.max(), out=out)


def _resample_along(volume: np.ndarray, axis: int, size: int, order: int) -> np.ndarray:
    """Across-slice step of nnU-Net's separate-z resampling: samples at ``scale·(i + 0.5) − 0.5``.

    nnU-Net evaluates ``map_coordinates`` on the whole volume with identity coordinates on the
    other axes; evaluating plane by plane gives the same values with far less coordinate memory.
    """
    moved = np.moveaxis(volume, axis, 0)
    rows = volume.shape[axis] / size * (np.arange(size) + 0.5) - 0.5
    grid_rows, grid_cols = np.meshgrid(rows, np.arange(moved.shape[2]), indexing="ij")
    out = np.empty((size, *moved.shape[1:]), dtype=np.float64)
    for j in range(moved.shape[1]):
        out[:, j, :] = ndimage.map_coordinates(
            moved[:, j, :], [grid_rows, grid_cols], order=order, mode="nearest"
        )
    return np.moveaxis(out, 0, axis)


def _resample_volume(
    volume: np.ndarray, shape: tuple[int, ...], axis: int | None, spec: NnunetResampling
) -> np.ndarray:
    if axis is None:
        return _resize(volume, shape, spec.order)
    in_plane = tuple(s for i, s in enumerate(shape) if i != axis)
    slices = [_resize(plane, in_plane, spec.order) for plane in np.moveaxis(volume, axis, 0)]
    stacked = np.stack(slices, axis=axis)
    if volume.shape[axis] == shape[axis]:
        return stacked
    return _resample_along(stacked, axis, shape[axis], spec.order_z)


def resample_to_shape(
    data: np.ndarray,
    shape: Sequence[int],
    current_spacing: Sequence[float],
    new_spacing: Sequence[float],
    spec: NnunetResampling,
) -> np.ndarray:
    """nnU-Net's ``resample_data_or_seg_to_shape`` for images or logits (C, ...); keeps the dtype."""
    shape = tuple(int(s) for s in shape)
    if tuple(data.shape[1:]) == shape:
        return data
    axis = separate_z_axis(current_spacing, new_spacing, spec)
    out = np.empty((data.shape[0], *shape), dtype=data.dtype)
    for c in range(data.shape[0]):
        out[c] = _resample_volume(data[c].astype(np.float64), shape, axis, spec)
    return out


def preprocess_nnunet(
    data: np.ndarray, spacing: Sequence[float], settings: NnunetSettings
) -> tuple[np.ndarray, NnunetGeometry]:
    """nnU-Net's DefaultPreprocessor on a (C, z, y, x) SimpleITK-ordered array with (z, y, x) spacing.

    Order as nnU-Net: transpose, crop to the filled non-zero union, normalise each channel
    (z-score optionally inside that region), then resample to the target spacing.
    """
    if data.shape[0] != len(settings.channels):
        raise InputImageError(f"The model expects {len(settings.channels)} channels, got {data.shape[0]}.")
    data, finite = split_nonfinite(np.transpose(data, (0, *(a + 1 for a in settings.transpose_forward))))
    spacing_t = tuple(float(spacing[a]) for a in settings.transpose_forward)
    mask = nonzero_mask(data)
    box = box_of_mask(mask)
    crop = (slice(None), *box.slices)
    cropped = data[crop]
    valid = None if finite is None else finite[crop]
    mask = mask[box.slices]
    normalised = np.stack([
        normalize_nnunet(cropped[c], ch, mask, None if valid is None else valid[c])
        for c, ch in enumerate(settings.channels)
    ])
    shape = nnunet_target_shape(normalised.shape[1:], spacing_t, settings.spacing)
    resampled = resample_to_shape(normalised, shape, spacing_t, settings.spacing, settings.data_resampling)
    return np.ascontiguousarray(resampled, dtype=np.float32), NnunetGeometry(box, spacing_t)  # type: ignore[arg-type]


def nnunet_export(
    logits: np.ndarray, geometry: NnunetGeometry, settings: NnunetSettings, label_values: Sequence[int]
) -> np.ndarray:
    """Network logits (K, ...) on the preprocessed grid → label map on the input's SimpleITK array grid.

    As nnU-Net's export: resample the logits to the cropped original grid with the plans'
    probability resampling, then softmax-argmax (class ``k`` → ``label_values[k]``) or, for region
    models, sigmoid > 0.5 per region painted in channel order (region ``k`` → ``label_values[k + 1]``),
    paste into the uncropped grid and transpose back.
    """
    return nnunet_restore(logits, geometry, settings, label_values, confidence=False).labels


def nnunet_restore(
    logits: np.ndarray,
    geometry: NnunetGeometry,
    settings: NnunetSettings,
    label_values: Sequence[int],
    confidence: bool,
) -> Restored:
    """:func:`nnunet_export`, and with ``confidence`` the confidence of the same prediction.

    The confidence is computed from the resampled logits the labels come from, i.e. from the
    probabilities nnU-Net's export returns (it resamples logits, then applies softmax or sigmoid);
    outside the crop box nnU-Net's probabilities are certain background, so confidence 1 there.
    """
    resampled = resample_to_shape(
        logits, geometry.cropped_shape, settings.spacing, geometry.spacing, settings.probabilities_resampling
    )
    labels = _uncrop(_labels_of(resampled, settings.regions, label_values), geometry, settings, fill=0)
    if not confidence:
        return Restored(labels, None)
    measure = regions_confidence if settings.regions else softmax_confidence
    return Restored(labels, _uncrop(measure(resampled), geometry, settings, fill=OUTSIDE_CROP_CONFIDENCE))


def _labels_of(resampled: np.ndarray, regions: bool, label_values: Sequence[int]) -> np.ndarray:
    """Softmax-argmax, or sigmoid > 0.5 per region painted in channel order."""
    values = np.asarray(label_values, dtype=np.uint8)
    if not regions:
        return values[resampled.argmax(0)]
    labels = np.zeros(resampled.shape[1:], dtype=np.uint8)
    for k in range(resampled.shape[0]):
        labels[resampled[k] > 0] = values[k + 1]  # sigmoid(x) > 0.5 exactly when x > 0
    return labels


def _uncrop(cropped: np.ndarray, geometry: NnunetGeometry, settings: NnunetSettings, fill: int) -> np.ndarray:
    """Paste into the uncropped grid (``fill`` elsewhere) and undo ``transpose_forward``."""
    return np.transpose(geometry.box.paste(cropped, fill), settings.transpose_backward)


def prepare(data: np.ndarray, reference: sitk.Image, card: ModelCard, weights: Weights = None,
            folds: Folds = None) -> tuple[np.ndarray, Restore]:
    """nnU-Net's preprocessing from the result folder's plans; the returned function is nnU-Net's export."""
    settings = model_for_card(card, weights, folds).settings
    net_input, geometry = preprocess_nnunet(data, reference.GetSpacing()[::-1], settings)

    def restore(logits: np.ndarray, confidence: bool) -> Restored:
        return nnunet_restore(logits, geometry, settings, card.label_values, confidence)

    return net_input, restore


def load(card: ModelCard, weights: Weights = None, folds: Folds = None) -> nn.Module:
    """The fold ensemble of the result folder (``weights`` may name another folder, ``folds`` others)."""
    return load_ensemble(model_for_card(card, weights, folds))


RECIPE = Recipe(scheme=SCHEME, tiling="nnunet", prepare=prepare, load=load)

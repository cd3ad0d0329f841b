"""Preprocessing as the official pipelines do it, and its inverse for the prediction.

SegMamba (MODELS.md §2.8): crop to the union of non-zero voxels over channels (holes filled),
then z-score each channel over the whole crop, zeros included, with the population std. The
crop box is returned so the prediction can be pasted back into the full grid.

MambaClinix runs inside nnU-Net v2, so its inputs go through nnU-Net's own plans-driven steps
(MODELS.md §4.7): ``transpose_forward``, the same crop, per-channel normalisation schemes, and
resampling to the configuration's spacing (``resample_data_or_seg_to_shape``: spline order 3
in-plane, order 0 across slices when the grid is anisotropic). :func:`nnunet_export` undoes them
for the logits: resample back (order 1), argmax or region thresholds, paste, transpose back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from ..errors import InputImageError
from ..models.cards import Preprocessing


@dataclass(frozen=True)
class CropBox:
    """Half-open voxel box ``[lo, hi)`` per array axis, and the full shape it came from."""

    lo: tuple[int, ...]
    hi: tuple[int, ...]
    full_shape: tuple[int, ...]

    @property
    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in zip(self.lo, self.hi))

    def paste(self, cropped: np.ndarray, fill: int = 0) -> np.ndarray:
        """Place a cropped array back into a full-size array filled with ``fill``."""
        out = np.full(self.full_shape, fill, dtype=cropped.dtype)
        out[self.slices] = cropped
        return out


def nonzero_mask(data: np.ndarray, fill_holes: bool = True) -> np.ndarray:
    """Union of non-zero voxels over the channels of a (C, z, y, x) array, enclosed holes filled."""
    mask = np.any(data != 0, axis=0)
    return ndimage.binary_fill_holes(mask) if fill_holes else mask


def box_of_mask(mask: np.ndarray) -> CropBox:
    """Tightest half-open box around the true voxels of ``mask``."""
    if not mask.any():
        raise InputImageError("All input images are zero everywhere; there is nothing to segment.")
    coords = np.nonzero(mask)
    lo = tuple(int(c.min()) for c in coords)
    hi = tuple(int(c.max()) + 1 for c in coords)
    return CropBox(lo=lo, hi=hi, full_shape=mask.shape)


def nonzero_box(data: np.ndarray, fill_holes: bool = True) -> CropBox:
    """Bounding box of the union of non-zero voxels over channels of a (C, z, y, x) array."""
    return box_of_mask(nonzero_mask(data, fill_holes))


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


def split_nonfinite(data: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """``data`` with NaN/Inf voxels set to 0, and the mask of finite voxels (None when all are finite).

    Zeroed voxels count as background for the crop box (as any zero does) and are left out of the
    normalisation statistics through the mask, so no NaN ever reaches the network.
    """
    finite = np.isfinite(data)
    if finite.all():
        return data, None
    return np.where(finite, data, np.float32(0)).astype(data.dtype, copy=False), finite


def preprocess(data: np.ndarray, settings: Preprocessing) -> tuple[np.ndarray, CropBox]:
    """Apply the card's preprocessing to a (C, z, y, x) array; return the network input and crop box."""
    if settings.scheme != "crop_nonzero_zscore":
        raise InputImageError(f"Preprocessing scheme {settings.scheme!r} is not supported by this version.")
    data, finite = split_nonfinite(data)
    if settings.crop_nonzero:
        box = nonzero_box(data, settings.fill_holes)
    else:
        box = CropBox(lo=(0, 0, 0), hi=tuple(data.shape[1:]), full_shape=tuple(data.shape[1:]))
    crop = (slice(None), *box.slices)
    return zscore(data[crop], settings.eps, None if finite is None else finite[crop]), box


def channel_warnings(array: np.ndarray, name: str) -> list[str]:
    """What is wrong with one channel's voxels (SimpleITK (z, y, x) order), for the user to read.

    Non-finite voxels are counted and located (voxel indices i, j, k as Slicer shows them); a channel
    without contrast (zero or one value everywhere) carries no information for the network.
    """
    messages = []
    finite = np.isfinite(array)
    bad = int(finite.size - np.count_nonzero(finite))
    if bad:
        where = np.nonzero(~finite)
        lo = tuple(int(where[a].min()) for a in (2, 1, 0))
        hi = tuple(int(where[a].max()) for a in (2, 1, 0))
        messages.append(
            f"{bad} voxel{'s' if bad != 1 else ''} of the {name} image ({100.0 * bad / finite.size:.2g}%) "
            f"{'are' if bad != 1 else 'is'} not a number (NaN or infinite), between voxel (i, j, k) {lo} and "
            f"{hi}; treated as 0 (background) and left out of the intensity statistics."
        )
    values = array[finite]
    if values.size == 0 or values.min() == values.max():
        level = 0.0 if values.size == 0 else float(values.flat[0])
        what = "zero everywhere" if level == 0.0 else f"the same value ({level:g}) everywhere"
        messages.append(
            f"The {name} image is {what}: the model gets no information from it, so the result is "
            "unreliable. Check that the right image was chosen for this input."
        )
    return messages


def check_contrast(data: np.ndarray) -> None:
    """Refuse a case in which no channel has any contrast (all zero or each constant): nothing to segment."""
    for channel in data:
        finite = channel[np.isfinite(channel)]
        if finite.size and finite.min() != finite.max():
            return
    if not np.any(np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)):
        raise InputImageError("All input images are zero everywhere; there is nothing to segment.")
    raise InputImageError(
        "Every input image has one value everywhere (no contrast); there is nothing to segment. "
        "Check that the right images were chosen."
    )


# ---------------------------------------------------------------- nnU-Net v2 (MambaClinix)

#: Preprocessing scheme of cards that run through nnU-Net's own pre- and post-processing.
NNUNET_SCHEME = "nnunet"

#: Normalisation schemes of nnU-Net v2's default_normalization_schemes, by their plans.json names.
NNUNET_NORMALIZATIONS = (
    "CTNormalization",
    "ZScoreNormalization",
    "NoNormalization",
    "RescaleTo01Normalization",
    "RGBTo01Normalization",
)


@dataclass(frozen=True)
class NnunetResampling:
    """The plans' keyword arguments of ``resample_data_or_seg_to_shape`` (data or probabilities)."""

    order: int = 3
    order_z: int = 0
    force_separate_z: bool | None = None
    anisotropy_threshold: float = 3.0


@dataclass(frozen=True)
class NnunetChannel:
    """How one input channel is normalised: scheme name, mask use, dataset foreground statistics."""

    scheme: str
    use_mask: bool = False
    intensity: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class NnunetSettings:
    """Everything nnU-Net's preprocessing and export read from plans.json for one configuration.

    ``spacing`` is the configuration's target spacing in transposed axis order; with ``regions``
    the network outputs one sigmoid channel per region instead of softmax classes.
    """

    transpose_forward: tuple[int, int, int]
    spacing: tuple[float, float, float]
    channels: tuple[NnunetChannel, ...]
    data_resampling: NnunetResampling = NnunetResampling()
    probabilities_resampling: NnunetResampling = NnunetResampling(order=1)
    regions: bool = False

    @property
    def transpose_backward(self) -> tuple[int, ...]:
        return tuple(int(i) for i in np.argsort(self.transpose_forward))


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
    resampled = resample_to_shape(
        logits, geometry.cropped_shape, settings.spacing, geometry.spacing, settings.probabilities_resampling
    )
    values = np.asarray(label_values, dtype=np.uint8)
    if settings.regions:
        labels = np.zeros(resampled.shape[1:], dtype=np.uint8)
        for k in range(resampled.shape[0]):
            labels[resampled[k] > 0] = values[k + 1]  # sigmoid(x) > 0.5 exactly when x > 0
    else:
        labels = values[resampled.argmax(0)]
    return np.transpose(geometry.box.paste(labels), settings.transpose_backward)

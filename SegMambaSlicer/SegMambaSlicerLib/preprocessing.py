"""Intensity preprocessing as the official BraTS pipelines do it (MODELS.md §2.8).

Crop to the union of non-zero voxels over channels (holes filled), then z-score each
channel over the whole crop, zeros included, with the population std. The crop box is
returned so the prediction can be pasted back into the full grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .cards import Preprocessing
from .errors import InputImageError


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


def nonzero_box(data: np.ndarray, fill_holes: bool = True) -> CropBox:
    """Bounding box of the union of non-zero voxels over channels of a (C, z, y, x) array."""
    mask = np.any(data != 0, axis=0)
    if fill_holes:
        mask = ndimage.binary_fill_holes(mask)
    if not mask.any():
        raise InputImageError("All input images are zero everywhere; there is nothing to segment.")
    coords = np.nonzero(mask)
    lo = tuple(int(c.min()) for c in coords)
    hi = tuple(int(c.max()) + 1 for c in coords)
    return CropBox(lo=lo, hi=hi, full_shape=mask.shape)


def zscore(data: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """Per-channel ``(x - mean) / max(std, eps)`` over all voxels, float32 as the official code."""
    data = data.astype(np.float32, copy=False)
    out = np.empty_like(data)
    for c in range(data.shape[0]):
        mean = data[c].mean(dtype=np.float64)
        std = data[c].std(dtype=np.float64)
        out[c] = (data[c] - np.float32(mean)) / np.float32(max(std, eps))
    return out


def preprocess(data: np.ndarray, settings: Preprocessing) -> tuple[np.ndarray, CropBox]:
    """Apply the card's preprocessing to a (C, z, y, x) array; return the network input and crop box."""
    if settings.scheme != "crop_nonzero_zscore":
        raise InputImageError(f"Preprocessing scheme {settings.scheme!r} is not supported by this version.")
    if settings.crop_nonzero:
        box = nonzero_box(data, settings.fill_holes)
    else:
        box = CropBox(lo=(0, 0, 0), hi=tuple(data.shape[1:]), full_shape=tuple(data.shape[1:]))
    cropped = data[(slice(None), *box.slices)]
    return zscore(cropped, settings.eps), box

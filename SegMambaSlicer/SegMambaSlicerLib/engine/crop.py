"""The crop to the image's content that both recipes start with, and pasting results back.

Both official pipelines crop to the union of non-zero voxels over the channels, with enclosed holes
filled (SegMamba, and nnU-Net's ``crop_to_nonzero``), and paste the prediction back into the full grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..errors import InputImageError


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

"""Voxel-grid geometry: exact reorientation to the network's axis order and physical resampling.

The network was trained on arrays whose axes follow one anatomical orientation (BraTS:
SimpleITK arrays with identity direction, i.e. i→L, j→P, k→S). Inputs are brought to that
order by *axis permutation and flips only*, which are exactly invertible, so the label map
lands on the input's own voxel grid without interpolation. Extra channels on other grids
are resampled physically onto the first channel's grid.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from ..errors import InputImageError, ModelCardError


class OrientationCodeError(ModelCardError, ValueError):
    """An orientation code is not three letters naming each anatomical axis once (LPS, RAS, ...)."""


#: World axis (LPS: 0 = x toward Left, 1 = y toward Posterior, 2 = z toward Superior) and sign per letter.
_ORIENTATION_LETTERS = {"L": (0, 1), "R": (0, -1), "P": (1, 1), "A": (1, -1), "S": (2, 1), "I": (2, -1)}


def orientation_axes(code: str) -> tuple[tuple[int, int], ...]:
    """(world axis, sign) of each index axis of an orientation code such as LPS (DICOM letters).

    Raises :class:`OrientationCodeError` (a ``ValueError``) unless the code has three letters naming each world axis once.
    """
    letters = code.upper()
    if (len(letters) != 3 or any(c not in _ORIENTATION_LETTERS for c in letters)
            or len({_ORIENTATION_LETTERS[c][0] for c in letters}) != 3):
        raise OrientationCodeError(f"Invalid orientation code {code!r}; use three letters like LPS or RAS.")
    return tuple(_ORIENTATION_LETTERS[c] for c in letters)


@dataclass(frozen=True)
class AxisReorder:
    """Permutation + flips that take an ITK-index-ordered array (i, j, k) to a target orientation.

    ``source_axis[t]`` is the input index axis that becomes target index axis ``t``;
    ``flip[t]`` says whether it is reversed.
    """

    source_axis: tuple[int, int, int]
    flip: tuple[bool, bool, bool]

    def forward(self, array_zyx: np.ndarray) -> np.ndarray:
        """Reorder a (..., k, j, i) numpy array (SimpleITK order) into the target orientation."""
        return self._apply(array_zyx, inverse=False)

    def inverse(self, array_zyx: np.ndarray) -> np.ndarray:
        """Undo :meth:`forward` exactly."""
        return self._apply(array_zyx, inverse=True)

    def _apply(self, array: np.ndarray, inverse: bool) -> np.ndarray:
        lead = array.ndim - 3
        # numpy axis of ITK index axis a is lead + (2 - a)
        np_axis = [lead + 2 - a for a in range(3)]
        if not inverse:
            # target numpy axis (lead + 2 - t) takes source ITK axis source_axis[t]
            order = list(range(lead)) + [np_axis[self.source_axis[t]] for t in (2, 1, 0)]
            out = np.transpose(array, order)
            flips = [lead + 2 - t for t in range(3) if self.flip[t]]
            return np.flip(out, axis=flips) if flips else out
        flips = [lead + 2 - t for t in range(3) if self.flip[t]]
        array = np.flip(array, axis=flips) if flips else array
        inv = [0, 0, 0]
        for t, a in enumerate(self.source_axis):
            inv[a] = t
        order = list(range(lead)) + [lead + 2 - inv[a] for a in (2, 1, 0)]
        return np.transpose(array, order)


def direction_matrix(image: sitk.Image) -> np.ndarray:
    """3x3 direction matrix whose column c is the LPS world direction of index axis c."""
    return np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)


def reorder_to(direction: np.ndarray, orientation: str = "LPS") -> AxisReorder:
    """Axis permutation/flips bringing a grid with ``direction`` closest to ``orientation``.

    ``orientation`` names where each target index axis points (DICOM convention, e.g.
    "LPS" = identity direction in SimpleITK). For oblique grids the closest axis-aligned
    order is chosen by maximising the summed |cosines| over all 6 permutations, so ties and
    45° cases are resolved deterministically.
    """
    targets = orientation_axes(orientation)
    best = max(
        itertools.permutations(range(3)),
        key=lambda perm: sum(abs(direction[w, perm[t]]) for t, (w, _) in enumerate(targets)),
    )
    flips = tuple(bool(np.sign(direction[w, best[t]]) != s) for t, (w, s) in enumerate(targets))
    return AxisReorder(source_axis=tuple(best), flip=flips)  # type: ignore[arg-type]


def same_grid(a: sitk.Image | sitk.ImageFileReader, b: sitk.Image | sitk.ImageFileReader, tol: float = 1e-4) -> bool:
    """True when two grids share size, spacing, origin and direction (within ``tol``).

    Either may be a reader after ``ReadImageInformation()``, so a file's grid is compared from its header.
    """
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol)
    )


def _world_bounds(image: sitk.Image) -> np.ndarray:
    """Axis-aligned world bounding box (2x3) of the voxel-centre corners of an image."""
    size = image.GetSize()
    corners = [
        image.TransformContinuousIndexToPhysicalPoint([float(c) for c in corner])
        for corner in itertools.product(*[(0, s - 1) for s in size])
    ]
    pts = np.asarray(corners)
    half = 0.5 * np.abs(direction_matrix(image) * np.asarray(image.GetSpacing())).sum(axis=1)
    return np.stack([pts.min(axis=0) - half, pts.max(axis=0) + half])


def overlap_fraction(image: sitk.Image, reference: sitk.Image) -> float:
    """Fraction of the reference's world bounding box covered by the image's bounding box."""
    a, b = _world_bounds(image), _world_bounds(reference)
    inter = np.clip(np.minimum(a[1], b[1]) - np.maximum(a[0], b[0]), 0.0, None)
    ref_extent = np.maximum(b[1] - b[0], 1e-9)
    return float(np.prod(inter / ref_extent))


def resample_onto(image: sitk.Image, reference: sitk.Image, name: str = "input") -> sitk.Image:
    """Resample ``image`` physically (linear, zero outside) onto ``reference``'s grid.

    Images already on the grid are returned unchanged (no interpolation). Images that do
    not overlap the reference at all are refused: that almost always means a wrong file.
    """
    if same_grid(image, reference):
        return image
    fraction = overlap_fraction(image, reference)
    if fraction <= 0.0:
        raise InputImageError(
            f"The {name} image does not overlap the first input image in space. Check that all inputs "
            "are from the same patient and study and were not moved by a transform."
        )
    return sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def stack_channels(images: Sequence[sitk.Image]) -> np.ndarray:
    """Stack images (already on one grid) into a float32 (C, z, y, x) array."""
    return np.stack([sitk.GetArrayViewFromImage(img).astype(np.float32, copy=False) for img in images])

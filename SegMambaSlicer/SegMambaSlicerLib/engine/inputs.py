"""What is checked about the input voxels before any recipe sees them.

Non-finite voxels (NaN, infinity) are set to 0 and masked out of the intensity statistics, so they can
neither reach the network nor turn a whole case into background; channels without contrast are told to
the user by name, and a case without any contrast is refused (docs/user-guide.md, "What happens when").
"""

from __future__ import annotations

import numpy as np

from ..errors import InputImageError


def split_nonfinite(data: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """``data`` with NaN/Inf voxels set to 0, and the mask of finite voxels (None when all are finite).

    Zeroed voxels count as background for the crop box (as any zero does) and are left out of the
    normalisation statistics through the mask, so no NaN ever reaches the network.
    """
    finite = np.isfinite(data)
    if finite.all():
        return data, None
    return np.where(finite, data, np.float32(0)).astype(data.dtype, copy=False), finite


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

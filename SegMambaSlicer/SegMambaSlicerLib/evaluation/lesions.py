"""Lesions of a label map and their measurements, in physical space (mL, mm, RAS), and change from a prior.

Follow-up of brain tumours is read as lesion counts, volumes and bidimensional products (RANO), so these
are computed here from the label map and its geometry alone; anisotropic, rotated and thick-slice grids
are handled by doing every measurement with the image's spacing and direction. Conventions:

* Regions are the model card's derived regions (BraTS: TC, WT, ET); a card without regions measures each
  label as its own region. Lesions are the 26-connected components (in voxel index space) of a region's
  mask. Components smaller than ``min_volume_ml`` (mL, so that the threshold means the same on every grid)
  are not lesions; region volumes always count every voxel, so they match the volumes CSV.
* Volume = voxel count × voxel volume. Centroid = mean of the voxel centres, in RAS (SimpleITK points are
  LPS: x and y negated).
* Axial slices are the image's own slices across the index axis whose direction is closest to LPS z
  (no resampling). Diameters are distances between voxel centres, in mm through spacing and direction:
  the longest diameter of a slice is the largest distance between two voxel centres of the lesion's
  cross-section; the perpendicular diameter is the extent of that cross-section (its voxel centres
  projected) along the in-plane direction perpendicular to the longest diameter. The slice used is the one
  with the longest longest-diameter; ties (within 1 µm, common on symmetric shapes) go to the larger
  perpendicular. A lesion is measurable when both diameters are at least 10 mm (RANO), and the sum of
  products counts measurable lesions only. Between-centre distances are up to one voxel shorter than the
  lesion's outer extent; a single voxel measures 0 × 0 mm.
* The enhancing region, whose products are compared with the prior's, is the region whose labels are
  exactly the enhancing label: the card label abbreviated ``ET`` or named ``Enhancing …``. A card without
  one has no sums of products to compare (null).
* A change in percent is ``100 × (now − prior) / prior``; it is undefined (None, JSON null) when the prior
  value is 0, including 0 → 0.
* A prior label map on another grid of the same patient space is resampled onto the current grid with
  nearest neighbour; nothing is registered, so a prior from another scanner frame must be registered first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk

from ..errors import SegMambaError
from ..io.geometry import direction_matrix, overlap_fraction, same_grid
from ..models.cards import ModelCard
from .metrics import Group, groups_for_card, label_array

#: Both axial diameters of a measurable lesion are at least this long (RANO).
MEASURABLE_MM = 10.0
#: Distances that differ by less than this (mm) are equal: rounding must not flip ties or measurability.
_TOLERANCE_MM = 1e-6


class LesionError(SegMambaError):
    """A label map cannot be measured: values its model card does not define, or a prior outside its space."""


@dataclass(frozen=True)
class Lesion:
    """One connected component of a region, measured in physical space."""

    region: str
    volume_ml: float
    centroid_ras: tuple[float, float, float]
    axial_diameters_mm: tuple[float, float]

    @property
    def product_mm2(self) -> float:
        return self.axial_diameters_mm[0] * self.axial_diameters_mm[1]

    @property
    def measurable(self) -> bool:
        return min(self.axial_diameters_mm) >= MEASURABLE_MM - _TOLERANCE_MM


@dataclass(frozen=True)
class RegionMeasurement:
    """A region's whole volume and its lesions, largest first."""

    name: str
    volume_ml: float
    lesions: tuple[Lesion, ...]

    @property
    def sum_of_products_mm2(self) -> float:
        return sum(lesion.product_mm2 for lesion in self.lesions if lesion.measurable)


@dataclass(frozen=True)
class Measurement:
    """Every region of one label map, in the card's order, and which of them is the enhancing one."""

    regions: tuple[RegionMeasurement, ...]
    enhancing_region: str | None

    @property
    def lesions(self) -> tuple[Lesion, ...]:
        return tuple(lesion for region in self.regions for lesion in region.lesions)

    def sum_of_products_mm2(self) -> float | None:
        """The enhancing region's sum of products, None when the card has no enhancing region."""
        region = next((r for r in self.regions if r.name == self.enhancing_region), None)
        return None if region is None else region.sum_of_products_mm2


@dataclass(frozen=True)
class RegionChange:
    """One region's volume now and in the prior (the prior measured on the current grid)."""

    name: str
    volume_ml: float
    prior_volume_ml: float

    @property
    def volume_change_pct(self) -> float | None:
        return percent_change(self.volume_ml, self.prior_volume_ml)


@dataclass(frozen=True)
class Change:
    """Current against prior: region volumes, and the enhancing region's sum of products."""

    regions: tuple[RegionChange, ...]
    sum_of_products_mm2: float | None
    prior_sum_of_products_mm2: float | None

    @property
    def product_change_pct(self) -> float | None:
        if self.sum_of_products_mm2 is None or self.prior_sum_of_products_mm2 is None:
            return None
        return percent_change(self.sum_of_products_mm2, self.prior_sum_of_products_mm2)


def percent_change(now: float, prior: float) -> float | None:
    """``100 × (now − prior) / prior``; None when the prior is 0, where no percentage exists."""
    return None if prior == 0 else 100.0 * (now - prior) / prior


# ---------------------------------------------------------------- what to measure


def measured_regions(card: ModelCard) -> tuple[Group, ...]:
    """The card's regions, or each label as a region when the card defines none (many nnU-Net models)."""
    groups = groups_for_card(card)
    regions = tuple(g for g in groups if g.kind == "region")
    return regions or groups


def _is_enhancing(abbreviation: str, name: str) -> bool:
    return abbreviation.upper() == "ET" or name.lower().startswith("enhancing")


def enhancing_region(card: ModelCard, regions: Sequence[Group]) -> str | None:
    """The region whose labels are exactly the card's enhancing label (see the module doc), or None."""
    enhancing = [label.value for label in card.labels if _is_enhancing(label.abbreviation, label.name)]
    return next((r.name for r in regions if len(enhancing) == 1 and r.values == tuple(enhancing)), None)


def checked_labels(image: sitk.Image, card: ModelCard, name: str) -> np.ndarray:
    """The label map's values (z, y, x); each must be one the card defines, or the regions would be wrong.

    ``name`` starts the error messages, e.g. "The label map scan.nii.gz".
    """
    array = label_array(image, name)
    unknown = sorted(set(np.unique(array).tolist()) - set(card.label_values))
    if unknown:
        raise LesionError(
            f"{name} holds the values {', '.join(map(str, unknown))}, which the model {card.id} does not "
            f"define (it defines {', '.join(map(str, card.label_values))}); choose the model whose labels "
            "it uses with --model."
        )
    return array


def prior_on_grid(prior: sitk.Image, current: sitk.Image, name: str = "The prior label map") -> sitk.Image:
    """The prior on the current grid by nearest neighbour (labels stay labels); no registration is done.

    A prior that does not overlap the current image in space is refused: it is another patient, or a
    frame that must be registered first.
    """
    if same_grid(prior, current):
        return prior
    if overlap_fraction(prior, current) <= 0.0:
        raise LesionError(
            f"{name} does not overlap the current label map in space; give a prior of the same patient "
            "in the same space (register it to the current scan first)."
        )
    return sitk.Resample(prior, current, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0, prior.GetPixelID())


# ---------------------------------------------------------------- geometry of one lesion


def axial_axis(image: sitk.Image) -> int:
    """The index axis (SimpleITK order) whose direction is closest to LPS z: the image's own axial slices."""
    return int(np.argmax(np.abs(direction_matrix(image)[2])))


def _row_extremes(points: np.ndarray, row: int, column: int) -> np.ndarray:
    """The first and last point of each row: every other point lies between two of them on its row, so
    distances and extents of the cross-section are decided by these alone."""
    ordered = points[np.lexsort((points[:, column], points[:, row]))]
    rows = ordered[:, row]
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
    ends = np.r_[starts[1:] - 1, len(rows) - 1]
    return ordered[np.union1d(starts, ends)]


def _slice_diameters(physical: np.ndarray, normal: np.ndarray) -> tuple[float, float]:
    """Longest diameter of one cross-section's voxel centres and the largest extent perpendicular to it."""
    distances = np.linalg.norm(physical[:, None, :] - physical[None, :, :], axis=-1)
    longest = float(distances.max())
    if longest == 0.0:
        return 0.0, 0.0
    widths = []
    for a, b in np.argwhere(np.triu(distances >= longest - _TOLERANCE_MM, k=1)):
        across = np.cross(normal, physical[b] - physical[a])
        projected = physical @ (across / np.linalg.norm(across))
        widths.append(float(projected.max() - projected.min()))
    return longest, max(widths)


def axial_diameters(indices: np.ndarray, matrix: np.ndarray, axial: int) -> tuple[float, float]:
    """The two axial diameters (mm) of a lesion given as voxel indices (N, 3; SimpleITK order).

    ``matrix`` maps an index step to mm (direction × spacing, columns per index axis); ``axial`` is the
    slice axis from :func:`axial_axis`. See the module doc for the definitions.
    """
    row, column = (a for a in range(3) if a != axial)
    normal = np.cross(matrix[:, row], matrix[:, column])
    normal /= np.linalg.norm(normal)
    ordered = indices[np.argsort(indices[:, axial], kind="stable")]
    starts = np.flatnonzero(np.r_[True, np.diff(ordered[:, axial]) != 0])
    per_slice = [
        _slice_diameters(_row_extremes(points, row, column) @ matrix.T, normal)
        for points in np.split(ordered, starts[1:])
    ]
    longest = max(d for d, _ in per_slice)
    return max(((d, w) for d, w in per_slice if d >= longest - _TOLERANCE_MM), key=lambda dw: dw[1])


def _centroid_ras(image: sitk.Image, indices: np.ndarray) -> tuple[float, float, float]:
    x, y, z = image.TransformContinuousIndexToPhysicalPoint(indices.mean(axis=0).tolist())
    return (-x, -y, z)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """Voxel indices (N, 3; SimpleITK order) of each 26-connected component of a (z, y, x) mask."""
    from scipy import ndimage  # imported on use: the command line should start fast

    labelled, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    found = []
    for number, box in enumerate(ndimage.find_objects(labelled), start=1):
        offset = np.array([s.start for s in box])
        found.append((np.argwhere(labelled[box] == number) + offset)[:, ::-1])
    return found


def _lesions(image: sitk.Image, mask: np.ndarray, region: str, min_volume_ml: float) -> tuple[Lesion, ...]:
    voxel_ml = math.prod(image.GetSpacing()) / 1000.0
    matrix = direction_matrix(image) * np.asarray(image.GetSpacing())
    axial = axial_axis(image)
    lesions = [
        Lesion(region, len(indices) * voxel_ml, _centroid_ras(image, indices),
               axial_diameters(indices, matrix, axial))
        for indices in _components(mask)
        if len(indices) * voxel_ml >= min_volume_ml
    ]
    return tuple(sorted(lesions, key=lambda lesion: -lesion.volume_ml))


def measure(labelmap: sitk.Image, card: ModelCard, min_volume_ml: float = 0.0,
            name: str = "The label map") -> Measurement:
    """Regions, lesions and their diameters of a label map whose values ``card`` defines.

    ``name`` starts the error messages (see :func:`checked_labels`).
    """
    array = checked_labels(labelmap, card, name)
    voxel_ml = math.prod(labelmap.GetSpacing()) / 1000.0
    regions = measured_regions(card)
    measured = []
    for region in regions:
        mask = np.isin(array, region.values)
        measured.append(RegionMeasurement(region.name, int(np.count_nonzero(mask)) * voxel_ml,
                                          _lesions(labelmap, mask, region.name, min_volume_ml)))
    return Measurement(tuple(measured), enhancing_region(card, regions))


def compare(current: Measurement, prior: Measurement) -> Change:
    """Volumes per region and the enhancing sums of products, current against prior (one card for both)."""
    prior_volumes = {region.name: region.volume_ml for region in prior.regions}
    return Change(
        regions=tuple(RegionChange(r.name, r.volume_ml, prior_volumes[r.name]) for r in current.regions),
        sum_of_products_mm2=current.sum_of_products_mm2(),
        prior_sum_of_products_mm2=prior.sum_of_products_mm2(),
    )


# ---------------------------------------------------------------- the JSON contract


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def measurement_json(measurement: Measurement, change: Change | None = None) -> dict[str, Any]:
    """The ``measure`` command's JSON: ``regions``, ``lesions`` and, with a prior, ``change``.

    Volumes are rounded to 0.1 mm³ (4 decimals of mL), lengths and products to 0.01, percentages to 0.01.
    """
    data: dict[str, Any] = {
        "regions": [{"name": r.name, "volume_ml": round(r.volume_ml, 4)} for r in measurement.regions],
        "lesions": [
            {
                "region": lesion.region,
                "volume_ml": round(lesion.volume_ml, 4),
                "centroid_ras": [round(v, 2) for v in lesion.centroid_ras],
                "axial_diameters_mm": [round(v, 2) for v in lesion.axial_diameters_mm],
                "product_mm2": round(lesion.product_mm2, 2),
                "measurable": lesion.measurable,
            }
            for lesion in measurement.lesions
        ],
    }
    if change is not None:
        data["change"] = {
            "regions": [
                {
                    "name": r.name,
                    "volume_ml": round(r.volume_ml, 4),
                    "prior_volume_ml": round(r.prior_volume_ml, 4),
                    "volume_change_pct": _round(r.volume_change_pct, 2),
                }
                for r in change.regions
            ],
            "sum_of_products_mm2": _round(change.sum_of_products_mm2, 2),
            "prior_sum_of_products_mm2": _round(change.prior_sum_of_products_mm2, 2),
            "product_change_pct": _round(change.product_change_pct, 2),
        }
    return data

"""What the review panel shows beyond the volumes, decided without Slicer: where the model is unsure, and the
change against a prior scan with the RANO 2.0 thresholds it crosses.

Confidence: per label and region, the volume whose confidence (1 − normalised entropy, see
:mod:`..engine.recipes.base`) is below a threshold the user picks. The overlay in the slice views shows the same
voxels, so the table and the picture agree.

Change against a prior: the prior label map is taken onto the current grid and measured exactly as the
``measure`` command does (:mod:`..evaluation.lesions`: nearest-neighbour resampling without registration, a
prior outside the current image refused, the enhancing region's sum of products of measurable lesions).

RANO 2.0 (Wen et al., J Clin Oncol 2023;41:5187-5199, doi:10.1200/JCO.23.01059) sizes enhancing disease by
the sum of products of perpendicular diameters (SPD): a decrease of at least 50 % is the size criterion of a
partial response, an increase of at least 25 % that of progression, and the disappearance of all enhancing
disease that of a complete response; its optional volumetric analogues are a decrease of at least 65 % and an
increase of at least 40 % (a sphere's volume for those diameter changes: 0.5^1.5 ≈ 0.35, 1.25^1.5 ≈ 1.40).
These are shown as thresholds that a change crosses, never as a response category: RANO also compares
decreases with the baseline and increases with the smallest earlier measurement (here: one chosen prior),
needs confirmation on a later scan, and weighs non-enhancing disease, new lesions, corticosteroids and the
clinical state, none of which the software knows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

from ..engine.volumes import volumes_ml
from ..errors import InputImageError
from ..evaluation.lesions import checked_labels, compare, measure, percent_change, prior_on_grid
from ..io.geometry import same_grid
from ..models.cards import ModelCard

if TYPE_CHECKING:
    from ..engine.pipeline import SegmentationResult

#: Shown above the change: the software decides no response category.
RESEARCH_ONLY = "Change against the prior: research information — not a response assessment."
#: Shown when RANO's thresholds cannot be looked at.
NO_ENHANCING = "The model has no enhancing-tumor region, so the RANO 2.0 thresholds do not apply."
#: What a response assessment needs beyond these numbers (see the module doc).
RANO_CAVEAT = ("RANO 2.0 compares decreases with the baseline and increases with the smallest earlier "
               "measurement, needs confirmation on a later scan, and weighs non-enhancing disease, new lesions, "
               "corticosteroids and the clinical state; none of these is known here.")


# ---------------------------------------------------------------- confidence


def below_threshold_volumes(labelmap: sitk.Image, confidence: sitk.Image, card: ModelCard,
                            threshold: float) -> dict[str, float]:
    """mL per label and region name (as :func:`volumes_ml` keys them) of voxels with confidence < ``threshold``.

    A large share of a segment's volume below the threshold says its extent is uncertain, not only its rim.
    """
    if not same_grid(confidence, labelmap):
        raise InputImageError("The confidence map is not on the label map's grid; segment the case again.")
    unsure = np.where(sitk.GetArrayViewFromImage(confidence) < threshold, sitk.GetArrayViewFromImage(labelmap), 0)
    image = sitk.GetImageFromArray(unsure)
    image.CopyInformation(labelmap)
    return volumes_ml(image, card)


# ---------------------------------------------------------------- change against a prior and RANO 2.0


@dataclass(frozen=True)
class EnhancingChange:
    """The enhancing disease now and in the prior: the quantities RANO 2.0's thresholds are about."""

    sum_of_products_mm2: float
    prior_sum_of_products_mm2: float
    volume_ml: float
    prior_volume_ml: float

    def change_pct(self, quantity: str) -> float | None:
        """Percent change of "sum of products" or "volume"; None when the prior is 0."""
        if quantity == "sum of products":
            return percent_change(self.sum_of_products_mm2, self.prior_sum_of_products_mm2)
        return percent_change(self.volume_ml, self.prior_volume_ml)


@dataclass(frozen=True)
class RanoThreshold:
    """A size change RANO 2.0 names: an increase of at least ``change_pct`` (> 0) or a decrease (< 0)."""

    quantity: str  # "sum of products" | "volume"
    change_pct: float
    criterion_of: str

    def crossed_by(self, change_pct: float) -> bool:
        return change_pct >= self.change_pct if self.change_pct > 0 else change_pct <= self.change_pct


#: RANO 2.0's size thresholds for enhancing disease (see the module doc for the source).
RANO_2_THRESHOLDS: tuple[RanoThreshold, ...] = (
    RanoThreshold("sum of products", 25.0, "progression"),
    RanoThreshold("sum of products", -50.0, "a partial response"),
    RanoThreshold("volume", 40.0, "progression (volumetric)"),
    RanoThreshold("volume", -65.0, "a partial response (volumetric)"),
)


def rano_notes(enhancing: EnhancingChange | None) -> tuple[str, ...]:
    """The lines under the table: the RANO 2.0 thresholds the change crosses, framed as research information."""
    if enhancing is None:
        return RESEARCH_ONLY, NO_ENHANCING
    lines = []
    for threshold in RANO_2_THRESHOLDS:
        change = enhancing.change_pct(threshold.quantity)
        if change is not None and threshold.crossed_by(change):
            lines.append(f"Enhancing tumor {threshold.quantity} {change:+.1f} %: crosses the RANO 2.0 threshold "
                         f"of {threshold.change_pct:+.0f} % (the size criterion of {threshold.criterion_of}).")
    if enhancing.volume_ml == 0.0 < enhancing.prior_volume_ml:
        lines.append("No enhancing tumor now, some in the prior: the disappearance RANO 2.0 requires for a "
                     "complete response.")
    if enhancing.prior_sum_of_products_mm2 == 0.0 < enhancing.sum_of_products_mm2:
        lines.append("Measurable enhancing disease now, none measurable in the prior: RANO 2.0 counts a new "
                     "measurable enhancing lesion as progression (whether it is new needs reading).")
    if not lines:
        lines.append("The change crosses none of the RANO 2.0 thresholds (sum of products +25 % / −50 %, "
                     "volume +40 % / −65 %, disappearance).")
    return (RESEARCH_ONLY, *lines, RANO_CAVEAT)


@dataclass(frozen=True)
class PriorComparison:
    """The prior measured on the current grid: volumes per label and region name, and the enhancing disease."""

    prior_volumes_ml: Mapping[str, float]
    enhancing: EnhancingChange | None


def compare_with_prior(result: SegmentationResult, prior: sitk.Image, name: str) -> PriorComparison:
    """Measure ``prior`` (a label map with the card's values, any grid of the same space) against the result.

    ``name`` starts the error messages, e.g. "The prior 'scan 1 segmentation'". The prior's values are
    checked on its own grid, so values outside the current image cannot go unnoticed.
    """
    card = result.card
    checked_labels(prior, card, name)
    on_grid = prior_on_grid(prior, result.labelmap, name)
    now = measure(result.labelmap, card, name="The segmentation")
    change = compare(now, measure(on_grid, card, name=name))
    region = next((r for r in change.regions if r.name == now.enhancing_region), None)
    enhancing = None if region is None else EnhancingChange(
        change.sum_of_products_mm2, change.prior_sum_of_products_mm2, region.volume_ml, region.prior_volume_ml)
    return PriorComparison(volumes_ml(on_grid, card), enhancing)


# ---------------------------------------------------------------- the table


@dataclass(frozen=True)
class ReviewRow:
    """One row of the review table: its name, its colour swatch (None: no segment) and the cells after the name."""

    name: str
    color: tuple[float, float, float] | None
    cells: tuple[str, ...]


@dataclass(frozen=True)
class ReviewTable:
    """The review table (headers, rows; units are in the cells, as rows mix mL and mm²) and the lines under it."""

    headers: tuple[str, ...]
    rows: tuple[ReviewRow, ...]
    notes: tuple[str, ...]


def _ml(value: float) -> str:
    return f"{value:.2f} mL"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.1f} %"


def confidence_note(threshold: float) -> str:
    """What the confidence column and the overlay show."""
    return (f"Confidence < {threshold:.2f}: the volume of each segment where the model's confidence "
            f"(1 − normalised entropy) is below {threshold:.2f}; the overlay shows those voxels, red where least sure.")


def review_table(result: SegmentationResult, threshold: float,
                 comparison: PriorComparison | None = None) -> ReviewTable:
    """Labels then regions with their volume; the volume below ``threshold`` when the result has a confidence
    map; with a prior, its volume and the change, plus the enhancing region's sum of products and the RANO notes.
    """
    card = result.card
    groups = [(label.name, label.name, label.color) for label in card.labels]
    groups += [(region.name, f"{region.display_name} (region)", region.color) for region in card.regions]
    headers, notes = ["Segment", "Volume"], []
    unsure: Mapping[str, float] | None = None
    if result.confidence is not None:
        headers.append(f"Confidence < {threshold:.2f}")
        unsure = below_threshold_volumes(result.labelmap, result.confidence, card, threshold)
        notes.append(confidence_note(threshold))
    if comparison is not None:
        headers += ["Prior", "Change"]
    rows = []
    for key, name, color in groups:
        now = result.volumes[key]
        cells = [_ml(now)] + ([] if unsure is None else [_ml(unsure[key])])
        if comparison is not None:
            prior = comparison.prior_volumes_ml[key]
            cells += [_ml(prior), _percent(percent_change(now, prior))]
        rows.append(ReviewRow(name, color, tuple(cells)))
    if comparison is not None:
        enhancing = comparison.enhancing
        if enhancing is not None:
            rows.append(ReviewRow("Enhancing tumor: sum of products", None, (
                f"{enhancing.sum_of_products_mm2:.1f} mm²", *([] if unsure is None else [""]),
                f"{enhancing.prior_sum_of_products_mm2:.1f} mm²", _percent(enhancing.change_pct("sum of products")))))
        notes += rano_notes(enhancing)
    return ReviewTable(tuple(headers), tuple(rows), tuple(notes))

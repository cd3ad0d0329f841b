"""The review panel's numbers and texts, without Slicer: volumes below a confidence threshold, the change
against a prior on another grid of the same space, and the RANO 2.0 thresholds the change crosses.

Expectations are independent of the code: voxel counts with numpy; a prior on a grid three times coarser
whose voxels map onto exactly 3 x 3 x 3 current voxels (so nearest-neighbour resampling preserves every
volume exactly); rectangular lesions, whose product of diameters between voxel centres is 2 W H (the diagonal
of a W x H rectangle times its extent across the diagonal, 2 W H / diagonal).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
from SegMambaSlicerLib.engine.pipeline import SegmentationResult
from SegMambaSlicerLib.engine.volumes import volumes_ml
from SegMambaSlicerLib.errors import InputImageError
from SegMambaSlicerLib.evaluation.lesions import LesionError
from SegMambaSlicerLib.models.registry import resolve_model
from SegMambaSlicerLib.slicer.review import (
    NO_ENHANCING,
    RANO_CAVEAT,
    RESEARCH_ONLY,
    EnhancingChange,
    below_threshold_volumes,
    compare_with_prior,
    rano_notes,
    review_table,
)

NCR, ED, ET = 1, 2, 3
#: A rotated grid (axial slices along the last index axis) and the same space sampled three times coarser.
DIRECTION = np.array(sitk.Euler3DTransform((0, 0, 0), 0.08, -0.05, 0.4).GetMatrix())
FINE_SPACING, FINE_SIZE, ORIGIN = (1.0, 1.0, 2.0), (30, 27, 12), np.array([4.0, -9.0, 20.0])


@pytest.fixture(scope="module")
def brats():
    return resolve_model("segmamba-brats2023")


def _image(array_zyx: np.ndarray, spacing: tuple[float, float, float], origin: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing(spacing)
    image.SetOrigin(origin.tolist())
    image.SetDirection(DIRECTION.tolist())
    return image


def _fine(array_zyx: np.ndarray) -> sitk.Image:
    return _image(array_zyx, FINE_SPACING, ORIGIN)


def _coarse(array_zyx: np.ndarray) -> sitk.Image:
    """Voxel (i, j, k) is centred on fine voxel (3i + 1, 3j + 1, 3k + 1): it covers 3 x 3 x 3 fine voxels."""
    origin = ORIGIN + DIRECTION.reshape(3, 3) @ np.asarray(FINE_SPACING)
    return _image(array_zyx, tuple(3 * s for s in FINE_SPACING), origin)


def _result(labelmap: sitk.Image, card, confidence: sitk.Image | None = None) -> SegmentationResult:
    return SegmentationResult(labelmap, card, "cpu", 1.0, 1, volumes_ml(labelmap, card), confidence=confidence)


# ---------------------------------------------------------------- confidence


def test_volumes_below_the_threshold_equal_numpy_counts_per_label_and_region(brats) -> None:
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 4, size=FINE_SIZE[::-1]).astype(np.uint8)
    confidence = rng.random(FINE_SIZE[::-1]).astype(np.float32)
    voxel_ml = math.prod(FINE_SPACING) / 1000.0
    for threshold in (0.0, 0.3, 0.5, 1.0, 1.01):
        got = below_threshold_volumes(_fine(labels), _fine(confidence), brats, threshold)
        unsure = confidence < threshold
        expected = {"Necrotic tumor core": (NCR,), "Peritumoral edema": (ED,), "Enhancing tumor": (ET,),
                    "TC": (NCR, ET), "WT": (NCR, ED, ET), "ET": (ET,)}
        assert got.keys() == expected.keys()
        for name, values in expected.items():
            count = int(np.count_nonzero(np.isin(labels, values) & unsure))
            assert got[name] == pytest.approx(count * voxel_ml, rel=1e-12, abs=0.0), (threshold, name)


def test_a_confidence_map_on_another_grid_is_refused(brats) -> None:
    labels = np.zeros(FINE_SIZE[::-1], np.uint8)
    with pytest.raises(InputImageError, match="not on the label map's grid"):
        below_threshold_volumes(_fine(labels), _coarse(np.ones((4, 9, 10), np.float32)), brats, 0.5)


# ---------------------------------------------------------------- RANO 2.0 thresholds


def _change(spd: float, prior_spd: float, volume: float = 10.0, prior_volume: float = 10.0) -> EnhancingChange:
    return EnhancingChange(spd, prior_spd, volume, prior_volume)


@pytest.mark.parametrize(("change", "crossed"), [
    (_change(125.0, 100.0), ["sum of products +25.0 %: crosses the RANO 2.0 threshold of +25 % (the size "
                             "criterion of progression)"]),
    (_change(124.9, 100.0), []),
    (_change(50.0, 100.0), ["sum of products -50.0 %: crosses the RANO 2.0 threshold of -50 % (the size "
                            "criterion of a partial response)"]),
    (_change(50.1, 100.0), []),
    (_change(100.0, 100.0, 14.0, 10.0), ["volume +40.0 %: crosses the RANO 2.0 threshold of +40 % (the size "
                                         "criterion of progression (volumetric))"]),
    (_change(100.0, 100.0, 13.9, 10.0), []),
    (_change(100.0, 100.0, 3.5, 10.0), ["volume -65.0 %: crosses the RANO 2.0 threshold of -65 %"]),
    (_change(100.0, 100.0, 3.6, 10.0), []),
    (_change(0.0, 0.0, 0.0, 0.0), []),
])
def test_each_threshold_is_crossed_at_its_value_and_not_just_before(change: EnhancingChange,
                                                                    crossed: list[str]) -> None:
    notes = rano_notes(change)
    assert notes[0] == RESEARCH_ONLY and notes[-1] == RANO_CAVEAT
    body = notes[1:-1]
    if crossed:
        assert len(body) == len(crossed)
        for line, expected in zip(body, crossed, strict=True):
            assert line.startswith("Enhancing tumor ") and expected in line
    else:
        assert body == ("The change crosses none of the RANO 2.0 thresholds (sum of products +25 % / −50 %, "
                        "volume +40 % / −65 %, disappearance).",)


def test_disappearance_and_new_measurable_disease_are_named_without_a_percentage() -> None:
    gone = rano_notes(_change(0.0, 300.0, 0.0, 2.0))
    assert sum("threshold of -50 %" in line for line in gone) == 1
    assert sum("threshold of -65 %" in line for line in gone) == 1
    assert any(line.startswith("No enhancing tumor now") and "complete response" in line for line in gone)
    new = rano_notes(_change(180.0, 0.0, 2.0, 0.5))
    assert any(line.startswith("Measurable enhancing disease now") for line in new)
    assert not any(line.startswith("Enhancing tumor sum of products") for line in new)  # no % from a prior of 0
    assert sum("threshold of +40 %" in line for line in new) == 1  # 0.5 → 2.0 mL is +300 %


def test_notes_never_state_a_response_category(brats) -> None:
    cases = [_change(300.0, 100.0, 30.0, 10.0), _change(0.0, 300.0, 0.0, 2.0), _change(100.0, 100.0), None]
    for change in cases:
        notes = rano_notes(change)
        assert notes[0] == RESEARCH_ONLY and "not a response assessment" in notes[0]
        text = " ".join(notes).lower()
        for verdict in ("response: ", "assessment: ", "is progressive", "has progressed", "is a partial",
                        "stable disease"):
            assert verdict not in text
    assert rano_notes(None) == (RESEARCH_ONLY, NO_ENHANCING)


# ---------------------------------------------------------------- change against a prior on another grid


def _box(shape_zyx: tuple[int, int, int], value: int, corner: tuple[int, int, int],
         size: tuple[int, int, int], into: np.ndarray | None = None) -> np.ndarray:
    array = np.zeros(shape_zyx, np.uint8) if into is None else into
    (z, y, x), (dz, dy, dx) = corner, size
    array[z:z + dz, y:y + dy, x:x + dx] = value
    return array


def _current_and_prior() -> tuple[np.ndarray, np.ndarray]:
    """Current (fine grid): edema, and an ET box 12 x 10 voxels in plane. Prior (coarse): ET 4 x 3 coarse voxels."""
    current = _box(FINE_SIZE[::-1], ED, (1, 2, 2), (10, 22, 24))
    _box(FINE_SIZE[::-1], ET, (3, 6, 6), (4, 10, 12), into=current)
    prior = _box((4, 9, 10), ED, (0, 1, 1), (4, 7, 7))
    _box((4, 9, 10), ET, (1, 2, 2), (1, 3, 4), into=prior)
    _box((4, 9, 10), NCR, (2, 5, 5), (1, 1, 1), into=prior)
    return current, prior


def test_prior_on_a_coarser_grid_keeps_its_volumes_and_gives_the_analytic_products(brats) -> None:
    current, prior = _current_and_prior()
    comparison = compare_with_prior(_result(_fine(current), brats), _coarse(prior), "The prior")
    coarse_ml = 27 * math.prod(FINE_SPACING) / 1000.0
    counts = {value: int(np.count_nonzero(prior == value)) for value in (NCR, ED, ET)}
    expected = {"Necrotic tumor core": counts[NCR], "Peritumoral edema": counts[ED], "Enhancing tumor": counts[ET],
                "TC": counts[NCR] + counts[ET], "WT": sum(counts.values()), "ET": counts[ET]}
    assert dict(comparison.prior_volumes_ml) == pytest.approx({k: n * coarse_ml for k, n in expected.items()})

    # Rectangles between voxel centres: W x H = (12 - 1) x (10 - 1) mm now; the prior's 4 x 3 coarse voxels
    # are 12 x 9 fine voxels, (12 - 1) x (9 - 1) mm; both diameters are above 10 mm, so both are measurable.
    enhancing = comparison.enhancing
    assert enhancing.sum_of_products_mm2 == pytest.approx(2 * 11 * 9)
    assert enhancing.prior_sum_of_products_mm2 == pytest.approx(2 * 11 * 8)
    assert enhancing.volume_ml == pytest.approx(4 * 10 * 12 * math.prod(FINE_SPACING) / 1000.0)
    assert enhancing.prior_volume_ml == pytest.approx(counts[ET] * coarse_ml)
    assert enhancing.change_pct("sum of products") == pytest.approx(100.0 * (198 - 176) / 176)


def test_priors_outside_the_image_or_with_unknown_values_are_refused(brats) -> None:
    current, prior = _current_and_prior()
    result = _result(_fine(current), brats)
    far = _coarse(prior)
    far.SetOrigin((np.asarray(far.GetOrigin()) + 500.0).tolist())
    with pytest.raises(LesionError, match="does not overlap"):
        compare_with_prior(result, far, "The prior 'far'")
    prior[0, 0, 0] = 7  # outside the current image's overlap too: checked on the prior's own grid
    with pytest.raises(LesionError, match="The prior 'odd' holds the values 7"):
        compare_with_prior(result, _coarse(prior), "The prior 'odd'")


# ---------------------------------------------------------------- the table


def test_table_columns_follow_what_is_known(brats) -> None:
    current, prior = _current_and_prior()
    confidence = np.where(current == ET, 0.3, 0.9).astype(np.float32)
    plain = review_table(_result(_fine(current), brats), 0.5)
    assert plain.headers == ("Segment", "Volume") and plain.notes == ()
    assert [row.name for row in plain.rows] == [
        "Necrotic tumor core", "Peritumoral edema", "Enhancing tumor", "Tumor core (NCR + ET) (region)",
        "Whole tumor (NCR + ED + ET) (region)", "Enhancing tumor (region)"]
    assert plain.rows[2].cells == ("0.96 mL",) and plain.rows[2].color == brats.labels[2].color

    result = _result(_fine(current), brats, _fine(confidence))
    comparison = compare_with_prior(result, _coarse(prior), "The prior")
    full = review_table(result, 0.5, comparison)
    assert full.headers == ("Segment", "Volume", "Confidence < 0.50", "Prior", "Change")
    et_row = full.rows[2]
    assert et_row.cells == ("0.96 mL", "0.96 mL", "0.65 mL", "+48.1 %")  # 12 coarse voxels of 54 mm³
    assert full.rows[1].cells[1] == "0.00 mL"  # edema is sure everywhere
    spd = full.rows[-1]
    assert (spd.name, spd.color) == ("Enhancing tumor: sum of products", None)
    assert spd.cells == ("198.0 mm²", "", "176.0 mm²", "+12.5 %")
    assert full.notes[0].startswith("Confidence < 0.50: the volume of each segment")
    assert full.notes[1] == RESEARCH_ONLY and full.notes[-1] == RANO_CAVEAT
    assert "+48.1 %: crosses the RANO 2.0 threshold of +40 %" in full.notes[2]  # the volume, not the SPD

    no_prior_volume = dict(comparison.prior_volumes_ml, TC=0.0)
    shown = review_table(result, 0.5, type(comparison)(no_prior_volume, comparison.enhancing))
    assert shown.rows[3].cells[-1] == "n/a"  # no percentage from a prior of 0

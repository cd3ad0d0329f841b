"""Dice and spacing-aware HD95 of predicted label maps against references, per label and per region.

Conventions (the official SegMamba script scores a correctly empty prediction as Dice 0 / HD95 50, which
punishes the right answer; docs/models.md, "Evaluation conventions"):

* Dice = 2|P∩R| / (|P| + |R|); both empty → Dice 1, HD95 0 (the BraTS convention).
* One of the two empty → Dice 0 (the formula) and HD95 = the reference image's diagonal in mm, the largest
  distance two voxels of that image can have (373.13 mm on the BraTS 240×240×155 1-mm grid, the penalty
  of the BraTS 2021 evaluation); ``one_empty_hd95`` picks another value, e.g. ``nan`` to leave it
  undefined. Such cases are counted separately in the summary.
* HD95 = max(95th percentile of the distances from P's surface voxels to R's surface, and from R's to P's),
  in mm with the image spacing. Surface voxels are those with a 6-neighbour outside the mask (the image
  border counts as outside). This is MONAI's ``compute_hausdorff_distance(percentile=95)``; medpy's
  ``hd95`` (the official SegMamba script) pools both directions before taking one percentile instead,
  which can give smaller values.
"""

from __future__ import annotations

import math
import os
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import ProgressCallback, SegMambaError
from ..models.cards import ModelCard

PathLike = str | os.PathLike[str]

_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
_SEG_TAIL = re.compile(r"[-_.]seg$", re.IGNORECASE)
#: Relative tolerance when checking that a prediction lies on its reference's grid.
_GRID_TOLERANCE = 1e-4
PERCENTILE = 95.0
CASE_COLUMNS = ("case", "kind", "segment", "labels", "pred_ml", "ref_ml", "dice", "hd95_mm", "note")
SUMMARY_COLUMNS = ("kind", "segment", "labels", "cases", "dice_mean", "dice_median", "hd95_mean_mm",
                   "hd95_median_mm", "both_empty", "one_empty")
BOTH_EMPTY, PRED_EMPTY, REF_EMPTY = "both empty", "prediction empty", "reference empty"
OK, MISSING, FAILED = "ok", "missing prediction", "failed"


class MetricsError(SegMambaError):
    """Label maps cannot be compared (different grids, not a label map, no references found)."""


@dataclass(frozen=True)
class Group:
    """Label values scored together: one label, or a region such as BraTS TC = labels 1 and 3."""

    kind: str  # "label" or "region"
    name: str
    values: tuple[int, ...]

    @property
    def labels_text(self) -> str:
        return "+".join(map(str, self.values))


#: BraTS 2023 glioma: raw labels 1 = NCR, 2 = ED/SNFH, 3 = ET and the regions TC, WT, ET.
BRATS_GROUPS: tuple[Group, ...] = (
    Group("label", "NCR", (1,)),
    Group("label", "ED", (2,)),
    Group("label", "ET", (3,)),
    Group("region", "TC", (1, 3)),
    Group("region", "WT", (1, 2, 3)),
    Group("region", "ET", (3,)),
)


def groups_for_card(card: ModelCard) -> tuple[Group, ...]:
    """A card's labels (named by abbreviation when it has one) followed by its regions."""
    labels = [Group("label", lab.abbreviation or lab.name, (lab.value,)) for lab in card.labels]
    return (*labels, *(Group("region", r.name, tuple(r.labels)) for r in card.regions))


@dataclass(frozen=True)
class GroupScore:
    """Dice and HD95 of one group in one case, with the volumes that explain them."""

    group: Group
    dice: float
    hd95: float
    pred_voxels: int
    ref_voxels: int
    voxel_ml: float

    @property
    def note(self) -> str:
        if self.pred_voxels == 0 and self.ref_voxels == 0:
            return BOTH_EMPTY
        if self.pred_voxels == 0:
            return PRED_EMPTY
        return REF_EMPTY if self.ref_voxels == 0 else ""


# ---------------------------------------------------------------- metrics on masks


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """2|P∩R| / (|P| + |R|) of two boolean masks; 1.0 when both are empty."""
    total = int(np.count_nonzero(pred)) + int(np.count_nonzero(ref))
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(pred & ref)) / total


def surface_points(mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Physical coordinates (mm, array axis order) of the voxels of ``mask`` that have a 6-neighbour outside it.

    Only the bounding box (plus one voxel) is eroded, which keeps this fast on mostly empty volumes.
    """
    from scipy import ndimage  # imported on use: the command line should start fast

    points = np.nonzero(mask)
    if points[0].size == 0:
        return np.zeros((0, mask.ndim))
    box = tuple(slice(max(int(p.min()) - 1, 0), int(p.max()) + 2) for p in points)
    crop = mask[box]
    edge = crop & ~ndimage.binary_erosion(crop, ndimage.generate_binary_structure(mask.ndim, 1), border_value=0)
    offset = np.array([s.start for s in box])
    return (np.argwhere(edge) + offset) * np.asarray(spacing, dtype=np.float64)


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], percentile: float = PERCENTILE) -> float:
    """Symmetric percentile Hausdorff distance (mm) of two boolean masks; 0 when both are empty, NaN when one is.

    ``spacing`` is in array axis order (SimpleITK's reversed). Nearest-surface distances are exact (k-d tree).
    """
    from scipy.spatial import cKDTree

    a, b = surface_points(pred, spacing), surface_points(ref, spacing)
    if len(a) == 0 and len(b) == 0:
        return 0.0
    if len(a) == 0 or len(b) == 0:
        return math.nan
    a_to_b = cKDTree(b).query(a)[0]
    b_to_a = cKDTree(a).query(b)[0]
    return float(max(np.percentile(a_to_b, percentile), np.percentile(b_to_a, percentile)))


def image_diagonal_mm(image: sitk.Image) -> float:
    """Length of the image's diagonal in mm, the HD95 given to a group that is empty in one image only."""
    return math.hypot(*(n * s for n, s in zip(image.GetSize(), image.GetSpacing())))


# ---------------------------------------------------------------- one case


def label_array(image: sitk.Image, name: str) -> np.ndarray:
    """The voxel values of a 3-D label map; floating-point images must hold whole numbers."""
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise MetricsError(f"{name} is not a 3-D single-component label map.")
    array = sitk.GetArrayFromImage(image)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise MetricsError(f"{name} holds non-integer values; it is not a label map (probabilities?).")
        array = array.astype(np.int64)
    return array


def check_same_grid(pred: sitk.Image, ref: sitk.Image, name: str) -> None:
    """Metrics are only meaningful voxel by voxel on one grid; say what differs otherwise."""
    if pred.GetSize() != ref.GetSize():
        raise MetricsError(f"{name}: the prediction has size {pred.GetSize()} but the reference {ref.GetSize()}.")
    for what, p, r in (
        ("spacing", pred.GetSpacing(), ref.GetSpacing()),
        ("origin", pred.GetOrigin(), ref.GetOrigin()),
        ("direction", pred.GetDirection(), ref.GetDirection()),
    ):
        scale = max(1.0, *(abs(v) for v in r))
        if any(abs(a - b) > _GRID_TOLERANCE * scale for a, b in zip(p, r)):
            raise MetricsError(
                f"{name}: the prediction's {what} {tuple(round(v, 4) for v in p)} differs from the reference's "
                f"{tuple(round(v, 4) for v in r)}; resample the prediction onto the reference grid first."
            )


def score_case(
    pred: sitk.Image,
    ref: sitk.Image,
    groups: Sequence[Group] = BRATS_GROUPS,
    one_empty_hd95: float | None = None,
    name: str = "case",
) -> list[GroupScore]:
    """Dice and HD95 per group; ``one_empty_hd95=None`` gives the reference's diagonal (see module doc)."""
    check_same_grid(pred, ref, name)
    p_labels, r_labels = label_array(pred, f"{name} prediction"), label_array(ref, f"{name} reference")
    spacing = ref.GetSpacing()[::-1]
    voxel_ml = math.prod(ref.GetSpacing()) / 1000.0
    penalty = image_diagonal_mm(ref) if one_empty_hd95 is None else float(one_empty_hd95)
    scores = []
    for group in groups:
        p, r = np.isin(p_labels, group.values), np.isin(r_labels, group.values)
        distance = hd95(p, r, spacing)
        scores.append(GroupScore(
            group=group, dice=dice(p, r), hd95=penalty if math.isnan(distance) else distance,
            pred_voxels=int(np.count_nonzero(p)), ref_voxels=int(np.count_nonzero(r)), voxel_ml=voxel_ml,
        ))
    return scores


# ---------------------------------------------------------------- folders


@dataclass(frozen=True)
class CaseEvaluation:
    """One reference case: its scores, or why it has none."""

    case: str
    status: str
    scores: tuple[GroupScore, ...] = ()
    error: str = ""


@dataclass(frozen=True)
class SummaryRow:
    """Per-group statistics over the scored cases (NaN HD95 values are left out of the HD95 statistics)."""

    group: Group
    cases: int
    dice_mean: float
    dice_median: float
    hd95_mean: float
    hd95_median: float
    both_empty: int
    one_empty: int


@dataclass(frozen=True)
class Evaluation:
    """Scores of every reference case, in case order, plus the predictions that had no reference."""

    groups: tuple[Group, ...]
    cases: tuple[CaseEvaluation, ...]
    unmatched_predictions: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        """True when every reference case was scored."""
        return all(c.status == OK for c in self.cases)

    def summary(self) -> list[SummaryRow]:
        rows = []
        for index, group in enumerate(self.groups):
            scores = [c.scores[index] for c in self.cases if c.status == OK]
            dices = [s.dice for s in scores]
            distances = [s.hd95 for s in scores if not math.isnan(s.hd95)]
            rows.append(SummaryRow(
                group=group, cases=len(scores),
                dice_mean=_mean(dices), dice_median=_median(dices),
                hd95_mean=_mean(distances), hd95_median=_median(distances),
                both_empty=sum(s.note == BOTH_EMPTY for s in scores),
                one_empty=sum(s.note in (PRED_EMPTY, REF_EMPTY) for s in scores),
            ))
        return rows


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def _image_stem(path: Path) -> str | None:
    """File name without its image suffix, or None for non-image and hidden (temporary) files."""
    name = path.name
    if name.startswith(".") or not path.is_file():
        return None
    suffix = next((s for s in _IMAGE_SUFFIXES if name.lower().endswith(s)), None)
    return name[: -len(suffix)] if suffix else None


def _case_key(stem: str) -> str:
    return _SEG_TAIL.sub("", stem)


def reference_files(ref_dir: Path) -> dict[str, Path]:
    """Reference label maps by case id.

    BraTS layout (``<case>/<case>-seg.nii.gz`` beside the images): every file named ``*-seg``/``*_seg``
    anywhere below ``ref_dir``. Otherwise (nnU-Net ``labelsTs``): every image file directly in ``ref_dir``.
    """
    stems = {p: _image_stem(p) for p in sorted(ref_dir.rglob("*"))}
    segs = {p: s for p, s in stems.items() if s is not None and _SEG_TAIL.search(s)}
    chosen = segs or {p: s for p, s in stems.items() if s is not None and p.parent == ref_dir}
    return _by_case(chosen, ref_dir)


def prediction_files(pred_dir: Path) -> dict[str, Path]:
    """Predicted label maps directly in ``pred_dir`` by case id (``<case>.nii.gz`` or ``<case>-seg.nii.gz``)."""
    stems = {p: _image_stem(p) for p in sorted(pred_dir.iterdir())}
    return _by_case({p: s for p, s in stems.items() if s is not None}, pred_dir)


def _by_case(stems: dict[Path, str], folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path, stem in stems.items():
        key = _case_key(stem)
        if key in found:
            raise MetricsError(f"Two label maps in {folder} belong to case {key}: {found[key].name} and {path.name}.")
        found[key] = path
    return found


def evaluate_folders(
    pred_dir: PathLike,
    ref_dir: PathLike,
    groups: Sequence[Group] = BRATS_GROUPS,
    one_empty_hd95: float | None = None,
    progress: ProgressCallback | None = None,
) -> Evaluation:
    """Score every reference case against the prediction of the same case id (see the module doc)."""
    pred_dir, ref_dir = Path(pred_dir).expanduser(), Path(ref_dir).expanduser()
    for folder, what in ((pred_dir, "prediction"), (ref_dir, "reference")):
        if not folder.is_dir():
            raise MetricsError(f"The {what} folder {folder} does not exist.")
    refs, preds = reference_files(ref_dir), prediction_files(pred_dir)
    if not refs:
        raise MetricsError(
            f"No reference label maps in {ref_dir}: expected <case>/<case>-seg.nii.gz (BraTS) or <case>.nii.gz files."
        )
    cases = []
    for index, (case, ref_path) in enumerate(sorted(refs.items())):
        if progress is not None:
            progress(index / len(refs), f"case {index + 1}/{len(refs)} {case}")
        if case not in preds:
            cases.append(CaseEvaluation(case, MISSING, error=f"no prediction for {case} in {pred_dir}"))
            continue
        try:
            pred, ref = _read(preds[case], "prediction"), _read(ref_path, "reference")
            scores = score_case(pred, ref, groups, one_empty_hd95, name=case)
        except MetricsError as exc:
            cases.append(CaseEvaluation(case, FAILED, error=str(exc)))
            continue
        cases.append(CaseEvaluation(case, OK, tuple(scores)))
    unmatched = tuple(sorted(set(preds) - set(refs)))
    return Evaluation(groups=tuple(groups), cases=tuple(cases), unmatched_predictions=unmatched)


def _read(path: Path, what: str) -> sitk.Image:
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise MetricsError(f"Cannot read the {what} {path}: {first}") from None


# ---------------------------------------------------------------- reports


def _number(value: float, digits: int = 4) -> str:
    return "nan" if math.isnan(value) else f"{value:.{digits}f}"


def case_rows(evaluation: Evaluation) -> list[list[str]]:
    """Rows of the per-case CSV (:data:`CASE_COLUMNS`); unscored cases get one row with the reason."""
    rows = []
    for case in evaluation.cases:
        if case.status != OK:
            rows.append([case.case, "", "", "", "", "", "", "", f"{case.status}: {case.error}"])
            continue
        for s in case.scores:
            rows.append([
                case.case, s.group.kind, s.group.name, s.group.labels_text, f"{s.pred_voxels * s.voxel_ml:.6f}",
                f"{s.ref_voxels * s.voxel_ml:.6f}", _number(s.dice, 6), _number(s.hd95, 4), s.note,
            ])
    return rows


def summary_rows(evaluation: Evaluation) -> list[list[str]]:
    """Rows of the summary CSV (:data:`SUMMARY_COLUMNS`)."""
    return [
        [r.group.kind, r.group.name, r.group.labels_text, str(r.cases), _number(r.dice_mean), _number(r.dice_median),
         _number(r.hd95_mean, 2), _number(r.hd95_median, 2), str(r.both_empty), str(r.one_empty)]
        for r in evaluation.summary()
    ]


def format_summary(evaluation: Evaluation) -> str:
    """A fixed-width table of :meth:`Evaluation.summary` for the terminal."""
    header = f"{'KIND':7s} {'SEGMENT':10s} {'LABELS':7s} {'N':>4s} {'DICE':>7s} {'MEDIAN':>7s} " \
             f"{'HD95 mm':>8s} {'MEDIAN':>8s} {'BOTH-EMPTY':>10s} {'ONE-EMPTY':>9s}"
    lines = [header]
    for r in evaluation.summary():
        lines.append(
            f"{r.group.kind:7s} {r.group.name:10s} {r.group.labels_text:7s} {r.cases:4d} {_number(r.dice_mean):>7s} "
            f"{_number(r.dice_median):>7s} {_number(r.hd95_mean, 2):>8s} {_number(r.hd95_median, 2):>8s} "
            f"{r.both_empty:10d} {r.one_empty:9d}"
        )
    return "\n".join(lines)

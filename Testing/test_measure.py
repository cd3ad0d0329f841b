"""Lesions and measurements (``measure``): components, volumes, RAS centroids, axial diameters, change.

Expectations are independent of the code: ellipsoids and spheres with known axes drawn on rotated,
anisotropic grids with 3 mm slices (analytic diameters within an in-plane voxel diagonal, since diameters
run between voxel centres; volumes within the discretisation error), hand-placed voxels for connectivity,
and rectangles whose diagonal and perpendicular extent are known in closed form.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from SegMambaSlicerLib.cli import EXIT_USER_ERROR, main
from SegMambaSlicerLib.evaluation.lesions import (
    axial_diameters,
    enhancing_region,
    measure,
    measured_regions,
    percent_change,
)
from SegMambaSlicerLib.models.registry import resolve_model

NCR, ED, ET = 1, 2, 3
CENTRE = np.array([10.0, -20.0, 30.0])  # LPS mm


@pytest.fixture(scope="module")
def brats():
    return resolve_model("segmamba-brats2023")


def _rotation(axis: int, degrees: float) -> np.ndarray:
    t = math.radians(degrees)
    i, j = (a for a in range(3) if a != axis)
    m = np.eye(3)
    m[i, i], m[i, j], m[j, i], m[j, j] = math.cos(t), -math.sin(t), math.sin(t), math.cos(t)
    return m


@dataclasses.dataclass(frozen=True)
class Grid:
    """A voxel grid centred on ``centre`` (its middle voxel's centre lies there: sizes are odd)."""

    size: tuple[int, int, int]  # SimpleITK order
    spacing: tuple[float, float, float]
    direction: np.ndarray  # column c = LPS direction of index axis c
    slice_axis: int  # the index axis closest to LPS z, known by construction
    centre: np.ndarray = dataclasses.field(default_factory=lambda: CENTRE)

    @property
    def origin(self) -> np.ndarray:
        return self.centre - self.direction @ (np.asarray(self.spacing) * (np.asarray(self.size) - 1) / 2)

    def image(self, array_zyx: np.ndarray, pixel=sitk.sitkUInt8) -> sitk.Image:
        image = sitk.Cast(sitk.GetImageFromArray(array_zyx), pixel)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin.tolist())
        image.SetDirection(self.direction.ravel().tolist())
        return image

    def points(self) -> np.ndarray:
        """LPS position of every voxel centre, shaped (z, y, x, 3)."""
        k, j, i = np.meshgrid(*(np.arange(n) for n in self.size[::-1]), indexing="ij")
        index = np.stack([i, j, k], axis=-1).astype(float)
        return self.origin + index @ (self.direction * np.asarray(self.spacing)).T

    def plane_axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Two in-plane unit vectors of the slices and their normal."""
        u, v = (a for a in range(3) if a != self.slice_axis)
        return self.direction[:, u], self.direction[:, v], self.direction[:, self.slice_axis]

    def in_plane_diagonal(self) -> float:
        u, v = (a for a in range(3) if a != self.slice_axis)
        return math.hypot(self.spacing[u], self.spacing[v])


#: Axial slices on the last axis, 3 mm thick, tilted 12° and turned 25°.
TILTED = Grid((45, 35, 17), (0.9, 1.2, 3.0), _rotation(2, 25) @ _rotation(0, 12), slice_axis=2)
#: Slices stored along the first index axis (sagittal-looking storage of an axial series), tilted 10°.
PERMUTED = Grid((17, 45, 35), (3.0, 0.9, 1.2),
                _rotation(0, 10) @ np.array([[0.0, 1, 0], [0, 0, 1], [1, 0, 0]]), slice_axis=0)
#: A 1-mm isotropic identity grid, for priors stored on another grid than the current scan.
ISOTROPIC = Grid((41, 41, 41), (1.0, 1.0, 1.0), np.eye(3), slice_axis=2)


def _ellipsoid(grid: Grid, semi_axes: tuple[float, float, float], turn_degrees: float = 0.0,
               centre: np.ndarray = CENTRE) -> np.ndarray:
    """Ellipsoid mask whose third axis is the slice normal and whose first is turned in the slice plane."""
    e1, e2, normal = grid.plane_axes()
    t = math.radians(turn_degrees)
    major, minor = math.cos(t) * e1 + math.sin(t) * e2, -math.sin(t) * e1 + math.cos(t) * e2
    frame = np.stack([major, minor, normal], axis=1)
    local = (grid.points() - centre) @ frame
    return ((local / np.asarray(semi_axes)) ** 2).sum(axis=-1) <= 1.0


def _ball(grid: Grid, radius: float, centre: np.ndarray = CENTRE) -> np.ndarray:
    return np.linalg.norm(grid.points() - centre, axis=-1) <= radius


def _ras(lps: np.ndarray) -> np.ndarray:
    return lps * np.array([-1.0, -1.0, 1.0])


def _region(measurement, name: str):
    return next(r for r in measurement.regions if r.name == name)


# ---------------------------------------------------------------- analytic shapes on awkward grids


@pytest.mark.parametrize("grid", [TILTED, PERMUTED], ids=["tilted", "slices-on-first-axis"])
def test_ellipsoid_diameters_volume_and_centroid_are_the_analytic_ones(grid: Grid, brats) -> None:
    # Longest axis along the slice normal: slicing along any other axis would report ~44 mm.
    a, b, c = 16.0, 10.0, 22.0
    mask = _ellipsoid(grid, (a, b, c), turn_degrees=30.0)
    result = measure(grid.image(mask.astype(np.uint8) * ET), brats)

    (lesion,) = _region(result, "ET").lesions
    d1, d2 = lesion.axial_diameters_mm
    diagonal = grid.in_plane_diagonal()
    assert 2 * a - diagonal <= d1 <= 2 * a
    assert 2 * b - diagonal <= d2 <= 2 * b + diagonal
    assert lesion.product_mm2 == pytest.approx(d1 * d2) and lesion.measurable
    analytic_ml = 4 / 3 * math.pi * a * b * c / 1000
    assert lesion.volume_ml == pytest.approx(analytic_ml, rel=0.05)
    assert lesion.volume_ml == pytest.approx(mask.sum() * math.prod(grid.spacing) / 1000)
    np.testing.assert_allclose(lesion.centroid_ras, _ras(CENTRE), atol=1e-6)  # the mask is symmetric
    assert [r.volume_ml for r in result.regions] == [lesion.volume_ml] * 3  # TC, WT and ET hold it all


@pytest.mark.parametrize(("radius", "measurable"), [(4.0, False), (9.0, True)])
def test_spheres_below_10_mm_are_not_measurable_and_not_summed(radius: float, measurable: bool,
                                                                brats) -> None:
    result = measure(TILTED.image(_ball(TILTED, radius).astype(np.uint8) * ET), brats)
    (lesion,) = _region(result, "ET").lesions
    diagonal = TILTED.in_plane_diagonal()
    for d in lesion.axial_diameters_mm:
        assert 2 * radius - diagonal <= d <= 2 * radius + diagonal
    assert lesion.measurable is measurable
    assert result.sum_of_products_mm2() == (pytest.approx(lesion.product_mm2) if measurable else 0.0)


def test_rectangle_diameters_are_its_diagonal_and_its_width_across_the_diagonal() -> None:
    # 11 x 5 voxel centres at 1 x 2 mm: a 10 x 8 mm rectangle of centres; a smaller one on the slice before.
    big = np.array([(i, j, 1) for i in range(11) for j in range(5)])
    small = np.array([(i, j, 0) for i in range(3) for j in range(3)])
    matrix = np.diag([1.0, 2.0, 3.0])
    d1, d2 = axial_diameters(np.concatenate([small, big]), matrix, axial=2)
    w, h = 10.0, 8.0
    assert d1 == pytest.approx(math.hypot(w, h))
    assert d2 == pytest.approx(2 * w * h / math.hypot(w, h))  # extent across the diagonal


def test_a_single_voxel_measures_zero_by_zero() -> None:
    assert axial_diameters(np.array([[4, 5, 6]]), np.diag([1.0, 1.0, 3.0]), axial=2) == (0.0, 0.0)


# ---------------------------------------------------------------- components


def test_multifocal_lesions_are_counted_and_measured_separately(brats) -> None:
    first, second = CENTRE + np.array([-9.0, 0, 0]), CENTRE + np.array([10.0, 4.0, 0])
    labels = np.zeros(TILTED.size[::-1], np.uint8)
    labels[_ball(TILTED, 6.0, first)] = ET
    labels[_ball(TILTED, 4.0, second)] = ET
    labels[_ball(TILTED, 3.0, CENTRE + np.array([0, -14.0, 0]))] = ED  # in WT only
    result = measure(TILTED.image(labels), brats)

    assert [len(r.lesions) for r in result.regions] == [2, 3, 2]  # TC, WT, ET
    big, small = _region(result, "ET").lesions  # largest first
    voxel_ml = math.prod(TILTED.spacing) / 1000
    assert big.volume_ml == pytest.approx(_ball(TILTED, 6.0, first).sum() * voxel_ml)
    assert small.volume_ml == pytest.approx(_ball(TILTED, 4.0, second).sum() * voxel_ml)
    np.testing.assert_allclose(big.centroid_ras, _ras(first), atol=0.5)
    np.testing.assert_allclose(small.centroid_ras, _ras(second), atol=0.5)
    assert _region(result, "WT").volume_ml == pytest.approx(np.count_nonzero(labels) * voxel_ml)


@pytest.mark.parametrize(("offset", "count"), [((1, 1, 1), 1), ((2, 0, 0), 2)], ids=["corner", "gap"])
def test_26_connectivity_merges_voxels_touching_at_a_corner_only(offset, count: int, brats) -> None:
    labels = np.zeros((9, 9, 9), np.uint8)
    labels[2:4, 2:4, 2:4] = ET
    k, j, i = (3 + o for o in offset)
    labels[k:k + 2, j:j + 2, i:i + 2] = ET
    result = measure(ISOTROPIC.image(labels), brats)
    assert len(_region(result, "ET").lesions) == count


def test_components_below_the_minimum_volume_are_not_lesions_but_count_in_the_region(brats) -> None:
    labels = _ball(ISOTROPIC, 6.0).astype(np.uint8) * ET
    labels[0, 0, 0] = ET  # a 1 mm³ speck
    result = measure(ISOTROPIC.image(labels), brats, min_volume_ml=0.01)
    (lesion,) = _region(result, "ET").lesions
    assert _region(result, "ET").volume_ml == pytest.approx(lesion.volume_ml + 0.001)


def test_an_empty_map_has_no_lesions_and_zero_volumes(brats) -> None:
    result = measure(TILTED.image(np.zeros(TILTED.size[::-1], np.uint8)), brats)
    assert result.lesions == () and [r.volume_ml for r in result.regions] == [0.0, 0.0, 0.0]
    assert result.sum_of_products_mm2() == 0.0


def test_enhancing_region_is_the_region_of_exactly_the_enhancing_label(brats) -> None:
    assert enhancing_region(brats, measured_regions(brats)) == "ET"
    without_regions = dataclasses.replace(brats, regions=())
    assert [g.name for g in measured_regions(without_regions)] == ["NCR", "ED", "ET"]
    assert enhancing_region(without_regions, measured_regions(without_regions)) == "ET"
    anonymous = tuple(dataclasses.replace(lab, abbreviation="", name=f"class {lab.value}")
                      for lab in brats.labels)
    unnamed = dataclasses.replace(brats, labels=anonymous)
    assert enhancing_region(unnamed, measured_regions(unnamed)) is None


def test_percent_change_is_undefined_from_zero() -> None:
    assert percent_change(15.0, 10.0) == pytest.approx(50.0)
    assert percent_change(0.0, 0.0) is None and percent_change(3.0, 0.0) is None


# ---------------------------------------------------------------- the command


def _write(image: sitk.Image, path: Path) -> Path:
    sitk.WriteImage(image, str(path))
    return path


def _measure(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["measure", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_contract_and_change_from_a_prior_on_another_grid(tmp_path: Path, capsys) -> None:
    current = _write(TILTED.image(_ball(TILTED, 10.0).astype(np.uint8) * ET), tmp_path / "now.nii.gz")
    prior = _write(ISOTROPIC.image(_ball(ISOTROPIC, 12.0).astype(np.uint8) * ET), tmp_path / "before.nrrd")
    code, out, _ = _measure(capsys, str(current), "--prior", str(prior), "--json", str(tmp_path / "m.json"))
    assert code == 0 and "ET" in out

    data = json.loads((tmp_path / "m.json").read_text())
    assert set(data) == {"regions", "lesions", "change"}
    assert [r["name"] for r in data["regions"]] == ["TC", "WT", "ET"]
    assert all(set(r) == {"name", "volume_ml"} and isinstance(r["volume_ml"], float) for r in data["regions"])
    assert len(data["lesions"]) == 3
    for lesion in data["lesions"]:
        assert set(lesion) == {"region", "volume_ml", "centroid_ras", "axial_diameters_mm", "product_mm2",
                               "measurable"}
        assert len(lesion["centroid_ras"]) == 3 and len(lesion["axial_diameters_mm"]) == 2
        assert isinstance(lesion["measurable"], bool) and isinstance(lesion["product_mm2"], float)
    change = data["change"]
    assert set(change) == {"regions", "sum_of_products_mm2", "prior_sum_of_products_mm2",
                           "product_change_pct"}
    region_keys = {"name", "volume_ml", "prior_volume_ml", "volume_change_pct"}
    assert all(set(r) == region_keys for r in change["regions"])

    # The prior, resampled by nearest neighbour, keeps its sphere's volume and diameters.
    et = next(r for r in change["regions"] if r["name"] == "ET")
    assert et["volume_ml"] == pytest.approx(4 / 3 * math.pi * 10**3 / 1000, rel=0.05)
    assert et["prior_volume_ml"] == pytest.approx(4 / 3 * math.pi * 12**3 / 1000, rel=0.05)
    expected_pct = 100 * (et["volume_ml"] / et["prior_volume_ml"] - 1)
    assert et["volume_change_pct"] == pytest.approx(expected_pct, abs=0.02)
    assert 20 - 2 * TILTED.in_plane_diagonal() <= math.sqrt(change["sum_of_products_mm2"]) <= 20
    assert 24 - 2 * TILTED.in_plane_diagonal() <= math.sqrt(change["prior_sum_of_products_mm2"]) <= 24
    assert change["product_change_pct"] == pytest.approx(
        100 * (change["sum_of_products_mm2"] / change["prior_sum_of_products_mm2"] - 1), abs=0.05)


def test_empty_maps_give_zero_volumes_and_null_changes(tmp_path: Path, capsys) -> None:
    empty = _write(TILTED.image(np.zeros(TILTED.size[::-1], np.uint8)), tmp_path / "empty.nii.gz")
    code, _, _ = _measure(capsys, str(empty), "--prior", str(empty), "--json", str(tmp_path / "m.json"))
    data = json.loads((tmp_path / "m.json").read_text())
    assert code == 0 and data["lesions"] == []
    assert [r["volume_ml"] for r in data["regions"]] == [0.0, 0.0, 0.0]
    assert all(r["volume_change_pct"] is None for r in data["change"]["regions"])
    assert data["change"]["sum_of_products_mm2"] == 0.0 and data["change"]["product_change_pct"] is None


def test_without_a_prior_there_is_no_change_object(tmp_path: Path, capsys) -> None:
    labels = _write(ISOTROPIC.image(_ball(ISOTROPIC, 5.0).astype(np.uint8) * NCR), tmp_path / "l.nii.gz")
    code, _, _ = _measure(capsys, str(labels), "--json", str(tmp_path / "m.json"))
    data = json.loads((tmp_path / "m.json").read_text())
    assert code == 0 and set(data) == {"regions", "lesions"}
    assert [lesion["region"] for lesion in data["lesions"]] == ["TC", "WT"]


def _undefined_values(tmp: Path) -> list[str]:
    labels = np.zeros((5, 6, 7), np.uint8)
    labels[1, 1, 1], labels[2, 2, 2], labels[3, 3, 3] = 5, 7, ET
    return [str(_write(ISOTROPIC.image(labels), tmp / "l.nii.gz"))]


def _non_integer(tmp: Path) -> list[str]:
    labels = np.zeros((5, 6, 7), np.float32)
    labels[2, 2, 2] = 0.5
    return [str(_write(ISOTROPIC.image(labels, sitk.sitkFloat32), tmp / "l.nii.gz"))]


def _prior_elsewhere(tmp: Path) -> list[str]:
    current = _write(ISOTROPIC.image(np.zeros((5, 6, 7), np.uint8)), tmp / "now.nii.gz")
    far = dataclasses.replace(ISOTROPIC, centre=CENTRE + 500.0)
    prior = _write(far.image(np.zeros((5, 6, 7), np.uint8)), tmp / "before.nii.gz")
    return [str(current), "--prior", str(prior)]


def _prior_with_undefined_values(tmp: Path) -> list[str]:
    current = _write(ISOTROPIC.image(np.zeros((5, 6, 7), np.uint8)), tmp / "now.nii.gz")
    labels = np.zeros((5, 6, 7), np.uint8)
    labels[0, 0, 0] = 9
    return [str(current), "--prior", str(_write(ISOTROPIC.image(labels), tmp / "before.nii.gz"))]


@pytest.mark.parametrize(("make", "message"), [
    (_undefined_values, r"holds the values 5, 7, which the model segmamba-brats2023 does not define"),
    (_non_integer, r"holds non-integer values"),
    (_prior_elsewhere, r"The prior label map .* does not overlap the current label map in space"),
    (_prior_with_undefined_values, r"The prior label map .* holds the values 9,"),
], ids=["undefined-values", "non-integer", "prior-elsewhere", "prior-undefined-values"])
def test_bad_inputs_are_one_error_line_and_exit_1(make, message: str, tmp_path: Path, capsys) -> None:
    output = tmp_path / "m.json"
    code, _, err = _measure(capsys, *make(tmp_path), "--json", str(output))
    assert code == EXIT_USER_ERROR
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert not output.exists()


def test_the_output_is_checked_before_any_work(tmp_path: Path, capsys) -> None:
    labels = _write(ISOTROPIC.image(np.zeros((5, 6, 7), np.uint8)), tmp_path / "l.nii.gz")
    code, _, err = _measure(capsys, str(labels), "--json", str(tmp_path))
    assert code == EXIT_USER_ERROR and "is a folder" in err
    code, _, err = _measure(capsys, str(tmp_path / "missing.nii.gz"), "--json", str(tmp_path / "out.txt"))
    assert code == EXIT_USER_ERROR and "Unsupported format" in err

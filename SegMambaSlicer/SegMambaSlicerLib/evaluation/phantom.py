"""Synthetic BraTS-like brain tumour cases for tests, demos and smoke runs without patient data.

A case has the four BraTS 2023 channels (t2w, t2f = FLAIR, t1n, t1c) and a label map with the BraTS raw
labels 1 = necrotic core (NCR), 2 = oedema (ED/SNFH), 3 = enhancing tumour (ET). The geometry follows BraTS:
240×240×155 voxels of 1 mm, identity direction, origin (0, −(ny−1)·sy, 0), skull-stripped with background
exactly 0 (the official preprocessing crops to the non-zero region, so the zero background matters).

Anatomy is a deformed ellipsoidal brain with a cortical grey-matter ribbon, sulcal CSF, white matter and
two lateral ventricles; the tumour is a union of smoothly deformed blobs with a necrotic centre, an
enhancing rim of roughly constant thickness and irregular oedema that spreads through white matter more
than through cortex and never into CSF. Contrasts follow real MRI (T1: WM > GM > CSF; T2: CSF > GM > WM;
FLAIR: CSF dark, oedema bright; T1c: enhancing rim bright, necrosis dark) and the labels are derived from
the same fields that set the intensities, so a network can learn them. A smooth multiplicative bias field
and Rician noise are added per channel.

Everything is drawn from one ``numpy.random.Generator`` seeded by ``seed``: the same seed and shape give
bit-identical volumes. Only numpy, scipy and SimpleITK are used; a BraTS-sized case takes a few seconds
on one core.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..errors import SegMambaError
from ..io.images import write_image_atomic
from ..models.cache import cache_dir


class PhantomError(SegMambaError, ValueError):
    """The requested phantom cannot be made (grid too small, bad spacing, bad case name)."""


#: BraTS 2023 grid (x, y, z): the default size of phantoms and of the sample case.
BRATS_SHAPE: tuple[int, int, int] = (240, 240, 155)
#: BraTS 2023 channel order used by SegMamba / SegMamba-V2 (docs/models.md, "SegMamba preprocessing").
MODALITIES: tuple[str, ...] = ("t2w", "t2f", "t1n", "t1c")
#: BraTS raw labels.
LABEL_NECROSIS, LABEL_EDEMA, LABEL_ENHANCING = 1, 2, 3
#: Smallest accepted grid edge; below this the tumour parts shrink under one voxel.
MIN_EDGE = 16

_Array = np.ndarray


class _Radii(NamedTuple):
    """Brain semi-axes in mm (numpy axis order). Python floats keep all arithmetic in float32."""

    z: float
    y: float
    x: float


class TissueContrast(NamedTuple):
    """Mean signal (arbitrary units, roughly the scale of BraTS intensities) of each tissue in one channel."""

    csf: float
    gm: float
    wm: float
    edema: float
    necrosis: float
    enhancing: float


#: Per-channel contrasts. T1: WM > GM > CSF; T2: CSF > GM > WM; FLAIR suppresses CSF; gadolinium makes
#: the viable rim bright on T1c while the necrotic core stays dark; oedema is bright on T2 and FLAIR.
CONTRASTS: dict[str, TissueContrast] = {
    "t2w": TissueContrast(csf=1800.0, gm=950.0, wm=700.0, edema=1400.0, necrosis=1600.0, enhancing=1050.0),
    "t2f": TissueContrast(csf=180.0, gm=800.0, wm=600.0, edema=1350.0, necrosis=750.0, enhancing=1000.0),
    "t1n": TissueContrast(csf=300.0, gm=600.0, wm=800.0, edema=480.0, necrosis=330.0, enhancing=560.0),
    "t1c": TissueContrast(csf=330.0, gm=640.0, wm=830.0, edema=500.0, necrosis=300.0, enhancing=1450.0),
}


@dataclass(frozen=True)
class PhantomCase:
    """One synthetic case: float32 channel images keyed by :data:`MODALITIES` and a uint8 label map."""

    images: dict[str, sitk.Image]
    seg: sitk.Image


@dataclass(frozen=True)
class _Grid:
    """Physical coordinates (mm, relative to the grid centre) as broadcastable (z, y, x) axes."""

    shape: tuple[int, int, int]  # numpy order (z, y, x)
    spacing: tuple[float, float, float]  # numpy order (z, y, x)
    z: _Array
    y: _Array
    x: _Array

    @property
    def extent(self) -> _Array:
        return np.array(self.shape, dtype=np.float64) * np.array(self.spacing)

    @property
    def pv_width(self) -> float:
        """Partial-volume transition width (mm): a sigmoid with this width blurs an edge over ~1 voxel."""
        return 0.4 * max(self.spacing)


@dataclass(frozen=True)
class _Tissues:
    """Soft tissue fractions inside the brain (white matter is the remainder) and the hard brain mask."""

    brain: _Array  # bool
    csf: _Array
    gm: _Array


@dataclass(frozen=True)
class _Tumour:
    """Tumour compartments on a bounding box of the grid: soft fractions for the intensities, labels."""

    box: tuple[slice, slice, slice]
    necrosis: _Array  # soft fraction
    core: _Array  # soft fraction of necrosis + enhancing rim
    edema: _Array  # soft fraction
    labels: _Array  # uint8 BraTS labels
    texture: _Array  # smooth field in [-1, 1] for intratumoural heterogeneity


def make_phantom(
    shape: Sequence[int] = BRATS_SHAPE, seed: int = 0, spacing: Sequence[float] = (1.0, 1.0, 1.0)
) -> PhantomCase:
    """Generate a BraTS-like case.

    ``shape`` and ``spacing`` are in SimpleITK order (x, y, z); every edge must be at least
    :data:`MIN_EDGE` voxels. The brain and tumour scale with the field of view, so small grids (e.g.
    48×48×32) still contain all three tumour labels.
    """
    size_xyz, spacing_xyz = _validate(shape, spacing)
    rng = np.random.default_rng(seed)
    grid = _make_grid(size_xyz, spacing_xyz)
    radii = _Radii(*(0.5 * grid.extent * np.array([0.80, 0.74, 0.60])).tolist())
    tissues = _tissues(rng, grid, radii)
    tumour = _tumour(rng, grid, radii, tissues)
    texture = _smooth_field(rng, grid, cells=24)
    images = {}
    for name in MODALITIES:
        volume = _channel(rng, grid, CONTRASTS[name], tissues, tumour, texture)
        images[name] = _to_image(volume, grid)
    seg = np.zeros(grid.shape, dtype=np.uint8)
    seg[tumour.box] = tumour.labels
    return PhantomCase(images=images, seg=_to_image(seg, grid))


def write_brats_case(case: PhantomCase, out_dir: Path, case_id: str) -> dict[str, Path]:
    """Write ``<out_dir>/<case_id>/<case_id>-{t2w,t2f,t1n,t1c,seg}.nii.gz`` (BraTS 2023 naming).

    Each file is written to a temporary name in the same folder and renamed into place, so a reader
    (or an interrupted run) never sees a half-written NIfTI. Returns the paths keyed by channel / "seg".
    """
    if not case_id or Path(case_id).name != case_id:
        raise PhantomError(f"case_id must be a plain folder name, got {case_id!r}")
    case_dir = Path(out_dir) / case_id
    case_dir.mkdir(parents=True, exist_ok=True)
    items = [*((name, case.images[name]) for name in MODALITIES), ("seg", case.seg)]
    paths = {}
    for key, image in items:
        paths[key] = case_dir / f"{case_id}-{key}.nii.gz"
        write_image_atomic(image, paths[key], what="phantom image")
    return paths


def _validate(shape: Sequence[int], spacing: Sequence[float]) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Reject grids on which the tumour compartments could not be resolved."""
    size = tuple(int(s) for s in shape)
    step = tuple(float(s) for s in spacing)
    if len(size) != 3 or min(size) < MIN_EDGE:
        raise PhantomError(f"phantom shape must be 3 edges of at least {MIN_EDGE} voxels (x, y, z), got {shape}")
    if len(step) != 3 or not all(np.isfinite(step)) or min(step) <= 0:
        raise PhantomError(f"phantom spacing must be 3 positive numbers in mm (x, y, z), got {spacing}")
    return size, step


def _make_grid(size_xyz: Sequence[int], spacing_xyz: Sequence[float]) -> _Grid:
    shape = (size_xyz[2], size_xyz[1], size_xyz[0])
    spacing = (spacing_xyz[2], spacing_xyz[1], spacing_xyz[0])
    axes = [((np.arange(n) - (n - 1) / 2.0) * s).astype(np.float32) for n, s in zip(shape, spacing)]
    return _Grid(
        shape=shape,
        spacing=spacing,
        z=axes[0].reshape(-1, 1, 1),
        y=axes[1].reshape(1, -1, 1),
        x=axes[2].reshape(1, 1, -1),
    )


def _smooth_field(rng: np.random.Generator, grid: _Grid, cells: int) -> _Array:
    """Smooth random field in [−1, 1] with about ``cells`` lobes along the longest physical axis.

    Random values on a coarse lattice are cubic-spline refined (up to 4×, at most 64 nodes per axis)
    and then linearly interpolated to the grid: a few array passes instead of a full-size filter.
    """
    extent = grid.extent
    lattice = tuple(max(2, round(cells * e / extent.max())) + 1 for e in extent)
    coarse = rng.standard_normal(lattice)
    factors = [min(4.0, n / m, 64.0 / m) for n, m in zip(grid.shape, lattice)]
    refined = ndimage.zoom(coarse, factors, order=3, mode="nearest").astype(np.float32)
    field = _resize_linear(refined, grid.shape)
    field /= max(float(np.abs(field).max()), 1e-6)
    return field


def _resize_linear(array: _Array, shape: Sequence[int]) -> _Array:
    """Separable linear interpolation with aligned corners, one axis at a time (small axes first)."""
    for axis, n in enumerate(shape):
        m = array.shape[axis]
        pos = np.linspace(0.0, m - 1, n)
        lo_idx = np.minimum(pos.astype(np.intp), m - 2)
        weight = (pos - lo_idx).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(3)])
        lo = np.take(array, lo_idx, axis=axis)
        hi = np.take(array, lo_idx + 1, axis=axis)
        hi -= lo
        hi *= weight
        lo += hi
        array = lo
    return array


def _sigmoid(x: _Array) -> _Array:
    """Logistic function, computed in place on a float32 temporary (clipped so exp cannot overflow)."""
    np.clip(x, -60.0, 60.0, out=x)
    np.negative(x, out=x)
    np.exp(x, out=x)
    x += 1.0
    np.reciprocal(x, out=x)
    return x


def _tissues(rng: np.random.Generator, grid: _Grid, radii: _Radii) -> _Tissues:
    """Deformed ellipsoidal brain: sulcal CSF shell, folded cortical ribbon, white matter, ventricles."""
    rz, ry, rx = radii
    v = grid.y / ry
    u = grid.x / (rx * (1.0 + 0.07 * np.clip(v, -1.0, 1.0)))  # wider posteriorly, like a real brain
    w = grid.z / rz
    level = np.sqrt(u * u + v * v + w * w)
    level *= 1.0 + 0.05 * _smooth_field(rng, grid, cells=5)  # brain surface at level == 1
    brain = level < 1.0
    folding = _smooth_field(rng, grid, cells=18)
    r_mean = float(np.cbrt(rz * ry * rx))
    width = grid.pv_width / r_mean
    csf = _sigmoid((level - 0.965) / width)
    gm_inner = 1.0 - 0.035 - 0.08 * (1.0 + 0.8 * folding)  # cortical ribbon of varying thickness
    gm = _sigmoid((level - gm_inner) / width)
    gm -= csf
    ventricles = _ventricles(rng, grid, radii)
    ventricles *= 1.0 - csf - gm  # ventricles displace white matter only
    csf += ventricles
    return _Tissues(brain=brain, csf=csf, gm=gm)


def _ventricles(rng: np.random.Generator, grid: _Grid, radii: _Radii) -> _Array:
    """Soft fraction of two elongated lateral ventricles beside the midline."""
    rz, ry, rx = radii
    semi = (np.array([0.16 * rz, 0.33 * ry, 0.07 * rx]) * rng.uniform(0.85, 1.15, size=3)).tolist()
    level = None
    for side in (-1.0, 1.0):
        dz = (grid.z - 0.10 * rz) / semi[0]
        dy = (grid.y + 0.05 * ry) / semi[1]
        dx = (grid.x - side * 0.13 * rx) / semi[2]
        one = np.sqrt(dz * dz + dy * dy + dx * dx)
        level = one if level is None else np.minimum(level, one)
    return _sigmoid((1.0 - level) * (float(np.cbrt(np.prod(semi))) / grid.pv_width))


def _tumour(rng: np.random.Generator, grid: _Grid, radii: _Radii, tissues: _Tissues) -> _Tumour:
    """Place a union of deformed blobs inside the brain and derive necrosis, rim and oedema from it.

    The blob union is a signed distance (mm, negative inside), so the enhancing rim and the oedema have
    a thickness in mm that does not depend on blob size; the labels use the same fields as the
    intensities. Everything is computed on a box around the tumour only.
    """
    step = float(np.cbrt(np.prod(grid.spacing)))  # floors in voxels, also for anisotropic grids
    r_min = min(radii)
    radius = float(np.clip(rng.uniform(0.2, 0.4) * r_min, 5.5 * step, 0.5 * r_min))
    rim = float(np.clip(rng.uniform(0.2, 0.4) * radius, 1.8 * step, 0.4 * radius))
    edema_depth = max(3.0 * step, rng.uniform(0.3, 0.7) * radius)
    blobs = _draw_blobs(rng, radius, with_satellites=radius < 0.3 * r_min)
    reach = max(float(np.linalg.norm(b.offset) + b.semi.max()) for b in blobs) * 1.2
    centre = _tumour_centre(rng, radii, reach)
    box = _box(grid, centre, reach + 1.5 * edema_depth + 2.0 * max(grid.spacing))
    sub = _sub_grid(grid, box, centre)
    dist = _blob_distance(sub, blobs)
    dist += 0.2 * radius * _smooth_field(rng, sub, cells=5)  # lumpy outline
    edema_dist = dist + 0.5 * edema_depth * _smooth_field(rng, sub, cells=7)  # finger-like oedema
    brain, csf, gm = tissues.brain[box], tissues.csf[box], tissues.gm[box]
    edema_limit = edema_depth * (1.0 - 0.3 * gm)  # oedema spreads less through cortex
    width = grid.pv_width
    core = _sigmoid(-dist / width)
    necrosis = _sigmoid((-rim - dist) / width)
    edema = _sigmoid((edema_limit - edema_dist) / (2.0 * width))
    edema *= 1.0 - csf
    labels = np.zeros(dist.shape, dtype=np.uint8)
    labels[(edema_dist < edema_limit) & (csf < 0.5)] = LABEL_EDEMA
    labels[dist < 0] = LABEL_ENHANCING
    labels[dist < -rim] = LABEL_NECROSIS
    labels[~brain] = 0
    texture = _smooth_field(rng, sub, cells=10)
    return _Tumour(box=box, necrosis=necrosis, core=core, edema=edema, labels=labels, texture=texture)


class _Blob(NamedTuple):
    """Rotated ellipsoid: centre offset from the tumour centre (mm, z y x), semi-axes (mm), rotation."""

    offset: _Array
    semi: _Array
    rotation: _Array


def _draw_blobs(rng: np.random.Generator, radius: float, with_satellites: bool) -> list[_Blob]:
    """A main ellipsoid plus up to two smaller overlapping satellites for an irregular outline."""
    blobs = [_Blob(np.zeros(3), radius * rng.uniform(0.8, 1.25, size=3), _random_rotation(rng))]
    for _ in range(int(rng.integers(0, 3)) if with_satellites else 0):
        direction = rng.standard_normal(3)
        offset = direction / np.linalg.norm(direction) * radius * rng.uniform(0.5, 0.8)
        blobs.append(_Blob(offset, radius * rng.uniform(0.45, 0.7, size=3), _random_rotation(rng)))
    return blobs


def _random_rotation(rng: np.random.Generator) -> _Array:
    """Uniformly distributed 3-D rotation (QR of a Gaussian matrix with the sign ambiguity removed)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q *= np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1.0
    return q


def _blob_distance(sub: _Grid, blobs: Sequence[_Blob]) -> _Array:
    """Approximate signed distance (mm) to the union of the blobs: (ellipsoid level − 1) × mean radius."""
    dist = None
    for blob in blobs:
        offset, semi, rot = blob.offset.tolist(), blob.semi.tolist(), blob.rotation.tolist()
        rel = (sub.z - offset[0], sub.y - offset[1], sub.x - offset[2])
        level = None
        for k in range(3):
            local = rel[0] * rot[0][k] + rel[1] * rot[1][k] + rel[2] * rot[2][k]
            local = (local / semi[k]) ** 2
            level = local if level is None else level + local
        one = (np.sqrt(level) - 1.0) * float(np.cbrt(np.prod(blob.semi)))
        dist = one if dist is None else np.minimum(dist, one)
    return dist


def _tumour_centre(rng: np.random.Generator, radii: _Radii, reach: float) -> _Array:
    """Random centre (mm, z y x) deep enough that the tumour core (within ``reach``) stays in the brain."""
    depth = max(0.0, 0.85 - reach / min(radii))
    direction = rng.standard_normal(3)
    direction /= np.linalg.norm(direction)
    return direction * depth * np.cbrt(rng.uniform()) * np.array(radii)


def _box(grid: _Grid, centre: _Array, half: float) -> tuple[slice, slice, slice]:
    """Index box of the grid covering ``centre ± half`` mm (clipped to the grid)."""
    out = []
    for axis, coords in zip(range(3), (grid.z.ravel(), grid.y.ravel(), grid.x.ravel())):
        lo = int(np.searchsorted(coords, centre[axis] - half))
        hi = int(np.searchsorted(coords, centre[axis] + half, side="right"))
        out.append(slice(max(lo, 0), min(max(hi, lo + 1), grid.shape[axis])))
    return out[0], out[1], out[2]


def _sub_grid(grid: _Grid, box: tuple[slice, slice, slice], centre: _Array) -> _Grid:
    """The part of ``grid`` inside ``box`` with coordinates relative to ``centre`` (mm, z y x)."""
    z, y, x = grid.z[box[0]], grid.y[:, box[1]], grid.x[:, :, box[2]]
    return _Grid(
        shape=(z.shape[0], y.shape[1], x.shape[2]),
        spacing=grid.spacing,
        z=z - np.float32(centre[0]),
        y=y - np.float32(centre[1]),
        x=x - np.float32(centre[2]),
    )


def _channel(
    rng: np.random.Generator,
    grid: _Grid,
    contrast: TissueContrast,
    tissues: _Tissues,
    tumour: _Tumour,
    texture: _Array,
) -> _Array:
    """Compose one channel: tissue mixture, tumour, bias field, Rician noise, zero outside the brain."""
    jitter = rng.uniform(0.95, 1.05, size=6) * rng.uniform(0.8, 1.25)  # per-tissue and per-scan scale
    c = TissueContrast(*(np.asarray(contrast) * jitter))
    image = tissues.csf * np.float32(c.csf - c.wm)
    image += tissues.gm * np.float32(c.gm - c.wm)
    image += np.float32(c.wm)
    image *= 1.0 + 0.03 * texture
    view = image[tumour.box]
    view += tumour.edema * (np.float32(c.edema) * (1.0 + 0.06 * tumour.texture) - view)
    lesion = tumour.necrosis * np.float32(c.necrosis) + (tumour.core - tumour.necrosis) * np.float32(
        c.enhancing
    )
    view *= 1.0 - tumour.core
    view += lesion * (1.0 + 0.10 * tumour.texture)
    image *= _bias_field(rng, grid)
    image = _rician(rng, image, sigma=0.03 * c.wm)
    image[~tissues.brain] = 0.0
    return image


def _bias_field(rng: np.random.Generator, grid: _Grid) -> _Array:
    """Smooth multiplicative bias: exp of a random quadratic polynomial (±~20 % across the brain).

    Every term is at most 2-D, so only the final exp touches the full 3-D grid.
    """
    hz, hy, hx = (float(e) / 2.0 for e in grid.extent)
    z, y, x = grid.z / hz, grid.y / hy, grid.x / hx
    a = rng.normal(0.0, 0.08, size=9).astype(np.float32)
    log_bias = (a[0] * z + a[1] * z * z) + (a[2] * y + a[3] * y * y + a[4] * x + a[5] * x * x + a[6] * x * y)
    log_bias = log_bias + (a[7] * z * y + a[8] * z * x)
    return np.exp(log_bias, out=log_bias)


def _rician(rng: np.random.Generator, image: _Array, sigma: float) -> _Array:
    """Magnitude of the signal plus complex Gaussian noise, as in magnitude MR images."""
    real = rng.standard_normal(image.shape, dtype=np.float32)
    real *= np.float32(sigma)
    real += image
    imag = rng.standard_normal(image.shape, dtype=np.float32)
    imag *= np.float32(sigma)
    np.square(real, out=real)
    np.square(imag, out=imag)
    real += imag
    return np.sqrt(real, out=real)


def _to_image(array: _Array, grid: _Grid) -> sitk.Image:
    """Wrap a (z, y, x) array with BraTS geometry: identity direction, origin (0, −(ny−1)·sy, 0)."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((grid.spacing[2], grid.spacing[1], grid.spacing[0]))
    image.SetOrigin((0.0, -(grid.shape[1] - 1) * grid.spacing[1], 0.0))
    image.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    return image


def sample_case(
    cache: str | os.PathLike[str] | None = None, seed: int = 0, shape: Sequence[int] = BRATS_SHAPE
) -> dict[str, Path]:
    """A synthetic BraTS-like case in the cache, generated on first use and reused afterwards.

    Returns the paths of ``t2w``, ``t2f``, ``t1n``, ``t1c`` and ``seg`` (the phantom's own labels).
    A case is reused only when all five files exist; each file is written atomically, so an
    interrupted generation is simply redone. Qt-free, so the Slicer Sample Data module can call it.
    """
    size = tuple(int(s) for s in shape)
    root = cache_dir(cache) / "samples" / "x".join(map(str, size))
    case_id = f"Phantom-{seed:05d}"
    expected = {key: root / case_id / f"{case_id}-{key}.nii.gz" for key in (*MODALITIES, "seg")}
    if all(path.is_file() for path in expected.values()):
        return expected
    return write_brats_case(make_phantom(shape=size, seed=seed), root, case_id)

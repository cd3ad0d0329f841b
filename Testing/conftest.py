"""Shared fixtures: a fresh headless MRML scene (slicer-core) per test, an awkward label-map grid, a fake libc."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from allocator_fakes import FakeLibc
from SegMambaSlicerLib.engine import devices
from SegMambaSlicerLib.evaluation.phantom import make_phantom, write_brats_case
from SegMambaSlicerLib.models.cache import ENV_VAR
from toy_models import write_tiny_brats_card


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never touch the user's cache folder (weights checksums, imports, samples)."""
    monkeypatch.setenv(ENV_VAR, str(tmp_path_factory.getbasetemp() / "segmamba-home"))


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh cache folder of this test's own, selected through the environment variable."""
    folder = tmp_path / "home"
    monkeypatch.setenv(ENV_VAR, str(folder))
    return folder


@pytest.fixture
def mrml_scene():
    """A fresh slicer-core scene with volumes/segmentations logics; skipped when slicer-core is absent."""
    slicer = pytest.importorskip(
        "slicer", reason="slicer-core (real MRML without the application) is not installed"
    )
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("the installed 'slicer' package is not slicer-core")
    from SegMambaSlicerLib.slicer.mrml import headless_scene

    with headless_scene() as headless:
        yield headless


def _rotation(angles: tuple[float, float, float]) -> np.ndarray:
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


@pytest.fixture
def oblique_labelmap() -> sitk.Image:
    """Label map (values 0, 1, 3 and a stray 7) on an oblique, left-handed (flipped), anisotropic grid.

    Label 2 is deliberately absent so that empty segments are exercised; the asymmetric
    blocks make any axis swap or flip visible.
    """
    array = np.zeros((7, 9, 11), dtype=np.uint8)  # (k, j, i)
    array[1:4, 2:7, 1:5] = 1
    array[4:6, 1:3, 6:10] = 3
    array[2, 7, 9] = 3
    array[6, 0, 0] = 7
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.7, 1.3, 2.9))
    image.SetOrigin((12.5, -30.25, 41.0))
    direction = _rotation((0.3, -0.2, 0.5)) @ np.diag([1.0, -1.0, 1.0])
    image.SetDirection(direction.ravel().tolist())
    return image


@pytest.fixture
def fake_libc(monkeypatch: pytest.MonkeyPatch) -> FakeLibc:
    """Allocator settings are recorded, not applied (see allocator_fakes.py)."""
    libc = FakeLibc()
    monkeypatch.setattr(devices, "_glibc", lambda: libc)
    return libc


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread (``pytestmark = pytest.mark.usefixtures("one_thread")`` in numeric test modules).

    On a shared 2-core machine a busy second core makes 2-thread runs 5-10x slower.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def card_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The BraTS card with a tiny SegMamba V1, 32³ windows and seeded random weights saved beside it."""
    return write_tiny_brats_card(tmp_path_factory.mktemp("model"))


@pytest.fixture
def case(tmp_path: Path) -> dict[str, Path]:
    """A 40 x 36 x 24 phantom case in the BraTS 2023 layout (t2w, t2f, t1n, t1c, seg), seed 1."""
    return write_brats_case(make_phantom(shape=(40, 36, 24), seed=1), tmp_path / "in", "Case")

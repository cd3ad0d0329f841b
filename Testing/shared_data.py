"""Paths to ../shared (official facts and fixtures) for tests, skipping cleanly where it is absent."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURES = SHARED / "fixtures"
LISTINGS = SHARED / "reference" / "state_dicts"
#: Relative tolerance of the per-tensor float64 sums of regenerated recipe weights. The recipe calls
#: float32 ``torch.log``/``exp``, whose last bit differs between CPU vector paths (AVX2 vs AVX-512): on
#: an AVX-512 Xeon the sums of the ``A_log`` tensors differ by ~4e-9 relative from the stored ones. A
#: wrong recipe (other seed, key or shape) changes a sum by many orders of magnitude more.
RECIPE_SUM_RTOL = 1e-6


def require(path: Path) -> Path:
    """``path`` if it exists, else skip the test with the reason."""
    if not path.exists():
        pytest.skip(f"{path} not found (needs the shared reference folder beside the checkout)")
    return path


def read_listing(name: str) -> list[tuple[str, tuple[int, ...]]]:
    """Official ``key<TAB>shape`` state-dict listing as (key, shape) pairs, in official order."""
    rows = []
    for line in require(LISTINGS / name).read_text(encoding="utf-8").splitlines():
        key, shape = line.split("\t")[:2]
        rows.append((key, tuple(ast.literal_eval(shape))))
    return rows


def fixture_weights() -> ModuleType:
    """The shared fixtures' weight recipe module (``fixture_state_dict``, ``fixture_input``)."""
    path = require(FIXTURES / "fixture_weights.py")
    spec = importlib.util.spec_from_file_location("fixture_weights", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

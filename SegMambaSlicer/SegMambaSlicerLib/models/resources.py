"""Locate the extension's Resources folder (model cards, demo weights, icons).

In the source tree and in a Slicer install the Lib sits beside ``Resources/``; a pip
wheel ships the same files as the ``SegMambaSlicerLib._resources`` package.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from ..errors import SegMambaError


class ResourcesNotFoundError(SegMambaError, FileNotFoundError):
    """The Resources folder (built-in model cards, icons) is missing: a broken install or checkout."""


@cache
def resources_dir() -> Path:
    """Return the folder holding ``Models/``, ``Icons/`` and ``UI/``."""
    lib = Path(__file__).resolve().parents[1]  # SegMambaSlicerLib
    for candidate in (lib.parent / "Resources", lib / "_resources"):
        if (candidate / "Models").is_dir():
            return candidate
    raise ResourcesNotFoundError(
        f"The SegMambaSlicer resources (model cards) are not next to {lib}; reinstall the extension or package."
    )


def models_dir() -> Path:
    """Folder with the built-in model cards (``*.json``) and shipped weights."""
    return resources_dir() / "Models"

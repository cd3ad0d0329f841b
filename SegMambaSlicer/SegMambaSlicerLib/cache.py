"""The per-user cache folder: imported and downloaded model weights, user model cards, sample data.

Weights are hundreds of megabytes and must survive reinstalling or upgrading Slicer and this extension,
so they live outside any install, in one folder per user. Its location is, first match wins: the
folder the caller passes (the Slicer module passes its setting), the ``SEGMAMBA_SLICER_HOME``
environment variable, then the platform's usual per-user cache folder. Layout::

    <cache>/models/<id>/card.json      user model cards, next to their weights
    <cache>/weights/<sha256>.pt        weights downloaded for cards that name a URL and checksum
    <cache>/samples/<X>x<Y>x<Z>/...    generated sample cases
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

ENV_VAR = "SEGMAMBA_SLICER_HOME"
APP_FOLDER = "segmamba-slicer"
#: BraTS 2023 grid (x, y, z) of the sample case.
BRATS_SHAPE: tuple[int, int, int] = (240, 240, 155)


def default_cache_dir(platform: str | None = None, env: Mapping[str, str] | None = None) -> Path:
    """The platform's per-user cache location (arguments exist so every platform's rule can be tested).

    Linux and other Unix: ``$XDG_CACHE_HOME/segmamba-slicer`` or ``~/.cache/segmamba-slicer``;
    macOS: ``~/Library/Caches/segmamba-slicer``; Windows: ``%LOCALAPPDATA%\\segmamba-slicer``.
    """
    platform = sys.platform if platform is None else platform
    env = os.environ if env is None else env
    if platform.startswith("win"):
        base = env.get("LOCALAPPDATA")
        return (Path(base) if base else Path.home() / "AppData" / "Local") / APP_FOLDER
    if platform == "darwin":
        return Path.home() / "Library" / "Caches" / APP_FOLDER
    xdg = env.get("XDG_CACHE_HOME")
    # The XDG spec says relative paths are invalid and must be ignored.
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / APP_FOLDER


def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder to use: ``override`` (if not empty), else ``$SEGMAMBA_SLICER_HOME``, else the default.

    An empty ``override`` counts as unset because Qt settings return "" for a setting never saved.
    The folder is not created here; writers create what they need.
    """
    for candidate in (override, os.environ.get(ENV_VAR)):
        if candidate is not None and str(candidate).strip():
            return Path(candidate).expanduser().absolute()
    return default_cache_dir()


def user_models_dir(cache: str | os.PathLike[str] | None = None) -> Path:
    """Folder holding one sub-folder per user model (``<id>/card.json`` and its weights)."""
    return cache_dir(cache) / "models"


def downloaded_weights_path(sha256: str, cache: str | os.PathLike[str] | None = None) -> Path:
    """Where weights with this SHA-256 are kept once downloaded (named by content, so never stale)."""
    return cache_dir(cache) / "weights" / f"{sha256.strip().lower()}.pt"


def sample_case(
    cache: str | os.PathLike[str] | None = None, seed: int = 0, shape: Sequence[int] = BRATS_SHAPE
) -> dict[str, Path]:
    """A synthetic BraTS-like case in the cache, generated on first use and reused afterwards.

    Returns the paths of ``t2w``, ``t2f``, ``t1n``, ``t1c`` and ``seg`` (the phantom's own labels).
    A case is reused only when all five files exist; each file is written atomically, so an
    interrupted generation is simply redone. Qt-free, so the Slicer Sample Data module can call it.
    """
    from .phantom import MODALITIES, make_phantom, write_brats_case

    size = tuple(int(s) for s in shape)
    root = cache_dir(cache) / "samples" / "x".join(map(str, size))
    case_id = f"Phantom-{seed:05d}"
    expected = {key: root / case_id / f"{case_id}-{key}.nii.gz" for key in (*MODALITIES, "seg")}
    if all(path.is_file() for path in expected.values()):
        return expected
    return write_brats_case(make_phantom(shape=size, seed=seed), root, case_id)

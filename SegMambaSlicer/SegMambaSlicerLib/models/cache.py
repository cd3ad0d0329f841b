"""The per-user cache folder: imported and downloaded model weights, user model cards, sample data.

Weights are hundreds of megabytes and must survive reinstalling or upgrading Slicer and this extension,
so they live outside any install, in one folder per user. Its location is, first match wins: the
folder the caller passes (the Slicer module passes its setting), the ``SEGMAMBA_SLICER_HOME``
environment variable, then the platform's usual per-user cache folder. Layout::

    <cache>/models/<id>/card.json      user model cards, next to their weights
    <cache>/weights/<sha256>.pt        weights downloaded for cards that name a URL and checksum
    <cache>/verified-weights.json      SHA-256 of weights files already hashed, by path, size and mtime
    <cache>/samples/<X>x<Y>x<Z>/...    generated sample cases (evaluation.phantom.sample_case)
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ModelCardError
from ..io.atomic import OutputError, write_text_atomic
from .downloads import is_sha256, sha256_file

ENV_VAR = "SEGMAMBA_SLICER_HOME"
APP_FOLDER = "segmamba-slicer"
VERIFIED_FILE = "verified-weights.json"


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
    """Where weights with this SHA-256 are kept once downloaded (named by content, so never stale).

    The checksum becomes a file name, so anything but 64 hexadecimal characters (``../x``) is refused.
    """
    if not is_sha256(sha256):
        raise ModelCardError(
            f"{sha256!r} is not a SHA-256 checksum (64 hexadecimal characters); fix the weights sha256 in the "
            "model card."
        )
    return cache_dir(cache) / "weights" / f"{sha256.lower()}.pt"


def file_sha256(path: Path, cache: str | os.PathLike[str] | None = None) -> str:
    """SHA-256 of a weights file, hashed once per version of the file.

    Hashing hundreds of megabytes before every run would be slow, so the result is remembered in
    ``<cache>/verified-weights.json`` under the file's resolved path, size and mtime; any change to the
    file changes one of those and the file is hashed again. Raises OSError when the file cannot be read.
    """
    resolved = path.resolve()
    before = resolved.stat()
    entry = _read_hashes(cache).get(str(resolved))
    if entry is not None and (entry["size"], entry["mtime_ns"]) == (before.st_size, before.st_mtime_ns):
        return entry["sha256"].lower()
    digest = sha256_file(resolved)
    after = resolved.stat()
    if (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns):  # not rewritten meanwhile
        remember_sha256(resolved, digest, cache)
    return digest


def remember_sha256(path: Path, sha256: str, cache: str | os.PathLike[str] | None = None) -> None:
    """Record the SHA-256 of a file just hashed (e.g. while importing or downloading it).

    The cache is only a shortcut: when its folder cannot be written nothing is recorded and the
    file is simply hashed again next time. The record is replaced atomically, and records of files
    that no longer exist are dropped.
    """
    resolved = path.resolve()
    with contextlib.suppress(OSError, OutputError):
        stat = resolved.stat()
        hashes = {name: entry for name, entry in _read_hashes(cache).items() if Path(name).is_file()}
        hashes[str(resolved)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256.lower()}
        write_text_atomic(cache_dir(cache) / VERIFIED_FILE, json.dumps(hashes, indent=1), what="checksum record")


def _read_hashes(cache: str | os.PathLike[str] | None) -> dict[str, dict[str, Any]]:
    """The recorded hashes; a missing, unreadable or damaged record counts as empty."""
    try:
        data = json.loads((cache_dir(cache) / VERIFIED_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {
        name: entry for name, entry in data.items()
        if isinstance(entry, dict) and set(entry) == {"size", "mtime_ns", "sha256"} and is_sha256(entry["sha256"])
    }

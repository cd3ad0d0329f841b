"""Reading official checkpoints safely, checking weights against their card, matching them to our networks.

Checkpoints come from strangers, so they are only ever read with
``torch.load(weights_only=True)``: a file that needs arbitrary pickled code is refused.
Official files come in several wrappings (bare state dict, ``{"module": sd}``,
``{"state_dict": sd}``, DDP ``module.`` prefixes); all are unwrapped here, then loaded with
strict key matching and a readable summary when they do not fit. Weights whose card names a
SHA-256 are checked against it before they are read (:func:`verified_weights_path`).
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from .cache import file_sha256, user_models_dir
from .cards import ModelCard

StateDict = dict[str, torch.Tensor]

_WRAPPER_KEYS = ("state_dict", "module", "model", "network_weights")
_PREFIXES = ("module.", "_orig_mod.")
#: How torch's weights-only unpickler names a refused class or function (a dotted Python name).
_REFUSED_GLOBAL_RE = re.compile(r"GLOBAL (\S+) (?:was not an allowed global|whose module)")


class WeightsChangedError(CheckpointError):
    """A weights file differs from the SHA-256 its card names: changed, damaged or replaced after install."""


def read_checkpoint(path: str | Path, shown_as: str | Path | None = None) -> Any:
    """``torch.load`` with ``weights_only=True`` and errors a user can act on.

    ``shown_as`` is the name the user knows the file by (e.g. the file they import, rather than the
    staging copy that is read). Torch's own advice to load with ``weights_only=False`` is never passed
    on: that would run whatever code the file carries.
    """
    path = Path(path).expanduser()
    name = shown_as or path
    if not path.is_file():
        raise CheckpointError(f"Checkpoint file {name} does not exist.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise CheckpointError(f"Checkpoint file {name} cannot be read ({exc.strerror or exc}).") from None
    except Exception as exc:  # noqa: BLE001 - torch raises many types for files that are not checkpoints
        refused = _refused_global(exc)
        if refused is None:
            raise CheckpointError(
                f"{name} is not a readable PyTorch checkpoint (it may be damaged or not a checkpoint); copy or "
                "download it again, or choose the right file."
            ) from None
        raise CheckpointError(
            f"{name} contains Python objects ({refused}) that could run code when loaded, so it was refused "
            "(only plain tensors are accepted). Re-save it with torch.save(model.state_dict(), FILE) in the "
            "environment that trained it."
        ) from None


def _refused_global(exc: Exception) -> str | None:
    """The class or function a real pickle needs that the weights-only unpickler refused, if that is why.

    Other failures (random bytes, text, an empty or truncated file) are not refusals even when torch
    reports them as unpickling errors; a text file starting with "c" even yields a "GLOBAL" that is not
    a Python name.
    """
    if not isinstance(exc, pickle.UnpicklingError):
        return None
    match = _REFUSED_GLOBAL_RE.search(str(exc))
    if match is None or not all(part.isidentifier() for part in match.group(1).split(".")):
        return None
    return match.group(1)


def verified_weights_path(card: ModelCard, cache: str | os.PathLike[str] | None = None) -> Path | None:
    """The card's weights file, checked against the card's SHA-256 before anything reads it.

    Returns ``card.weights_path()`` unchanged when the card names no checksum or the file is absent
    (the reader reports a missing file). The hash is remembered per file version in the cache (see
    :func:`.cache.file_sha256`), so only the first run after a change pays for hashing. Weights a user
    passes explicitly (``--weights``) are not the card's and must not be checked with this.
    """
    path = card.weights_path()
    expected = card.weights.sha256
    if path is None or expected is None or not path.is_file():
        return path
    try:
        actual = file_sha256(path, cache)
    except OSError as exc:
        raise CheckpointError(f"The weights file {path} of {card.id} cannot be read ({exc.strerror or exc}).") from None
    if actual != expected.lower():
        raise WeightsChangedError(
            f"The weights file {path} has SHA-256 {actual} but the card of {card.id} expects {expected}: it was "
            f"changed or damaged after it was installed. {_restore_advice(card, path, cache)}"
        )
    return path


def _restore_advice(card: ModelCard, path: Path, cache: str | os.PathLike[str] | None) -> str:
    """How to get the right file back, by where the weights came from."""
    if card.weights.kind == "url" and card.weights.url:
        return f"Download it again with: segmamba-slicer models download {card.id}"
    if card.source_path is not None and card.source_path.parent.parent == user_models_dir(cache).resolve():
        return (f"Delete the folder {card.source_path.parent} and import the original checkpoint again with: "
                f"segmamba-slicer models import FILE --id {card.id}")
    return f"Reinstall the extension (or restore the original {path.name}) so that it matches the card."


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def extract_state_dict(obj: Any, source: str = "The checkpoint") -> StateDict:
    """Unwrap the official container formats and strip DDP / torch.compile prefixes.

    ``source`` starts the error message, so callers can name the file.
    """
    for _ in range(3):
        if _is_state_dict(obj):
            break
        if isinstance(obj, Mapping):
            inner = next((obj[k] for k in _WRAPPER_KEYS if k in obj), None)
            if inner is not None:
                obj = inner
                continue
        raise CheckpointError(
            f"{source} does not hold a network state dict (expected a dict of tensors, "
            "or one under 'state_dict', 'module' or 'network_weights')."
        )
    sd: StateDict = {}
    for key, value in obj.items():
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        sd[key] = value
    return _rename_legacy(sd)


def _rename_legacy(sd: StateDict) -> StateDict:
    """SegMamba once named its GSC list ``slice_attns`` (docs/models.md, "SegMamba V1 code history")."""
    if not any(k.startswith("vit.slice_attns.") for k in sd):
        return sd
    return {re.sub(r"^vit\.slice_attns\.", "vit.gscs.", k): v for k, v in sd.items()}


def load_state_dict_file(path: str | Path, shown_as: str | Path | None = None) -> StateDict:
    """Read a checkpoint file and return its plain state dict; errors name ``shown_as`` or ``path``."""
    return extract_state_dict(read_checkpoint(path, shown_as), source=str(shown_as or Path(path).expanduser()))


@dataclass
class KeyReport:
    """How a state dict differs from a network's expected keys and shapes."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self, limit: int = 5) -> str:
        parts = []
        for title, items in (("missing", self.missing), ("unexpected", self.unexpected)):
            if items:
                shown = ", ".join(items[:limit]) + (" ..." if len(items) > limit else "")
                parts.append(f"{len(items)} {title} keys ({shown})")
        if self.mismatched:
            shown = ", ".join(f"{k}: file {tuple(a)} vs network {tuple(b)}" for k, a, b in self.mismatched[:limit])
            parts.append(f"{len(self.mismatched)} keys with other shapes ({shown})")
        return "; ".join(parts)


def compare_keys(network: nn.Module, sd: Mapping[str, torch.Tensor]) -> KeyReport:
    """Compare a state dict with a network's own, key by key and shape by shape."""
    own = network.state_dict()
    report = KeyReport(
        missing=[k for k in own if k not in sd],
        unexpected=[k for k in sd if k not in own],
    )
    report.mismatched = [
        (k, tuple(sd[k].shape), tuple(v.shape)) for k, v in own.items() if k in sd and sd[k].shape != v.shape
    ]
    return report


def load_into(network: nn.Module, sd: Mapping[str, torch.Tensor], source: str = "checkpoint") -> nn.Module:
    """Strictly load ``sd`` into ``network`` or raise with a readable key/shape summary."""
    report = compare_keys(network, sd)
    if not report.ok:
        raise CheckpointError(
            f"The {source} does not fit the selected network: {report.summary()}. "
            "Choose the model that matches the checkpoint, or let the architecture be detected from the file."
        )
    network.load_state_dict(sd, strict=True)
    return network


@dataclass(frozen=True)
class DetectedArchitecture:
    """Architecture name and constructor arguments inferred from a state dict."""

    name: str
    kwargs: dict[str, Any]
    note: str = ""


def _count_blocks(sd: Mapping[str, torch.Tensor], pattern: str, stages: int) -> list[int]:
    rx = re.compile(pattern)
    found: dict[int, set[int]] = {i: set() for i in range(stages)}
    for key in sd:
        m = rx.match(key)
        if m:
            found[int(m.group(1))].add(int(m.group(2)))
    return [len(found[i]) for i in range(stages)]


def detect_architecture(sd: Mapping[str, torch.Tensor], source: str = "The checkpoint") -> DetectedArchitecture:
    """Recognise SegMamba V1 / V2 from keys and shapes and infer their constructor arguments.

    V1 with and without the 2024-06 Mamba-layer residual have identical keys; the current
    (residual) variant is assumed and the card or user may choose the other. ``source`` names the
    file in errors.
    """
    common = {
        "out_chans": int(sd["out.conv.conv.weight"].shape[0]) if "out.conv.conv.weight" in sd else None,
        "hidden_size": int(sd["encoder5.layer.conv1.conv.weight"].shape[0])
        if "encoder5.layer.conv1.conv.weight" in sd else None,
    }
    if "vit.stages.0.0.mamba.A_b_log" in sd and "vit.downsample_layers.0.0.weight" in sd:
        feats = [int(sd["vit.downsample_layers.0.0.weight"].shape[0])] + [
            int(sd[f"vit.downsample_layers.{i}.1.weight"].shape[0]) for i in (1, 2, 3)
        ]
        kwargs = dict(
            in_chans=int(sd["vit.downsample_layers.0.0.weight"].shape[1]),
            depths=_count_blocks(sd, r"vit\.stages\.(\d+)\.(\d+)\.norm\.weight$", 4),
            feat_size=feats,
            **common,
        )
        return DetectedArchitecture(
            "segmamba_v1", kwargs, note="SegMamba V1; keys cannot tell the pre-2024-06 no-residual variant apart"
        )
    if "vit.gscs.0.0.deep_path.0.block.0.weight" in sd:
        feats = [int(sd[f"vit.downsample_layers.{i}.0.weight"].shape[0]) for i in range(4)]
        kwargs = dict(
            in_chans=int(sd["encoder1.layer.conv1.conv.weight"].shape[1]),
            depths=_count_blocks(sd, r"vit\.gscs\.(\d+)\.(\d+)\.se\.fc\.0\.weight$", 4),
            feat_size=feats,
            **common,
        )
        return DetectedArchitecture("segmamba_v2", kwargs, note="SegMamba-V2")
    if any(k.startswith("encoder.encoder_layers.") for k in sd) and "encoder.stem.convs.0.conv.weight" in sd:
        raise CheckpointError(
            f"{source} looks like a MambaClinix (nnU-Net) checkpoint. Its network is defined by the training "
            "folder's plans.json and dataset.json: select the whole nnU-Net result folder instead of the .pth file."
        )
    raise CheckpointError(
        f"{source} is not a SegMamba, SegMamba-V2 or MambaClinix network (no known key pattern found)."
    )

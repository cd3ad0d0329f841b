"""Reading official checkpoints safely and matching them to our networks.

Checkpoints come from strangers, so they are only ever read with
``torch.load(weights_only=True)``: a file that needs arbitrary pickled code is refused.
Official files come in several wrappings (bare state dict, ``{"module": sd}``,
``{"state_dict": sd}``, DDP ``module.`` prefixes); all are unwrapped here, then loaded with
strict key matching and a readable summary when they do not fit.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError

StateDict = dict[str, torch.Tensor]

_WRAPPER_KEYS = ("state_dict", "module", "model", "network_weights")
_PREFIXES = ("module.", "_orig_mod.")


def read_checkpoint(path: str | Path) -> Any:
    """``torch.load`` with ``weights_only=True`` and errors a user can act on."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"Checkpoint file {path} does not exist.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path.name} contains Python objects that could run code when loaded, so it was refused "
            "(only plain tensors are accepted). Re-save it with torch.save(model.state_dict(), FILE) "
            f"in the environment that trained it. Details: {str(exc).splitlines()[0]}"
        ) from None
    except Exception as exc:  # noqa: BLE001 - torch raises many types for corrupt files
        raise CheckpointError(
            f"{path.name} is not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})."
        ) from None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def extract_state_dict(obj: Any) -> StateDict:
    """Unwrap the official container formats and strip DDP / torch.compile prefixes."""
    for _ in range(3):
        if _is_state_dict(obj):
            break
        if isinstance(obj, Mapping):
            inner = next((obj[k] for k in _WRAPPER_KEYS if k in obj), None)
            if inner is not None:
                obj = inner
                continue
        raise CheckpointError(
            "The checkpoint does not hold a network state dict (expected a dict of tensors, "
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
    """SegMamba briefly named its GSC list ``slice_attns``; the tensors are the same (MODELS.md §2.6)."""
    if not any(k.startswith("vit.slice_attns.") for k in sd):
        return sd
    return {re.sub(r"^vit\.slice_attns\.", "vit.gscs.", k): v for k, v in sd.items()}


def load_state_dict_file(path: str | Path) -> StateDict:
    """Read a checkpoint file and return its plain state dict."""
    return extract_state_dict(read_checkpoint(path))


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


def detect_architecture(sd: Mapping[str, torch.Tensor]) -> DetectedArchitecture:
    """Recognise SegMamba V1 / V2 from keys and shapes and infer their constructor arguments.

    V1 with and without the 2024-06 Mamba-layer residual have identical keys; the current
    (residual) variant is assumed and the card or user may choose the other.
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
            "This looks like a MambaClinix (nnU-Net) checkpoint. Its network is defined by the training "
            "folder's plans.json and dataset.json: select the whole nnU-Net result folder instead of the .pth file."
        )
    raise CheckpointError(
        "The checkpoint is not a SegMamba, SegMamba-V2 or MambaClinix network (no known key pattern found)."
    )

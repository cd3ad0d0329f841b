"""nnU-Net v2 result folders as MambaClinix models (docs/models.md, "nnU-Net result folders and checkpoints").

A model trained with the official MambaClinix code is an nnU-Net result folder
``<Trainer>__<Plans>__<configuration>/`` holding ``dataset.json``, ``plans.json`` and
``fold_N/checkpoint_final.pth`` (or ``checkpoint_best.pth``), often shared as a .zip. This module
recognises such a folder, reads its checkpoints without unpickling arbitrary objects, turns
dataset.json + plans.json into a model card and into nnU-Net's preprocessing settings, and builds
the fold ensemble.

A card for such a model uses preprocessing scheme ``"nnunet"``; its ``weights.file`` names the
result folder and its architecture kwargs select ``configuration``, ``folds`` and ``checkpoint``
inside it (the network itself is defined by the folder's plans). Such cards are JSON-serialisable,
so they can be stored like any other card.
"""

from __future__ import annotations

import colorsys
import json
import pickle
import shutil
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError, ModelCardError
from ..networks.mambaclinix import mambaclinix_from_plans, num_input_channels_of, resolve_configuration
from .cache import cache_dir, file_sha256
from .cards import ModelCard, card_from_dict
from .checkpoints import extract_state_dict, load_into

#: Preprocessing scheme of cards that run through nnU-Net's own pre- and post-processing.
NNUNET_SCHEME = "nnunet"

#: Normalisation schemes of nnU-Net v2's default_normalization_schemes, by their plans.json names.
NNUNET_NORMALIZATIONS = (
    "CTNormalization",
    "ZScoreNormalization",
    "NoNormalization",
    "RescaleTo01Normalization",
    "RGBTo01Normalization",
)


@dataclass(frozen=True)
class NnunetResampling:
    """The plans' keyword arguments of ``resample_data_or_seg_to_shape`` (data or probabilities)."""

    order: int = 3
    order_z: int = 0
    force_separate_z: bool | None = None
    anisotropy_threshold: float = 3.0


@dataclass(frozen=True)
class NnunetChannel:
    """How one input channel is normalised: scheme name, mask use, dataset foreground statistics."""

    scheme: str
    use_mask: bool = False
    intensity: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class NnunetSettings:
    """Everything nnU-Net's preprocessing and export read from plans.json for one configuration.

    ``spacing`` is the configuration's target spacing in transposed axis order; with ``regions``
    the network outputs one sigmoid channel per region instead of softmax classes.
    """

    transpose_forward: tuple[int, int, int]
    spacing: tuple[float, float, float]
    channels: tuple[NnunetChannel, ...]
    data_resampling: NnunetResampling = NnunetResampling()
    probabilities_resampling: NnunetResampling = NnunetResampling(order=1)
    regions: bool = False

    @property
    def transpose_backward(self) -> tuple[int, ...]:
        return tuple(int(i) for i in np.argsort(self.transpose_forward))


#: Trainers of the official MambaClinix fork; they all build the same network from the plans.
SUPPORTED_TRAINERS = (
    "nnUNetTrainerMambaClinix",
    "nnUNetTrainerMambaClinixTRS",
    "nnUNetTrainerMambaClinixTRS_500epochs",
)
#: Checkpoints nnU-Net writes at the end of training; the first one present in every fold is used.
CHECKPOINT_NAMES = ("checkpoint_final.pth", "checkpoint_best.pth")
#: nnU-Net image readers whose arrays are SimpleITK-ordered (z, y, x), which is what we feed.
SUPPORTED_READERS = ("SimpleITKIO", "NibabelIO")
_RESAMPLING_FUNCTION = "resample_data_or_seg_to_shape"
_JSON_FILES = ("dataset.json", "plans.json")
_SEARCH_DEPTH = 3
INTENDED_USE = "Research use only. Not a medical device; results must be reviewed by a qualified reader."


class NnunetModelError(ModelCardError):
    """A folder or zip is not a usable nnU-Net result folder (missing files, unsupported trainer or plans)."""


# ---------------------------------------------------------------- safe checkpoint reading


def _numpy_safe_globals() -> list[Any]:
    """numpy scalars and their dtypes, under the module names numpy 1.x and 2.x pickle them with.

    nnU-Net stores its training log and best EMA Dice as numpy floats; nothing else beyond tensors
    and plain Python values is needed, so nothing else is allowed.
    """
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core to numpy._core
    scalar = core.multiarray.scalar
    dtypes = [
        type(np.dtype(code))
        for code in ("?", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8")
    ]
    names = ("numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar")
    return [*((scalar, name) for name in names), np.dtype, *dtypes]


def read_nnunet_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` of an nnU-Net ``.pth``, allowing numpy scalars and nothing else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint file {path} does not exist.")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        try:
            found = ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(path)) or "unknown objects"
        except Exception:  # noqa: BLE001 - only used to improve the message
            found = "unknown objects"
        raise CheckpointError(
            f"{path} contains Python objects besides tensors and numbers ({found}); it was refused because "
            "loading them could run code. Official nnU-Net checkpoints hold only tensors, numpy numbers and "
            "plain values: re-export the file from the training environment."
        ) from None
    except Exception as exc:  # noqa: BLE001 - torch raises many types for corrupt files
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})."
        ) from None
    if not isinstance(checkpoint, Mapping) or "network_weights" not in checkpoint:
        raise CheckpointError(f"{path} is not an nnU-Net checkpoint (no 'network_weights' entry).")
    return dict(checkpoint)


# ---------------------------------------------------------------- finding the result folder


def _fold_checkpoints(folder: Path) -> dict[str, tuple[str, ...]]:
    """Fold name ('0', 'all', ...) → the checkpoint names present in ``fold_<name>``."""
    found: dict[str, tuple[str, ...]] = {}
    for sub in sorted(folder.glob("fold_*")):
        names = tuple(n for n in CHECKPOINT_NAMES if (sub / n).is_file())
        if sub.is_dir() and names:
            found[sub.name[len("fold_") :]] = names
    return found


def _is_result_folder(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _JSON_FILES) and bool(_fold_checkpoints(folder))


def _candidates(root: Path) -> list[Path]:
    """Result folders at ``root`` or up to three levels below (dataset folder, nnUNet_results, zip roots)."""
    found: list[Path] = []
    level = [root]
    for _ in range(_SEARCH_DEPTH + 1):
        found += [f for f in level if _is_result_folder(f)]
        if found:
            return found
        level = [sub for folder in level for sub in sorted(folder.iterdir()) if sub.is_dir()]
    return found


def is_nnunet_model(path: str | Path) -> bool:
    """True for a folder or .zip that should be opened as an nnU-Net model (cheap; no file is read)."""
    path = Path(path).expanduser()
    return path.is_dir() or (path.is_file() and path.suffix.lower() == ".zip")


def _wanted_member(name: str) -> bool:
    parts = PurePosixPath(name).parts
    if not parts:
        return False
    if parts[-1] in _JSON_FILES:
        return True
    return parts[-1] in CHECKPOINT_NAMES and len(parts) >= 2 and parts[-2].startswith("fold_")


def extract_model_zip(path: Path, cache: str | Path | None = None) -> Path:
    """Unpack the model files of an nnU-Net model .zip once into ``<cache>/nnunet/<sha256>``.

    Only dataset.json, plans.json and fold checkpoints are extracted; member names that are
    absolute or climb out with ``..`` are refused.
    """
    dest = cache_dir(cache) / "nnunet" / file_sha256(path, cache)[:16]  # hashed once per file version
    if dest.is_dir():
        return dest
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise NnunetModelError(f"{path} is not a readable .zip file ({exc}).") from None
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir() and _wanted_member(m.filename)]
        for member in members:
            pure = PurePosixPath(member.filename)
            if pure.is_absolute() or ".." in pure.parts or "\\" in member.filename:
                raise NnunetModelError(
                    f"{path} contains an unsafe file name {member.filename!r}; it was not unpacked."
                )
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest.parent))
        try:
            for member in members:
                archive.extract(member, staging)
            staging.rename(dest)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            if not dest.is_dir():
                raise
    return dest


def find_result_folder(path: str | Path, cache: str | Path | None = None) -> Path:
    """The nnU-Net result folder in ``path`` (the folder itself, a parent holding exactly one, or a .zip)."""
    path = Path(path).expanduser()
    if path.is_file() and path.suffix.lower() == ".zip":
        root = extract_model_zip(path, cache)
    elif path.is_dir():
        root = path
    else:
        raise NnunetModelError(
            f"{path} is neither a folder nor a .zip file. Give an nnU-Net result folder "
            "(<Trainer>__<Plans>__<configuration>) or a .zip of it."
        )
    found = _candidates(root)
    if len(found) == 1:
        return found[0]
    if found:
        listing = ", ".join(str(f.relative_to(root)) for f in found)
        raise NnunetModelError(
            f"{path} holds several nnU-Net models ({listing}); select one of these folders."
        )
    raise NnunetModelError(
        f"{path} is not an nnU-Net result folder: expected dataset.json, plans.json and "
        f"fold_N/{CHECKPOINT_NAMES[0]} (or {CHECKPOINT_NAMES[1]}). SegMamba and SegMamba-V2 weights are "
        "single .pt/.pth files; give the file instead."
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise NnunetModelError(f"Cannot read {path}: {exc}.") from None
    if not isinstance(data, dict):
        raise NnunetModelError(f"{path} does not hold a JSON object.")
    return data


# ---------------------------------------------------------------- folds and checkpoints


def select_folds(available: Sequence[str], requested: Sequence[str | int] | None = None) -> tuple[str, ...]:
    """The folds to ensemble: ``requested`` (checked), else every numbered fold, else ``all`` (as nnU-Net)."""
    if requested is not None:
        chosen = tuple(str(f) for f in requested)
        missing = [f for f in chosen if f not in available]
        if missing or not chosen:
            raise NnunetModelError(
                f"Fold(s) {', '.join(missing) or 'none'} requested but this model has folds: "
                f"{', '.join(available) or 'none'}."
            )
        return chosen
    numbered = tuple(sorted((f for f in available if f.isdigit()), key=int))
    return numbered or tuple(f for f in available if f == "all")


def choose_checkpoint(folder: Path, folds: Sequence[str], requested: str | None = None) -> str:
    """``requested`` or the first of checkpoint_final / checkpoint_best that every selected fold has."""
    have = _fold_checkpoints(folder)
    names = (requested,) if requested else CHECKPOINT_NAMES
    for name in names:
        if all(name in have.get(fold, ()) for fold in folds):
            return name
    raise NnunetModelError(
        f"Not every selected fold ({', '.join(folds)}) of {folder} has {' or '.join(names)}; "
        "finish training those folds or select the folds that have one."
    )


# ---------------------------------------------------------------- plans → settings


def _labels_have_regions(labels: Mapping[str, Any]) -> bool:
    return any(isinstance(v, (list, tuple)) and len(v) > 1 for v in labels.values())


def _resampling(config: Mapping[str, Any], which: str, default_order: int) -> NnunetResampling:
    function = config.get(f"resampling_fn_{which}", _RESAMPLING_FUNCTION)
    if function != _RESAMPLING_FUNCTION:
        raise NnunetModelError(
            f"plans.json uses resampling function {function!r} for {which}; only nnU-Net's default "
            f"{_RESAMPLING_FUNCTION!r} is supported."
        )
    kwargs = config.get(f"resampling_fn_{which}_kwargs") or {}
    force = kwargs.get("force_separate_z")
    return NnunetResampling(
        order=int(kwargs.get("order", default_order)),
        order_z=int(kwargs.get("order_z", 0)),
        force_separate_z=None if force is None else bool(force),
    )


def _channels(
    plans: Mapping[str, Any], config: Mapping[str, Any], n_channels: int
) -> tuple[NnunetChannel, ...]:
    schemes = list(config.get("normalization_schemes", []))
    masks = list(config.get("use_mask_for_norm", [False] * n_channels))
    if len(schemes) != n_channels or len(masks) != n_channels:
        raise NnunetModelError(
            f"plans.json lists {len(schemes)} normalisation schemes for {n_channels} input channels."
        )
    intensities = plans.get("foreground_intensity_properties_per_channel", {})
    channels = []
    for c, (scheme, use_mask) in enumerate(zip(schemes, masks)):
        if scheme not in NNUNET_NORMALIZATIONS:
            raise NnunetModelError(
                f"plans.json normalises channel {c} with {scheme!r}; "
                f"supported: {', '.join(NNUNET_NORMALIZATIONS)}."
            )
        props = {k: float(v) for k, v in intensities.get(str(c), {}).items()}
        needed = ("mean", "std", "percentile_00_5", "percentile_99_5")
        if scheme == "CTNormalization" and not all(k in props for k in needed):
            raise NnunetModelError(
                f"plans.json has no foreground intensity properties for CT channel {c} "
                f"(foreground_intensity_properties_per_channel[{str(c)!r}] needs {', '.join(needed)})."
            )
        channels.append(NnunetChannel(scheme=scheme, use_mask=bool(use_mask), intensity=props))
    return tuple(channels)


def settings_from_plans(
    plans: Mapping[str, Any], dataset_json: Mapping[str, Any], configuration: str
) -> NnunetSettings:
    """nnU-Net's preprocessing and export settings for one configuration, validated."""
    config = resolve_configuration(plans, configuration)
    if config.get("previous_stage"):
        raise NnunetModelError(
            f"Configuration {configuration!r} is the second stage of an nnU-Net cascade; "
            "cascades are not supported."
        )
    reader = dataset_json.get("overwrite_image_reader_writer") or plans.get(
        "image_reader_writer", "SimpleITKIO"
    )
    if reader not in SUPPORTED_READERS:
        raise NnunetModelError(
            f"This model reads its images with nnU-Net's {reader}; only {', '.join(SUPPORTED_READERS)} "
            "(the voxel order we reproduce) are supported."
        )
    transpose = [int(a) for a in plans.get("transpose_forward", (0, 1, 2))]
    spacing = [float(s) for s in config.get("spacing", ())]
    if sorted(transpose) != [0, 1, 2] or len(spacing) != 3 or len(config.get("patch_size", ())) != 3:
        raise NnunetModelError(
            f"Configuration {configuration!r} is not 3-D (transpose_forward {transpose}, spacing {spacing}); "
            "MambaClinix is 3-D only."
        )
    backward = plans.get("transpose_backward")
    if backward is not None and [int(a) for a in backward] != [int(a) for a in np.argsort(transpose)]:
        raise NnunetModelError(
            f"plans.json transpose_backward {backward} does not undo transpose_forward {transpose}."
        )
    labels = dataset_json.get("labels", {})
    return NnunetSettings(
        transpose_forward=tuple(transpose),  # type: ignore[arg-type]
        spacing=tuple(spacing),  # type: ignore[arg-type]
        channels=_channels(plans, config, num_input_channels_of(dataset_json)),
        data_resampling=_resampling(config, "data", 3),
        probabilities_resampling=_resampling(config, "probabilities", 1),
        regions=_labels_have_regions(labels),
    )


# ---------------------------------------------------------------- dataset.json → card


def _colour(index: int) -> tuple[float, float, float]:
    """Distinct, saturated colours by golden-ratio hue steps (deterministic per label index)."""
    hue = (0.08 + index * 0.618033988749895) % 1.0
    return tuple(round(c, 4) for c in colorsys.hsv_to_rgb(hue, 0.75, 0.95))  # type: ignore[return-value]


def _channels_data(dataset_json: Mapping[str, Any]) -> list[dict[str, Any]]:
    """nnU-Net files end in ``_0000``, ``_0001`` …: those are the keys; channel names label the selectors."""
    names = dataset_json.get("channel_names") or dataset_json.get("modality") or {}
    ordered = sorted(((int(k), str(v)) for k, v in names.items()), key=lambda kv: kv[0])
    return [{"key": f"{index:04d}", "display_name": name, "synonyms": [name]} for index, name in ordered]


def _labels_data(labels: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Softmax datasets: names from dataset.json; nnU-Net requires values 0 … K−1."""
    entries = sorted(((int(v), name) for name, v in labels.items() if name != "ignore" and int(v) != 0))
    values = [v for v, _ in entries]
    if values != list(range(1, len(values) + 1)):
        raise NnunetModelError(
            f"dataset.json labels must be consecutive integers from 0 (got {sorted(values)})."
        )
    return [{"value": v, "name": name, "color": _colour(i)} for i, (v, name) in enumerate(entries)]


def _regions_data(
    labels: Mapping[str, Any], class_order: Sequence[int] | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Region datasets: region ``k`` is painted with ``regions_class_order[k]``, later regions on top.

    A painted value therefore means "in this region but in no later one"; the label names say so,
    and each region is also offered as a derived region over the values painted inside it.
    """
    regions = [
        (name, {int(v) for v in (value if isinstance(value, (list, tuple)) else [value])})
        for name, value in labels.items()
        if name != "ignore"
    ]
    regions = [(name, members) for name, members in regions if members != {0}]
    if class_order is None or len(class_order) != len(regions):
        raise NnunetModelError(
            f"dataset.json defines {len(regions)} regions but regions_class_order is "
            f"{'missing' if class_order is None else list(class_order)}; nnU-Net needs one value per region."
        )
    painted = []
    for k, ((name, members), value) in enumerate(zip(regions, class_order)):
        later = [other for other, other_members in regions[k + 1 :] if other_members <= members]
        shown = f"{name} (excluding {', '.join(later)})" if later else name
        painted.append({"value": int(value), "name": shown, "color": _colour(k)})
    derived = [
        {
            "name": name,
            "labels": [int(v) for (_, m), v in zip(regions, class_order) if m <= members],
            "color": _colour(k),
        }
        for k, (name, members) in enumerate(regions)
    ]
    return painted, derived


def nnunet_card_data(
    plans: Mapping[str, Any],
    dataset_json: Mapping[str, Any],
    configuration: str,
    folder: Path,
    folds: Sequence[str],
    checkpoint: str,
    trainer: str = SUPPORTED_TRAINERS[0],
    mirror_axes: Sequence[int] | None = (0, 1, 2),
) -> dict[str, Any]:
    """The model-card JSON for one configuration of an nnU-Net result folder (plans validated).

    ``card_from_dict`` of it is the card (distinct label values and known regions checked as for any card).
    """
    settings = settings_from_plans(plans, dataset_json, configuration)
    config = resolve_configuration(plans, configuration)
    labels_json = dataset_json.get("labels", {})
    if settings.regions:
        labels, regions = _regions_data(labels_json, dataset_json.get("regions_class_order"))
    else:
        labels, regions = _labels_data(labels_json), []
    dataset = str(plans.get("dataset_name") or dataset_json.get("name") or folder.parent.name)
    plural = "s" if len(folds) > 1 else ""
    return {
        "schema": 1,
        "id": f"nnunet:{dataset}:{trainer}__{plans.get('plans_name', 'nnUNetPlans')}__{configuration}",
        "display_name": f"MambaClinix {dataset} ({configuration}, fold{plural} {', '.join(folds)})",
        "description": f"nnU-Net v2 model trained with {trainer} on {dataset}. "
        f"{dataset_json.get('description', '')}".strip(),
        "intended_use": INTENDED_USE,
        "architecture": {
            "name": "mambaclinix",
            "kwargs": {"configuration": configuration, "folds": list(folds), "checkpoint": checkpoint},
        },
        "channels": _channels_data(dataset_json),
        "labels": labels,
        "regions": regions,
        "preprocessing": {"scheme": NNUNET_SCHEME},
        "inference": {
            "roi_size": [int(v) for v in config["patch_size"]],
            "overlap": 0.5,
            "sw_batch_size": 1,
            "mirror_axes": [int(a) for a in mirror_axes] if mirror_axes else [],
            "output": "sigmoid_regions" if settings.regions else "softmax_labels",
        },
        "weights": {
            "kind": NNUNET_SCHEME,
            "file": str(folder),
            "instructions": "An nnU-Net result folder (dataset.json, plans.json, fold_N/checkpoint_*.pth).",
        },
    }


def _check_trainer(trainer: str, where: Path) -> None:
    if not trainer.startswith(SUPPORTED_TRAINERS[0]):
        raise NnunetModelError(
            f"{where} was trained with {trainer}. SegMambaSlicer runs nnU-Net models of the MambaClinix "
            f"trainers only ({', '.join(SUPPORTED_TRAINERS)}); use nnU-Net itself for other trainers."
        )


def card_for_nnunet_folder(
    path: str | Path,
    folds: Sequence[str | int] | None = None,
    checkpoint: str | None = None,
    cache: str | Path | None = None,
) -> ModelCard:
    """Recognise an nnU-Net result folder or .zip and describe it as a model card.

    Reads dataset.json, plans.json and the first selected fold's checkpoint (safely) for the trainer,
    configuration and mirroring axes; refuses trainers other than MambaClinix's.
    """
    folder = find_result_folder(path, cache)
    chosen = select_folds(tuple(_fold_checkpoints(folder)), folds)
    name = choose_checkpoint(folder, chosen, checkpoint)
    meta = read_nnunet_checkpoint(folder / f"fold_{chosen[0]}" / name)
    trainer = str(meta.get("trainer_name") or folder.name.split("__")[0])
    _check_trainer(trainer, folder)
    init_args = meta.get("init_args") or {}
    parts = folder.name.split("__")
    configuration = str(init_args.get("configuration") or (parts[2] if len(parts) == 3 else "3d_fullres"))
    plans, dataset_json = (_read_json(folder / n) for n in ("plans.json", "dataset.json"))
    return card_from_dict(nnunet_card_data(
        plans,
        dataset_json,
        configuration,
        folder,
        chosen,
        name,
        trainer,
        mirror_axes=meta.get("inference_allowed_mirroring_axes"),
    ))


# ---------------------------------------------------------------- running a card


@dataclass(frozen=True)
class NnunetModel:
    """The parts of a result folder a run needs: folder, parsed JSON and the card's selections."""

    folder: Path
    plans: dict[str, Any]
    dataset_json: dict[str, Any]
    configuration: str
    folds: tuple[str, ...]
    checkpoint: str

    @property
    def settings(self) -> NnunetSettings:
        return settings_from_plans(self.plans, self.dataset_json, self.configuration)

    def checkpoint_path(self, fold: str) -> Path:
        return self.folder / f"fold_{fold}" / self.checkpoint


def model_for_card(
    card: ModelCard, weights: str | Path | None = None, folds: Sequence[str | int] | None = None
) -> NnunetModel:
    """Open the result folder of an ``nnunet`` card (or ``weights``, a folder/zip given for this run)."""
    location = Path(weights).expanduser() if weights else card.weights_path()
    if location is None:
        raise NnunetModelError(f"Card {card.id} names no nnU-Net result folder (weights.file).")
    folder = find_result_folder(location)
    kwargs = card.architecture_kwargs
    chosen = select_folds(
        tuple(_fold_checkpoints(folder)), folds if folds is not None else kwargs.get("folds")
    )
    return NnunetModel(
        folder=folder,
        plans=_read_json(folder / "plans.json"),
        dataset_json=_read_json(folder / "dataset.json"),
        configuration=str(kwargs.get("configuration", "3d_fullres")),
        folds=chosen,
        checkpoint=choose_checkpoint(folder, chosen, kwargs.get("checkpoint")),
    )


class FoldEnsemble(nn.Module):
    """Mean of the fold networks' logits.

    nnU-Net runs the whole sliding window once per fold and averages the logits; blending and
    mirroring are linear, so averaging per window gives the same result in one pass.
    """

    def __init__(self, networks: Sequence[nn.Module]) -> None:
        super().__init__()
        if not networks:
            raise ValueError("A fold ensemble needs at least one network.")
        self.folds = nn.ModuleList(networks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = self.folds[0](x)
        for network in self.folds[1:]:
            total = total + network(x)
        return total / len(self.folds)


def load_ensemble(model: NnunetModel) -> nn.Module:
    """Build MambaClinix from the plans once per fold and load each fold's weights strictly."""
    networks = []
    for fold in model.folds:
        path = model.checkpoint_path(fold)
        checkpoint = read_nnunet_checkpoint(path)
        _check_trainer(str(checkpoint.get("trainer_name") or SUPPORTED_TRAINERS[0]), path)
        network = mambaclinix_from_plans(model.plans, model.dataset_json, model.configuration)
        weights = extract_state_dict(checkpoint["network_weights"])
        networks.append(load_into(network, weights, source=f"checkpoint {path}"))
    return networks[0] if len(networks) == 1 else FoldEnsemble(networks)

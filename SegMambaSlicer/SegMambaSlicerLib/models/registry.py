"""The model registry: built-in cards, user cards in the cache, imports and downloads of weights.

What a user names as a model is resolved here: a card id (built-in or user), a card ``.json`` file, or
a bare checkpoint whose architecture is detected. Built-in cards ship in ``Resources/Models``; user
cards live in ``<cache>/models/<id>/card.json`` next to their weights (see :mod:`.cache`). Weights a
card names by URL and SHA-256 are downloaded to ``<cache>/weights/<sha256>.pt``, and the registry
points such a card's ``weights.file`` at that copy, so ``card.weights_path()`` is all the pipeline needs;
:func:`.checkpoints.verified_weights_path` checks that file against the card's SHA-256 first.

Every function takes ``cache``: the cache folder the caller wants (the Slicer setting), or None for
``$SEGMAMBA_SLICER_HOME`` / the per-user default.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..errors import CancelCallback, CheckpointError, ModelCardError
from ..io.atomic import write_text_atomic
from ..networks import build_network
from .cache import downloaded_weights_path, remember_sha256, user_models_dir
from .cards import ModelCard, builtin_cards, card_from_dict, card_to_dict, load_card
from .checkpoints import (
    DetectedArchitecture,
    WeightsChangedError,
    detect_architecture,
    load_into,
    load_state_dict_file,
    verified_weights_path,
)
from .downloads import DownloadProgress, download_file
from .nnunet import card_for_nnunet_folder, is_nnunet_model

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
CARD_FILE = "card.json"
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
_IMPORT_SUFFIXES = (".pt", ".pth")
_TEMPLATE_FOR_INPUTS = {4: "segmamba-brats2023"}
_PIPELINE_FIELDS = ("schema", "channels", "labels", "regions", "orientation", "preprocessing", "inference")
IMPORTED_INTENDED_USE = "Research use only. Not a medical device; results must be reviewed by a qualified reader."
_ID_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
#: Weights states shown by ``models list``: READY means present and, when the card names a SHA-256, verified.
READY, MISSING, MANUAL = "ready", "missing", "manual download"
#: The file is present but not the one the card names by SHA-256, or it cannot be read.
CHANGED, UNREADABLE = "checksum mismatch", "unreadable"


class RegistryError(ModelCardError):
    """A model cannot be registered or found (bad or duplicate id, nothing to import)."""


class ManualDownloadRequired(RegistryError):
    """The card's weights can only be downloaded by hand; the message carries the card's instructions."""


# ---------------------------------------------------------------- listing and lookup


def user_cards(cache: PathLike | None = None) -> dict[str, ModelCard]:
    """User cards by id. Broken cards, and cards that clash with a built-in id, are skipped with a warning.

    A user card is only valid in a folder named after its id, which keeps ids unique among user cards.
    """
    root = user_models_dir(cache)
    if not root.is_dir():
        return {}
    builtin = builtin_cards()
    found: dict[str, ModelCard] = {}
    for card_path in sorted(root.glob(f"*/{CARD_FILE}")):
        folder = card_path.parent.name
        if folder.startswith("."):  # an import in progress or one that was interrupted
            continue
        try:
            card = load_card(card_path)
        except ModelCardError as exc:
            log.warning("Ignoring user model %s: %s", card_path, exc)
            continue
        if card.id in builtin:
            log.warning("Ignoring user model %s: its id %r is the id of a built-in model; change its id "
                        "and rename its folder to match.", card_path, card.id)
        elif card.id != folder:
            log.warning("Ignoring user model %s: its id %r differs from its folder name %r.", card_path,
                        card.id, folder)
        else:
            found[card.id] = card
    return found


def all_cards(cache: PathLike | None = None) -> dict[str, ModelCard]:
    """Built-in cards then user cards, by id, with downloaded weights resolved from the cache."""
    cards = {**builtin_cards(), **user_cards(cache)}
    return {card_id: _with_downloaded_weights(card, cache) for card_id, card in cards.items()}


def get_card(model_id: str, cache: PathLike | None = None) -> ModelCard:
    """The registered card with this id, or an error listing the known ids.

    A user card that :func:`user_cards` skipped because it is broken is reported with its own error, which
    names the file and the field, rather than as an unknown id.
    """
    cards = all_cards(cache)
    own_card = user_models_dir(cache) / model_id / CARD_FILE
    if model_id not in cards and _ID_RE.fullmatch(model_id) and own_card.is_file():
        load_card(own_card)
    if model_id not in cards:
        raise RegistryError(
            f"No model {model_id!r}. Known models: {', '.join(sorted(cards)) or 'none'}; "
            "or give the path of a card .json file or a checkpoint."
        )
    return cards[model_id]


def resolve_model(spec: PathLike, cache: PathLike | None = None) -> ModelCard:
    """A card id, a card .json path, a checkpoint file, or an nnU-Net result folder/zip → a model card."""
    path = Path(spec).expanduser()
    if is_nnunet_model(path):
        return card_for_nnunet_folder(path, cache=cache)
    if path.suffix.lower() in _CHECKPOINT_SUFFIXES:
        if not path.is_file():
            raise ModelCardError(f"Checkpoint file {path} does not exist.")
        return card_for_checkpoint(path, cache=cache)
    if path.suffix.lower() == ".json" and path.is_file():
        return _with_downloaded_weights(load_card(path), cache)
    return get_card(str(spec), cache)


def weights_state(card: ModelCard, cache: PathLike | None = None) -> str:
    """:data:`READY` when the weights file is present and matches the card's SHA-256 (if it names one).

    Otherwise :data:`CHANGED` or :data:`UNREADABLE` for a file that is present, :data:`MANUAL` or
    :data:`MISSING` for one that is not. Hashes are remembered in ``cache`` (see :mod:`.cache`).
    """
    path = card.weights_path()
    if path is None or not path.is_file():
        return MANUAL if card.weights.kind == "manual" else MISSING
    try:
        verified_weights_path(card, cache)
    except WeightsChangedError:
        return CHANGED
    except CheckpointError:
        return UNREADABLE
    return READY


def _with_downloaded_weights(card: ModelCard, cache: PathLike | None) -> ModelCard:
    """Point ``weights.file`` at the downloaded copy when the card's own file is absent."""
    own = card.weights_path()
    if (own is not None and own.is_file()) or not card.weights.sha256:
        return card
    cached = downloaded_weights_path(card.weights.sha256, cache)
    if not cached.is_file():
        return card
    return dataclasses.replace(card, weights=dataclasses.replace(card.weights, file=str(cached)))


# ---------------------------------------------------------------- cards for checkpoints


def card_for_checkpoint(path: Path, like: str | None = None, cache: PathLike | None = None) -> ModelCard:
    """Build a card for a bare checkpoint by detecting its architecture from keys and shapes.

    The inputs, labels and pipeline come from the card ``like``; without it a 4-input/4-output
    SegMamba is taken to be a BraTS model and inherits the BraTS card.
    """
    detected = detect_architecture(load_state_dict_file(path), source=str(path))
    template = _template(detected, like, path.name, cache)
    return dataclasses.replace(
        template,
        id=f"{template.id}:{path.stem}",
        display_name=f"{path.name} ({detected.note})",
        architecture=detected.name,
        architecture_kwargs=_architecture_kwargs(detected, template),
        weights=dataclasses.replace(template.weights, kind="file", file=str(path.resolve()), url=None, sha256=None),
        source_path=None,
    )


def _template(detected: DetectedArchitecture, like: str | None, name: str, cache: PathLike | None) -> ModelCard:
    """The card whose inputs, labels and pipeline a checkpoint inherits; its channel counts must fit."""
    in_chans, out_chans = detected.kwargs.get("in_chans") or 1, detected.kwargs.get("out_chans") or 2
    if like is None:
        template_id = _TEMPLATE_FOR_INPUTS.get(in_chans)
        template = builtin_cards().get(template_id) if template_id else None
        if template is None or len(template.label_values) != out_chans:
            raise ModelCardError(
                f"{name} is a {detected.name} network with {in_chans} inputs and {out_chans} outputs; "
                "no built-in card fits it, so name a card with the same inputs and labels (--like CARD_ID) "
                "or write a model card (.json) for it."
            )
        return template
    template = get_card(like, cache)
    if len(template.channels) != in_chans or len(template.label_values) != out_chans:
        raise ModelCardError(
            f"{name} has {in_chans} inputs and {out_chans} outputs but model {like} has {len(template.channels)} "
            f"inputs and {len(template.label_values)} outputs (background + labels); choose a card that fits."
        )
    return template


def _architecture_kwargs(detected: DetectedArchitecture, template: ModelCard) -> dict[str, Any]:
    """Detected constructor arguments; those keys cannot reveal (e.g. V1 ``nslices``) come from the template."""
    kwargs = {k: v for k, v in detected.kwargs.items() if v is not None}
    if template.architecture == detected.name:
        kwargs = {**{k: v for k, v in template.architecture_kwargs.items() if k not in kwargs}, **kwargs}
    return kwargs


# ---------------------------------------------------------------- import


def import_weights(
    path: PathLike,
    model_id: str | None = None,
    display_name: str | None = None,
    like: str | None = None,
    cache: PathLike | None = None,
) -> ModelCard:
    """Validate a checkpoint, copy it into the cache and register a user card for it.

    ``path`` is a ``.pt``/``.pth`` file or a folder holding exactly one. The copy is validated, not
    the original: its architecture is detected and it must load with strict keys into the network
    that the new card builds. Errors name the user's file, not the copy. The card and weights appear
    together by one folder rename; on any error nothing is left in the cache.
    """
    source = _find_checkpoint(Path(path).expanduser())
    model_id = _new_model_id(model_id or _id_from_name(source.stem), cache)
    root = user_models_dir(cache)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".import-", dir=root))
    try:
        weights = staging / f"weights{source.suffix.lower()}"
        sha256 = _copy_with_sha256(source, weights)
        state_dict = load_state_dict_file(weights, shown_as=source)
        detected = detect_architecture(state_dict, source=str(source))
        template = _template(detected, like, str(source), cache)
        data = _card_data(template, model_id, display_name, detected, weights.name, sha256, source)
        card = card_from_dict(data, source_path=staging / CARD_FILE)
        load_into(build_network(card.architecture, **card.architecture_kwargs), state_dict,
                  source=f"checkpoint {source}")
        write_text_atomic(staging / CARD_FILE, json.dumps(data, indent=2) + "\n", what="model card")
        final = root / model_id
        if final.exists():
            raise RegistryError(f"A user model {model_id!r} was registered meanwhile at {final}; choose another id.")
        os.rename(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    remember_sha256(final / weights.name, sha256, cache)  # hashed while copying: no need to hash it again
    return load_card(final / CARD_FILE)


def _find_checkpoint(path: Path) -> Path:
    """The checkpoint file itself, or the only ``.pt``/``.pth`` file in a folder (searched recursively)."""
    if path.is_file():
        if path.suffix.lower() not in _IMPORT_SUFFIXES:
            raise RegistryError(f"{path.name} is not a PyTorch checkpoint (.pt or .pth).")
        return path
    if not path.is_dir():
        raise RegistryError(f"{path} does not exist.")
    found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _IMPORT_SUFFIXES)
    if len(found) != 1:
        listed = ", ".join(str(p.relative_to(path)) for p in found[:5]) + (" ..." if len(found) > 5 else "")
        what = f"{len(found)} checkpoints ({listed})" if found else "no .pt or .pth file"
        raise RegistryError(f"The folder {path} holds {what}; give the checkpoint file itself.")
    return found[0]


def _id_from_name(name: str) -> str:
    """A default id from a file name: lower case, runs of other characters replaced by '-'."""
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-._")[:64]


def _new_model_id(model_id: str, cache: PathLike | None) -> str:
    """Check that an id is usable as a folder name and not yet taken by a built-in or user model."""
    if not _ID_RE.fullmatch(model_id):
        raise RegistryError(
            f"Model id {model_id!r} is not valid: use 1-64 lower-case letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (choose one with --id)."
        )
    if model_id in builtin_cards():
        raise RegistryError(f"Model id {model_id!r} is the id of a built-in model; choose another id with --id.")
    existing = user_models_dir(cache) / model_id
    if existing.exists():
        raise RegistryError(
            f"A user model {model_id!r} already exists at {existing}; choose another id with --id, or delete "
            "that folder to replace it."
        )
    return model_id


def _copy_with_sha256(source: Path, dest: Path) -> str:
    """Copy a file in chunks, flushed to disk, returning the SHA-256 of the bytes written."""
    digest = hashlib.sha256()
    with open(source, "rb") as src, open(dest, "wb") as dst:
        for block in iter(lambda: src.read(1024 * 1024), b""):
            digest.update(block)
            dst.write(block)
        dst.flush()
        os.fsync(dst.fileno())
    return digest.hexdigest()


def _card_data(
    template: ModelCard,
    model_id: str,
    display_name: str | None,
    detected: DetectedArchitecture,
    weights_file: str,
    sha256: str,
    source: Path,
) -> dict[str, Any]:
    """A new card: the template's inputs, labels and pipeline with the new id, network and weights.

    Only the fields that define the pipeline are copied, so nothing the template says about its own
    training, evaluation or intended use is carried over to a different network.
    """
    original = card_to_dict(template)
    data = {key: original[key] for key in _PIPELINE_FIELDS}
    today = datetime.date.today().isoformat()
    data.update(
        id=model_id,
        display_name=display_name or f"{source.name} (imported {detected.name})",
        description=f"Imported from {source.resolve()} on {today}; inputs, labels, preprocessing and "
        f"inference settings copied from {template.id}. {detected.note}".strip(),
        intended_use=IMPORTED_INTENDED_USE,
        architecture={"name": detected.name, "kwargs": _architecture_kwargs(detected, template)},
        weights={"kind": "file", "file": weights_file, "sha256": sha256},
    )
    return data


# ---------------------------------------------------------------- download


def download_weights(
    model_id: str,
    cache: PathLike | None = None,
    progress: DownloadProgress | None = None,
    cancel: CancelCallback | None = None,
) -> Path:
    """Download the weights of a card with ``weights.kind == "url"`` into the cache and return their path.

    The file is verified against the card's SHA-256 before it appears (see :mod:`.downloads`); weights
    already present and verified are not downloaded again, a changed copy is replaced. Cards of kind
    ``manual`` raise :class:`ManualDownloadRequired` with the card's instructions.
    """
    card = get_card(model_id, cache)
    weights = card.weights
    if weights_state(card, cache) == READY:
        return card.weights_path()  # type: ignore[return-value]
    if weights.kind == "manual":
        raise ManualDownloadRequired(
            f"The weights of {card.id} must be downloaded by hand: "
            f"{weights.instructions or 'see the model card'}"
            + (f" Link: {weights.url}" if weights.url else "")
            + f" Then register the file with: segmamba-slicer models import FILE --like {card.id}"
        )
    if weights.kind != "url" or not weights.url or not weights.sha256:
        verified_weights_path(card, cache)  # a file that is present but changed is reported as such
        raise RegistryError(
            f"Model {card.id} names no downloadable weights (needs weights kind \"url\" with a url and sha256); "
            f"its weights file {card.weights_path()} is missing. Reinstall the extension or import the weights."
        )
    path = download_file(weights.url, downloaded_weights_path(weights.sha256, cache), weights.sha256,
                       progress=progress, cancel=cancel)
    remember_sha256(path, weights.sha256, cache)  # download_file has just checked it
    return path


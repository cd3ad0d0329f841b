"""Resolve what the user names as a model: a card id, a card file, or a bare checkpoint file."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .cards import ModelCard, builtin_cards, find_card
from .checkpoints import detect_architecture, load_state_dict_file
from .errors import ModelCardError

_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
_TEMPLATE_FOR_INPUTS = {4: "segmamba-brats2023"}


def card_for_checkpoint(path: Path) -> ModelCard:
    """Build a card for a bare checkpoint by detecting its architecture from keys and shapes.

    A 4-input/4-output SegMamba is taken to be a BraTS model and inherits the BraTS card's
    channels, labels and pipeline; other shapes get generic channel and label names.
    """
    detected = detect_architecture(load_state_dict_file(path))
    kwargs = {k: v for k, v in detected.kwargs.items() if v is not None}
    in_chans, out_chans = kwargs.get("in_chans", 1), kwargs.get("out_chans", 2)
    template_id = _TEMPLATE_FOR_INPUTS.get(in_chans)
    template = builtin_cards().get(template_id) if template_id else None
    if template is None or len(template.label_values) != out_chans:
        raise ModelCardError(
            f"{path.name} is a {detected.name} network with {in_chans} inputs and {out_chans} outputs; "
            "there is no built-in card for that, so write a model card (.json) for it that names this file."
        )
    base_kwargs = {k: v for k, v in template.architecture_kwargs.items() if k in ("nslices", "mamba_residual")}
    if detected.name != "segmamba_v1":
        base_kwargs = {}
    return dataclasses.replace(
        template,
        id=f"{template.id}:{path.stem}",
        display_name=f"{path.name} ({detected.note})",
        architecture=detected.name,
        architecture_kwargs={**kwargs, **base_kwargs},
        weights=dataclasses.replace(template.weights, kind="file", file=str(path.resolve()), url=None),
        source_path=None,
    )


def resolve_model(spec: str | Path) -> ModelCard:
    """A card id, a card .json path, or a checkpoint file → a model card with weights location."""
    path = Path(spec).expanduser()
    if path.suffix.lower() in _CHECKPOINT_SUFFIXES:
        if not path.is_file():
            raise ModelCardError(f"Checkpoint file {path} does not exist.")
        return card_for_checkpoint(path)
    return find_card(spec)

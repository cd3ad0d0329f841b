"""The one segmentation pipeline shared by the CLI, the Slicer logic, the worker and batch runs.

Images in (files, DICOM folders or SimpleITK images, one per card channel) → a label map
out on exactly the first input's voxel grid. Every model-specific choice is read from the
model card. Cards with preprocessing scheme ``nnunet`` (MambaClinix result folders) go through
nnU-Net's own steps instead of the SegMamba ones: SimpleITK axis order with ``transpose_forward``
rather than reorientation, plans-driven normalisation and resampling, nnU-Net tiling, fold
ensembling and nnU-Net's export back to the input grid.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn

from ..errors import CancelledError, CheckpointError, ModelCardError
from ..io.geometry import direction_matrix, reorder_to, resample_onto, stack_channels
from ..io.images import ImageSource, read_image, resolve_inputs
from ..models.cards import ModelCard
from ..models.checkpoints import load_into, load_state_dict_file, verified_weights_path
from ..networks import build_network
from .devices import resolve_device
from .inference import CancelCallback, ProgressCallback, WindowSettings, count_windows, predict_logits
from .preprocessing import (
    NNUNET_SCHEME,
    channel_warnings,
    check_contrast,
    nnunet_export,
    preprocess,
    preprocess_nnunet,
)
from .volumes import volumes_ml

log = logging.getLogger("SegMambaSlicerLib")


@dataclass
class SegmentOptions:
    """Per-run choices; ``None`` means "use the card's value"."""

    device: str = "auto"
    weights: str | Path | None = None
    overlap: float | None = None
    sw_batch_size: int | None = None
    tta: bool = False
    mixed_precision: bool = True
    scan_backend: str | None = None
    folds: Sequence[str | int] | None = None


@dataclass
class SegmentationResult:
    """A label map on the input grid plus what produced it."""

    labelmap: sitk.Image
    card: ModelCard
    device: str
    seconds: float
    windows: int
    volumes: dict[str, float] = field(default_factory=dict)
    #: What the user should know about the inputs (non-finite voxels, channels without contrast).
    warnings: tuple[str, ...] = ()


def window_settings(card: ModelCard, options: SegmentOptions) -> WindowSettings:
    """Merge the card's sliding-window settings with per-run overrides."""
    inf = card.inference
    overlap = inf.overlap if options.overlap is None else float(options.overlap)
    if not 0.0 <= overlap < 1.0:
        raise ModelCardError(f"Overlap must be at least 0 and below 1; got {overlap}.")
    return WindowSettings(
        roi_size=inf.roi_size,
        overlap=overlap,
        sw_batch_size=max(1, options.sw_batch_size or inf.sw_batch_size),
        blend_mode=inf.blend_mode,
        sigma_scale=inf.sigma_scale,
        mirror_axes=inf.mirror_axes if options.tta else (),
        tiling="nnunet" if card.preprocessing.scheme == NNUNET_SCHEME else "monai",
    )


def load_network(
    card: ModelCard,
    weights: str | Path | None,
    device: torch.device,
    folds: Sequence[str | int] | None = None,
) -> nn.Module:
    """Build the card's network, load its weights strictly, and put it in eval mode on ``device``.

    The card's own weights file is checked against the card's SHA-256 first; ``weights`` given by
    the caller replace the card's file and are not.

    For nnU-Net cards ``weights`` may name another result folder and ``folds`` overrides the
    card's folds; the result is the fold ensemble.
    """
    if card.preprocessing.scheme == NNUNET_SCHEME:
        from ..models.nnunet import load_ensemble, model_for_card

        return load_ensemble(model_for_card(card, weights, folds)).eval().to(device)
    path = Path(weights).expanduser() if weights else verified_weights_path(card)  # the card's own: checksummed
    if path is None:
        hint = card.weights.instructions or "Provide a weights file."
        raise CheckpointError(f"No weights for {card.display_name}. {hint}")
    network = build_network(card.architecture, **card.architecture_kwargs)
    load_into(network, load_state_dict_file(path), source=f"weights file {path.name}")
    return network.eval().to(device)


def _set_scan_backend(network: nn.Module, backend: str | None) -> None:
    if backend is None:
        return
    from ..networks.ops.mixers import set_scan_backend

    set_scan_backend(network, backend)


def _check_cancel(cancel: CancelCallback | None) -> None:
    if cancel is not None and cancel():
        raise CancelledError("Segmentation cancelled.")


def _read_on_grid(images: Sequence[ImageSource], card: ModelCard) -> tuple[list[sitk.Image], list[str]]:
    """One image per card channel, every channel on the first one's grid, and warnings about their voxels.

    Voxels are checked on each image's own grid, so the warnings give the indices the user sees.
    """
    sources = resolve_inputs(images, card)
    loaded = [read_image(s, name=c.display_name) for s, c in zip(sources, card.channels)]
    warnings = [
        message
        for image, channel in zip(loaded, card.channels)
        for message in channel_warnings(sitk.GetArrayViewFromImage(image), channel.display_name)
    ]
    reference = loaded[0]
    on_grid = [reference] + [
        resample_onto(img, reference, name=c.display_name) for img, c in zip(loaded[1:], card.channels[1:])
    ]
    return on_grid, warnings


def _check_outputs(logits: torch.Tensor, card: ModelCard) -> None:
    """Softmax models have a background channel; region (sigmoid) models have one channel per region."""
    expected = len(card.labels) if card.inference.output == "sigmoid_regions" else len(card.label_values)
    if logits.shape[1] != expected:
        raise ModelCardError(
            f"The network produced {logits.shape[1]} output channels but card {card.id} expects {expected} "
            f"({card.inference.output} with {len(card.labels)} labels)."
        )


Restore = Callable[[np.ndarray], np.ndarray]


def _prepare_segmamba(data: np.ndarray, reference: sitk.Image, card: ModelCard) -> tuple[np.ndarray, Restore]:
    """Reorient to the card's orientation, crop and z-score; the returned function undoes it for logits."""
    reorder = reorder_to(direction_matrix(reference), card.orientation)
    net_input, box = preprocess(np.ascontiguousarray(reorder.forward(data)), card.preprocessing)

    def restore(logits: np.ndarray) -> np.ndarray:
        values = np.asarray(card.label_values, dtype=np.uint8)[logits.argmax(0)]
        return reorder.inverse(box.paste(values))

    return net_input, restore


def _prepare_nnunet(
    data: np.ndarray, reference: sitk.Image, card: ModelCard, options: SegmentOptions
) -> tuple[np.ndarray, Restore]:
    """nnU-Net's preprocessing from the result folder's plans; the returned function is nnU-Net's export."""
    from ..models.nnunet import model_for_card

    settings = model_for_card(card, options.weights, options.folds).settings
    net_input, geometry = preprocess_nnunet(data, reference.GetSpacing()[::-1], settings)
    return net_input, lambda logits: nnunet_export(logits, geometry, settings, card.label_values)


def segment(
    images: Sequence[ImageSource],
    card: ModelCard,
    options: SegmentOptions | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelCallback | None = None,
    network: nn.Module | None = None,
) -> SegmentationResult:
    """Segment one case. ``network`` may be given to reuse a loaded model (it must be in eval mode)."""
    options = options or SegmentOptions()
    start = time.perf_counter()
    report = progress or (lambda fraction, message: None)
    report(0.0, "reading images")
    on_grid, warnings = _read_on_grid(images, card)
    reference = on_grid[0]
    data = stack_channels(on_grid)
    check_contrast(data)
    for message in warnings:  # front ends show ``result.warnings``; the log is for console sessions
        log.info("%s", message)
    if card.preprocessing.scheme == NNUNET_SCHEME:
        net_input, restore = _prepare_nnunet(data, reference, card, options)
    else:
        net_input, restore = _prepare_segmamba(data, reference, card)
    _check_cancel(cancel)

    device = resolve_device(options.device)
    if network is None:
        report(0.0, "loading model")
        network = load_network(card, options.weights, device, options.folds)
    else:
        network = network.to(device)
    _set_scan_backend(network, options.scan_backend)
    settings = window_settings(card, options)
    _check_cancel(cancel)

    report(0.0, "running the network")
    logits = predict_logits(
        network,
        torch.from_numpy(net_input)[None],
        settings,
        device,
        options.mixed_precision,
        progress,
        cancel,
    )
    _check_outputs(logits, card)
    full = restore(logits[0].numpy())
    labelmap = sitk.GetImageFromArray(np.ascontiguousarray(full))
    labelmap.CopyInformation(reference)
    seconds = time.perf_counter() - start
    windows = count_windows(net_input.shape[1:], settings)
    log.info("segmented with %s on %s in %.1f s (%d windows)", card.id, device, seconds, windows)
    return SegmentationResult(
        labelmap=labelmap,
        card=card,
        device=str(device),
        seconds=seconds,
        windows=windows,
        volumes=volumes_ml(labelmap, card),
        warnings=tuple(warnings),
    )

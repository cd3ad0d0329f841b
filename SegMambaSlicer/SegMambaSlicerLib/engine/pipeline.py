"""The one segmentation pipeline shared by the CLI, the Slicer logic, the worker and batch runs.

Images in (files, DICOM folders or SimpleITK images, one per card channel) → a label map out on
exactly the first input's voxel grid, and on request its per-voxel confidence on the same grid. Every
model-specific step is the card's recipe (:mod:`.recipes`: SegMamba's reorient/crop/z-score, or
nnU-Net's plans-driven preprocessing, tiling, fold ensemble and export); this module only reads,
checks, runs the windows and measures.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn

from ..errors import CancelCallback, CancelledError, ModelCardError, ProgressCallback
from ..io.geometry import resample_onto, stack_channels
from ..io.images import ImageSource, read_image, resolve_inputs
from ..models.cards import ModelCard
from .devices import resolve_device, run_with_cpu_fallback
from .inference import WindowSettings, count_windows, predict_logits
from .inputs import channel_warnings, check_contrast
from .recipes import recipe_for
from .volumes import volumes_ml

log = logging.getLogger(__name__)


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
    #: Also return the per-voxel confidence (off by default: it costs a float32 volume and some time).
    confidence: bool = False
    #: Lower peak memory at some speed cost (the networks' full-resolution convolutions overwrite their
    #: inputs slab by slab; docs/benchmarks.md, "Memory"). Same results to float tolerance.
    low_memory: bool = False


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
    #: With ``SegmentOptions(confidence=True)``: float32 in [0, 1] on the label map's grid, from the same
    #: logits (1 − normalised entropy of the prediction; see :mod:`.recipes.base`); otherwise None.
    confidence: sitk.Image | None = None


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
        tiling=recipe_for(card).tiling,
    )


def load_network(
    card: ModelCard,
    weights: str | Path | None,
    device: torch.device,
    folds: Sequence[str | int] | None = None,
) -> nn.Module:
    """Build the card's network, load its weights strictly, and put it in eval mode on ``device``.

    The card's own weights file is checked against the card's SHA-256 first; ``weights`` given by
    the caller replace the card's file and are not. For nnU-Net cards ``weights`` may name another
    result folder and ``folds`` overrides the card's folds; the result is the fold ensemble.
    """
    return recipe_for(card).load(card, weights, folds).eval().to(device)


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


def _on_grid_of(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """An array on the reference's SimpleITK array grid as an image with the reference's geometry."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.CopyInformation(reference)
    return image


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
    net_input, restore = recipe_for(card).prepare(data, reference, card, options.weights, options.folds)
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
    image = torch.from_numpy(net_input)[None]

    def run(on: torch.device) -> torch.Tensor:
        return predict_logits(network.to(on), image, settings, on, options.mixed_precision, progress, cancel,
                              low_memory=options.low_memory)

    logits, fallback = run_with_cpu_fallback(run, device)
    if fallback:
        warnings.append(fallback)
        device = torch.device("cpu")
    _check_outputs(logits, card)
    restored = restore(logits[0].numpy(), options.confidence)
    labelmap = _on_grid_of(restored.labels, reference)
    confidence = None if restored.confidence is None else _on_grid_of(restored.confidence, reference)
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
        confidence=confidence,
    )

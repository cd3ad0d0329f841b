"""Sliding-window inference with progress, cancel, mirror TTA and mixed precision.

MONAI's SlidingWindowInferer does the tiling, padding and Gaussian blending exactly as the
official SegMamba pipeline (MODELS.md §2.9). We wrap the network so every batch of
windows reports progress and checks for cancellation, and we average raw logits over the
mirror flips as the official TTA does.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from monai.inferers import SlidingWindowInferer

from .errors import CancelledError

ProgressCallback = Callable[[float, str], None]
CancelCallback = Callable[[], bool]


@dataclass(frozen=True)
class WindowSettings:
    """Resolved sliding-window settings for one run."""

    roi_size: tuple[int, int, int]
    overlap: float
    sw_batch_size: int
    blend_mode: str = "gaussian"
    sigma_scale: float = 0.125
    mirror_axes: tuple[int, ...] = ()


def windows_per_axis(size: int, roi: int, overlap: float) -> int:
    """Number of window starts MONAI uses along one axis (MODELS.md §2.9)."""
    if size <= roi:
        return 1
    interval = max(int(roi * (1.0 - overlap)), 1)
    return math.ceil((size - roi) / interval) + 1


def count_windows(shape: Sequence[int], settings: WindowSettings) -> int:
    """Total windows for one pass over a volume of spatial ``shape``."""
    return math.prod(windows_per_axis(s, r, settings.overlap) for s, r in zip(shape, settings.roi_size))


def mirror_flips(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Identity plus every non-empty subset of the spatial mirror axes, as tensor dims."""
    dims = [a + 2 for a in axes]
    return [c for r in range(len(dims) + 1) for c in itertools.combinations(dims, r)]


class _WindowCounter:
    """Calls the network on a batch of windows, counting them and honouring cancel."""

    def __init__(self, network: torch.nn.Module, total: int, progress: ProgressCallback | None,
                 cancel: CancelCallback | None, autocast: contextlib.AbstractContextManager) -> None:
        self.network, self.total, self.done = network, total, 0
        self.progress, self.cancel, self.autocast = progress, cancel, autocast

    def __call__(self, windows: torch.Tensor) -> torch.Tensor:
        if self.cancel is not None and self.cancel():
            raise CancelledError("Segmentation cancelled.")
        with self.autocast:
            logits = self.network(windows)
        self.done += windows.shape[0]
        if self.progress is not None:
            self.progress(min(self.done / self.total, 1.0), f"window {self.done}/{self.total}")
        return logits.float()


def autocast_context(device: torch.device, mixed_precision: bool) -> contextlib.AbstractContextManager:
    """fp16 autocast on CUDA when asked (as the official pipeline runs); a no-op elsewhere."""
    if mixed_precision and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


@torch.no_grad()
def predict_logits(
    network: torch.nn.Module,
    image: torch.Tensor,
    settings: WindowSettings,
    device: torch.device,
    mixed_precision: bool = True,
    progress: ProgressCallback | None = None,
    cancel: CancelCallback | None = None,
) -> torch.Tensor:
    """Blended logits (1, K, z, y, x) in float32 on the CPU for a (1, C, z, y, x) input.

    The stitching buffer stays on the CPU so that large volumes do not exhaust GPU memory;
    windows run on ``device``.
    """
    flips = mirror_flips(settings.mirror_axes)
    total = count_windows(image.shape[2:], settings) * len(flips)
    counter = _WindowCounter(network, total, progress, cancel, autocast_context(device, mixed_precision))
    inferer = SlidingWindowInferer(
        roi_size=settings.roi_size,
        sw_batch_size=settings.sw_batch_size,
        overlap=settings.overlap,
        mode=settings.blend_mode,
        sigma_scale=settings.sigma_scale,
        padding_mode="constant",
        cval=0.0,
        sw_device=device,
        device=torch.device("cpu"),
    )
    summed: torch.Tensor | None = None
    for dims in flips:
        flipped = torch.flip(image, dims) if dims else image
        logits = inferer(flipped, counter)
        logits = torch.flip(logits, dims) if dims else logits
        summed = logits if summed is None else summed.add_(logits)
    assert summed is not None
    return summed / len(flips)

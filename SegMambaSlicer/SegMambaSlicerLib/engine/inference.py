"""Sliding-window inference with progress, cancel, mirror TTA and mixed precision.

Two tilings, because the two official pipelines tile differently:

* ``monai`` (SegMamba V1/V2; docs/models.md, "SegMamba inference"): MONAI's SlidingWindowInferer
  does the tiling, padding and Gaussian blending exactly as the official pipeline; raw logits are
  averaged over mirror flips of the whole volume.
* ``nnunet`` (MambaClinix; docs/models.md, "nnU-Net prediction and export"): nnU-Net v2's predictor:
  pad to at least one patch (zeros, ``diff // 2`` before), evenly spread window starts, nnU-Net's
  impulse-filtered Gaussian importance map, and mirroring of every window. We accumulate in float32
  where nnU-Net uses float16 buffers (a documented, allowed difference).

Every batch of windows reports progress and checks for cancellation.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import SlidingWindowInferer
from scipy.ndimage import gaussian_filter

from ..errors import CancelCallback, CancelledError, ProgressCallback
from ..networks.ops import memory_mode
from .devices import reuse_freed_cpu_memory


@dataclass(frozen=True)
class WindowSettings:
    """Resolved sliding-window settings for one run."""

    roi_size: tuple[int, int, int]
    overlap: float
    sw_batch_size: int
    blend_mode: str = "gaussian"
    sigma_scale: float = 0.125
    mirror_axes: tuple[int, ...] = ()
    tiling: str = "monai"


def windows_per_axis(size: int, roi: int, overlap: float) -> int:
    """Number of window starts MONAI uses along one axis (docs/models.md, "SegMamba inference")."""
    if size <= roi:
        return 1
    interval = max(int(roi * (1.0 - overlap)), 1)
    return math.ceil((size - roi) / interval) + 1


def nnunet_steps(size: int, tile: int, step_fraction: float) -> list[int]:
    """nnU-Net's window starts along one axis (after padding, so ``size >= tile``).

    ``n = ceil((size − tile) / (step_fraction · tile)) + 1`` windows spread evenly: start ``i`` is
    ``round(i · (size − tile) / (n − 1))`` (numpy rounding, halves to even).
    """
    count = math.ceil((size - tile) / (tile * step_fraction)) + 1
    if count == 1:
        return [0]
    step = (size - tile) / (count - 1)
    return [int(np.round(step * i)) for i in range(count)]


def nnunet_gaussian(tile: Sequence[int], sigma_scale: float = 0.125) -> torch.Tensor:
    """nnU-Net's importance map: a unit impulse at ``tile // 2`` Gaussian-filtered with σ = tile·scale.

    Scaled to a maximum of 10 and rounded to float16 as nnU-Net stores it (zeros replaced by the
    smallest non-zero value), returned as float32 for exact accumulation.
    """
    impulse = np.zeros(tuple(tile))
    impulse[tuple(t // 2 for t in tile)] = 1.0
    smooth = gaussian_filter(impulse, [t * sigma_scale for t in tile], 0, mode="constant", cval=0)
    weights = torch.from_numpy(smooth / smooth.max() * 10.0).to(torch.float16)
    weights[weights == 0] = weights[weights != 0].min()
    return weights.float()


def _nnunet_padded(shape: Sequence[int], tile: Sequence[int]) -> tuple[int, ...]:
    return tuple(max(s, t) for s, t in zip(shape, tile))


def count_windows(shape: Sequence[int], settings: WindowSettings) -> int:
    """Total windows for one pass over a volume of spatial ``shape``."""
    if settings.tiling == "nnunet":
        padded = _nnunet_padded(shape, settings.roi_size)
        step = 1.0 - settings.overlap
        return math.prod(len(nnunet_steps(s, t, step)) for s, t in zip(padded, settings.roi_size))
    return math.prod(windows_per_axis(s, r, settings.overlap) for s, r in zip(shape, settings.roi_size))


def mirror_flips(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Identity plus every non-empty subset of the spatial mirror axes, as tensor dims."""
    dims = [a + 2 for a in axes]
    return [c for r in range(len(dims) + 1) for c in itertools.combinations(dims, r)]


class _WindowCounter:
    """Calls the network on a batch of windows, counting them and honouring cancel.

    On the CPU the windows of a batch go through the network one at a time: batching 128³ windows
    gains nothing there (each one alone already keeps both cores busy for seconds) but doubles the
    peak memory, and progress and cancel then act per window. Every operation of the networks is per
    sample, so the logits are those of the batched call.
    """

    def __init__(
        self,
        network: Callable[[torch.Tensor], torch.Tensor],
        total: int,
        progress: ProgressCallback | None,
        cancel: CancelCallback | None,
        autocast: contextlib.AbstractContextManager,
    ) -> None:
        self.network, self.total, self.done = network, total, 0
        self.progress, self.cancel, self.autocast = progress, cancel, autocast

    def __call__(self, windows: torch.Tensor) -> torch.Tensor:
        parts = windows.split(1) if windows.device.type == "cpu" else (windows,)
        logits = [self._run(part) for part in parts]
        return logits[0] if len(logits) == 1 else torch.cat(logits)

    def _run(self, windows: torch.Tensor) -> torch.Tensor:
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


#: With the low-memory setting, CPU blocks of at least this size go back to the system when freed.
LOW_MEMORY_RETURN_FROM = 64 * 2**20


def kept_cpu_memory(low_memory: bool = False) -> contextlib.AbstractContextManager[None]:
    """:func:`.devices.reuse_freed_cpu_memory` as a run with (or without) the low-memory setting needs it.

    Whoever holds it across several cases (a batch, a Ray actor) must ask with the run's setting: the
    outermost entry's setting holds inside, so an unbounded heap held around a low-memory run would undo
    its bound (:data:`LOW_MEMORY_RETURN_FROM`).
    """
    return reuse_freed_cpu_memory(LOW_MEMORY_RETURN_FROM if low_memory else None)


@torch.no_grad()
def predict_logits(
    network: torch.nn.Module,
    image: torch.Tensor,
    settings: WindowSettings,
    device: torch.device,
    mixed_precision: bool = True,
    progress: ProgressCallback | None = None,
    cancel: CancelCallback | None = None,
    low_memory: bool = False,
) -> torch.Tensor:
    """Blended logits (1, K, z, y, x) in float32 on the CPU for a (1, C, z, y, x) input.

    The stitching buffer stays on the CPU so that large volumes do not exhaust GPU memory;
    windows run on ``device``. Freed CPU memory is reused while this runs (see
    :func:`~SegMambaSlicerLib.engine.devices.reuse_freed_cpu_memory`) and released when it returns.
    ``low_memory`` runs the networks in their low-memory setting (:func:`~SegMambaSlicerLib.networks.ops.memory_mode`)
    and keeps only blocks under :data:`LOW_MEMORY_RETURN_FROM` for reuse.
    """
    with kept_cpu_memory(low_memory), memory_mode(low_memory):
        return _predict(network, image, settings, device, mixed_precision, progress, cancel)


def _predict(
    network: torch.nn.Module,
    image: torch.Tensor,
    settings: WindowSettings,
    device: torch.device,
    mixed_precision: bool,
    progress: ProgressCallback | None,
    cancel: CancelCallback | None,
) -> torch.Tensor:
    """:func:`predict_logits` inside its allocator and network memory settings."""
    if settings.tiling == "nnunet":
        return _predict_nnunet(network, image, settings, device, mixed_precision, progress, cancel)
    if settings.tiling != "monai":
        raise ValueError(f"Unknown sliding-window tiling {settings.tiling!r} (use 'monai' or 'nnunet').")
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
    return _mirrored(lambda flipped: inferer(flipped, counter), image, flips)


def _mirrored(
    network: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, flips: Sequence[tuple[int, ...]]
) -> torch.Tensor:
    """Mean of the network's logits over the mirror flips of its input (TTA of both tilings).

    Each flip's logits are a fresh tensor, so they are summed in place: one output-sized buffer, not two.
    """
    total: torch.Tensor | None = None
    for dims in flips:
        logits = network(torch.flip(inputs, dims) if dims else inputs)
        logits = torch.flip(logits, dims) if dims else logits
        total = logits if total is None else total.add_(logits)
    assert total is not None
    return total / len(flips)


def _predict_nnunet(
    network: torch.nn.Module,
    image: torch.Tensor,
    settings: WindowSettings,
    device: torch.device,
    mixed_precision: bool,
    progress: ProgressCallback | None,
    cancel: CancelCallback | None,
) -> torch.Tensor:
    """nnU-Net v2's ``predict_sliding_window_return_logits`` for a (1, C, z, y, x) input."""
    tile = tuple(settings.roi_size)
    shape = tuple(image.shape[2:])
    padded = _nnunet_padded(shape, tile)
    before = [(p - s) // 2 for p, s in zip(padded, shape)]
    pad = [v for b, p, s in reversed(list(zip(before, padded, shape))) for v in (b, p - s - b)]
    data = F.pad(image[0], pad, mode="constant", value=0.0) if any(pad) else image[0]
    steps = [nnunet_steps(p, t, 1.0 - settings.overlap) for p, t in zip(padded, tile)]
    starts = list(itertools.product(*steps))
    flips = mirror_flips(settings.mirror_axes)
    counter = _WindowCounter(
        lambda x: _mirrored(network, x, flips),
        len(starts),
        progress,
        cancel,
        autocast_context(device, mixed_precision),
    )
    weights = nnunet_gaussian(tile)
    summed: torch.Tensor | None = None
    coverage = torch.zeros(padded)
    for first in range(0, len(starts), settings.sw_batch_size):
        batch = starts[first : first + settings.sw_batch_size]
        boxes = [tuple(slice(a, a + t) for a, t in zip(start, tile)) for start in batch]
        windows = torch.stack([data[(slice(None), *box)] for box in boxes]).to(device)
        logits = counter(windows).cpu()
        if summed is None:
            summed = torch.zeros((logits.shape[1], *padded))
        for box, window_logits in zip(boxes, logits):
            summed[(slice(None), *box)] += window_logits * weights
            coverage[box] += weights
    assert summed is not None
    summed /= coverage
    crop = tuple(slice(b, b + s) for b, s in zip(before, shape))
    return summed[(slice(None), *crop)][None]

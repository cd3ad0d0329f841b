"""Before a run: how many windows, how long, how much memory, and whether this computer has enough.

Users ask before they click how long a case will take, and a run that needs more memory than is free is
killed by the operating system after minutes of work. The estimate answers from three parts:

* the **windows**, counted exactly as the run will count them: the network grid (the content box of the
  inputs in the card's orientation, resampled to the card's spacing or to nnU-Net's plans spacing) tiled by
  :func:`.inference.count_windows`, times the mirror flips of test-time augmentation. A "window" here is
  one pass of the network over one window (nnU-Net mirrors inside a window; it counts each flip);
* a **rate** measured on this computer, never assumed (:mod:`.rates`): seconds per window, the memory one
  window's network pass needs on the device that runs it (its working set), the weights and the resident
  size of the process around them, measured once and refined by every real run;
* **buffers** counted from the code (:func:`buffer_bytes`): the input images, the network input, the
  stitching and output arrays, and what restoring the label map allocates, per phase of the run.

The predicted peak is the resident size of the process running the network (or, on a GPU, also the GPU
memory). :func:`memory_shortfall` compares it with what the system says is available (:mod:`.memory`)
and names what to change when it clearly does not fit. Everything here is pure but the reading of free
memory, so it is tested with numbers; docs/benchmarks.md ("Estimate before a run") has the measured error.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import SimpleITK as sitk
import torch

from ..errors import InputImageError, SegMambaError
from ..io.geometry import AxisReorder, reorder_to
from ..models.cards import ModelCard
from .inference import WindowSettings, count_windows, mirror_flips
from .memory import available_memory, gpu_free_memory
from .rates import Rate, cached_rate, run_key
from .recipes import recipe_for
from .recipes.segmamba import network_grid as segmamba_network_grid

if TYPE_CHECKING:
    from .pipeline import SegmentOptions

_FLOAT = 4  # bytes of a float32 voxel
GIB = 2**30


class NotEnoughMemoryError(SegMambaError):
    """The estimate says this run needs clearly more memory than the computer (or GPU) has free."""


# ---------------------------------------------------------------- the case's grids


@dataclass(frozen=True)
class CaseGrid:
    """What the estimate needs of a case: the first input's grid and the content box of all inputs on it.

    ``shape`` and the box are in array order (z, y, x); ``spacing`` and ``origin`` in SimpleITK order
    (x, y, z) in mm; ``direction`` SimpleITK's row-major 3 × 3. Header sizes and one pass of numpy over
    the voxels make it, so the module keeps one per volume and recomputes the estimate for free.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    direction: tuple[float, ...]
    box_lo: tuple[int, int, int]
    box_hi: tuple[int, int, int]
    channels: int = 1
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    #: Bytes of the images as the caller holds them while the run copies them (all channels, stored type).
    stored_bytes: int = 0

    @property
    def voxels(self) -> int:
        return math.prod(self.shape)

    @property
    def box_shape(self) -> tuple[int, int, int]:
        return tuple(b - a for a, b in zip(self.box_lo, self.box_hi))  # type: ignore[return-value]

    @property
    def empty(self) -> bool:
        return any(n <= 0 for n in self.box_shape)

    def index_to_world(self) -> np.ndarray:
        """4 × 4 matrix from continuous (i, j, k) indices to LPS world coordinates."""
        matrix = np.eye(4)
        matrix[:3, :3] = np.asarray(self.direction, dtype=float).reshape(3, 3) * np.asarray(self.spacing)
        matrix[:3, 3] = self.origin
        return matrix


def content_box(array_zyx: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Half-open (lo, hi) box of the finite non-zero voxels of one volume; None when there are none.

    The pipeline's crop box is this box over all channels: filling enclosed holes never widens a box,
    and non-finite voxels become 0 before the crop (:func:`.inputs.split_nonfinite`).
    """
    mask = np.isfinite(array_zyx)
    np.logical_and(mask, array_zyx != 0, out=mask)
    lo, hi = [], []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hits.size == 0:
            return None
        lo.append(int(hits[0]))
        hi.append(int(hits[-1]) + 1)
    return tuple(lo), tuple(hi)


def image_grid(image: sitk.Image) -> CaseGrid:
    """The grid and content box of one image (an empty box, lo = hi = 0, when it is all zero)."""
    box = content_box(sitk.GetArrayViewFromImage(image)) or ((0, 0, 0), (0, 0, 0))
    return CaseGrid(
        shape=tuple(image.GetSize()[::-1]),  # type: ignore[arg-type]
        spacing=tuple(float(s) for s in image.GetSpacing()),  # type: ignore[arg-type]
        direction=tuple(float(d) for d in image.GetDirection()),
        box_lo=box[0], box_hi=box[1], channels=1,  # type: ignore[arg-type]
        origin=tuple(float(o) for o in image.GetOrigin()),  # type: ignore[arg-type]
        stored_bytes=int(image.GetNumberOfPixels()) * int(image.GetSizeOfPixelComponent()),
    )


def _on_same_grid(a: CaseGrid, b: CaseGrid, tol: float = 1e-4) -> bool:
    return a.shape == b.shape and all(
        np.allclose(x, y, atol=tol) for x, y in ((a.spacing, b.spacing), (a.origin, b.origin), (a.direction, b.direction)))


def _box_on(grid: CaseGrid, reference: CaseGrid) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """``grid``'s content box as the covering box on ``reference``'s array grid, clipped to it.

    The corners of the box's voxels go through world space, as the pipeline's resampling onto the first
    input maps them; a channel on another grid contributes its content where the reference grid sees it.
    """
    corners = np.array([[*c, 1.0] for c in itertools.product(
        *[(a - 0.5, b - 0.5) for a, b in zip(grid.box_lo[::-1], grid.box_hi[::-1])])])
    ijk = (np.linalg.inv(reference.index_to_world()) @ grid.index_to_world() @ corners.T)[:3].T
    size = np.asarray(reference.shape[::-1])
    first = np.clip(np.floor(ijk.min(axis=0) + 0.5), 0, size).astype(int)
    last = np.clip(np.ceil(ijk.max(axis=0) + 0.5), 0, size).astype(int)
    if np.any(last <= first):
        return None
    return tuple(int(v) for v in first[::-1]), tuple(int(v) for v in last[::-1])


def combine_grids(grids: Sequence[CaseGrid]) -> CaseGrid:
    """One case from the :func:`image_grid` of each channel (card order; the first one's grid is the case's).

    Channels on the first grid add their content box; channels on other grids add theirs mapped onto it
    (the pipeline resamples them onto the first grid). Raises the pipeline's error when all are empty.
    """
    reference = grids[0]
    boxes = []
    for grid in grids:
        if grid.empty:
            continue
        box = (grid.box_lo, grid.box_hi) if _on_same_grid(grid, reference) else _box_on(grid, reference)
        if box is not None:
            boxes.append(box)
    if not boxes:
        raise InputImageError("All input images are zero everywhere; there is nothing to segment.")
    lo = tuple(min(b[0][a] for b in boxes) for a in range(3))
    hi = tuple(max(b[1][a] for b in boxes) for a in range(3))
    return replace(reference, box_lo=lo, box_hi=hi, channels=len(grids),
                   stored_bytes=sum(grid.stored_bytes for grid in grids))


def case_grid(images: Sequence[sitk.Image]) -> CaseGrid:
    """The :class:`CaseGrid` of one case's images, in the card's channel order."""
    return combine_grids([image_grid(image) for image in images])


def _reorder(case: CaseGrid, card: ModelCard) -> AxisReorder:
    return reorder_to(np.asarray(case.direction, dtype=float).reshape(3, 3), card.orientation)


def cropped_shape(case: CaseGrid, card: ModelCard) -> tuple[int, int, int]:
    """(z, y, x) of the SegMamba crop: the content box (or the whole grid) in the card's orientation."""
    source = case.box_shape if card.preprocessing.crop_nonzero else case.shape
    reorder = _reorder(case, card)
    itk = source[::-1]  # (x, y, z): ITK index axes
    return tuple(itk[reorder.source_axis[t]] for t in (2, 1, 0))  # type: ignore[return-value]


def network_shape(case: CaseGrid, card: ModelCard, nnunet_settings: Any = None) -> tuple[int, int, int]:
    """The (z, y, x) grid the network's windows tile, as the card's recipe will make it.

    SegMamba: the crop in the card's orientation, resampled to ``preprocessing.spacing`` when the card
    names one. nnU-Net (an nnU-Net card, or ``nnunet_settings`` given): transposed, cropped and resampled
    to the plans' spacing (``nnunet_settings``: the card's :class:`..models.nnunet.NnunetSettings`, read
    from its result folder when None).
    """
    if nnunet_settings is not None or recipe_for(card).tiling == "nnunet":
        from .recipes.nnunet import nnunet_target_shape

        settings = nnunet_settings if nnunet_settings is not None else _nnunet_settings(card, None, None)
        spacing_zyx = case.spacing[::-1]
        order = settings.transpose_forward
        shape = nnunet_target_shape([case.box_shape[a] for a in order], [spacing_zyx[a] for a in order],
                                    settings.spacing)
        return tuple(int(n) for n in shape)  # type: ignore[return-value]
    reorder = _reorder(case, card)
    spacing_zyx = tuple(float(case.spacing[reorder.source_axis[t]]) for t in (2, 1, 0))
    return tuple(int(n) for n in segmamba_network_grid(cropped_shape(case, card), spacing_zyx,  # type: ignore[return-value]
                                                       card.preprocessing))


def _nnunet_settings(card: ModelCard, weights: str | Path | None, folds: Sequence[str | int] | None) -> Any:
    from ..models.nnunet import model_for_card

    return model_for_card(card, weights, folds).settings


def network_passes(shape: Sequence[int], settings: WindowSettings) -> int:
    """Network passes over a grid: windows times mirror flips (what the time is proportional to)."""
    return count_windows(shape, settings) * len(mirror_flips(settings.mirror_axes))


def output_channels(card: ModelCard) -> int:
    """Channels of the logits: one per region (sigmoid models) or per label value with background."""
    return len(card.labels) if card.inference.output == "sigmoid_regions" else len(card.label_values)


# ---------------------------------------------------------------- buffers, counted from the code


@dataclass(frozen=True)
class Buffers:
    """Bytes the run holds besides the runtime, the weights and the network's working set, per phase."""

    prepare: int
    network: int
    restore: int

    @property
    def peak(self) -> int:
        return max(self.prepare, self.network, self.restore)


def buffer_bytes(case: CaseGrid, card: ModelCard, grid: Sequence[int], settings: WindowSettings,
                 confidence: bool = False) -> Buffers:
    """The arrays :func:`.pipeline.segment` and the recipes hold at the peak of each phase, in bytes.

    Counted from the code (float32 unless said; C channels, K logit channels; "full" is the first input's
    grid, "box" the crop, "grid" the network grid, "padded" the grid padded to at least one window):

    * all phases: the images as the caller holds them (``case.stored_bytes``), the run's float32 copies
      (C·full) and their stack (C·full), alive through the run;
    * prepare: the reoriented copy (C·full, unless the card's orientation is the input's), the finite and
      non-zero masks (C·full and full bytes), the normalised crop (C·box), and the network input (C·grid)
      when it is resampled; nnU-Net also two float64 channel volumes while resampling;
    * network: the network input (C·grid), its padded copy (C·padded, when padded), the stitching sum
      (K·padded) and weight map (padded), and the final division's copy (K·grid); with mirror TTA (MONAI
      tiling) the flipped input (C·grid), the running sum and the flipped-back logits (2·K·grid);
    * restore: the network input and logits (C·grid, K·grid), logits resampled back to the crop (K·box,
      when resampled), the argmax (int64, 8 bytes per voxel), the label map pasted on the full grid
      (1 byte), and with confidence its float32 crop and full-grid paste.
    """
    C, K = case.channels, output_channels(card)
    full, box = case.voxels, math.prod(case.box_shape)
    grid_n = math.prod(grid)
    padded = math.prod(max(int(g), int(r)) for g, r in zip(grid, settings.roi_size))
    nnunet = settings.tiling == "nnunet"
    resampled = nnunet or card.preprocessing.spacing is not None
    images = case.stored_bytes + 2 * C * full * _FLOAT
    reorder = _reorder(case, card)
    identity = tuple(reorder.source_axis) == (0, 1, 2) and not any(reorder.flip)
    prepare = images + C * full * (0 if identity or nnunet else _FLOAT) + C * full + full
    prepare += C * box * _FLOAT + (C * grid_n * _FLOAT if resampled else 0)
    if nnunet:
        prepare += 8 * (box + grid_n)
    network = images + C * grid_n * _FLOAT + (C * padded * _FLOAT if padded != grid_n else 0)
    network += (K + 1) * padded * _FLOAT + K * grid_n * _FLOAT
    if settings.mirror_axes and not nnunet:
        network += (C + 2 * K) * grid_n * _FLOAT
    restore = images + (C + K) * grid_n * _FLOAT + (K * box * _FLOAT if resampled else 0) + 8 * box + full
    if confidence:
        restore += box * _FLOAT + full * _FLOAT
    return Buffers(prepare=prepare, network=network, restore=restore)


# ---------------------------------------------------------------- the estimate


@dataclass(frozen=True)
class Estimate:
    """The prediction for one run; sizes in bytes, None where unknown."""

    windows: int
    network_shape: tuple[int, ...]
    device: str
    seconds: float | None
    #: Peak resident size of the process that runs the network.
    peak_bytes: int
    #: True when the network's own share is not measured yet: ``peak_bytes`` is then a lower bound.
    peak_is_lower_bound: bool
    gpu_peak_bytes: int | None
    free_bytes: int | None
    gpu_free_bytes: int | None
    low_memory: bool = False
    #: Bytes already resident in the process that will run (counted in ``peak_bytes``, not needed anew).
    resident_bytes: int = 0
    buffers: Buffers | None = field(default=None, compare=False)


def estimate(case: CaseGrid, card: ModelCard, settings: WindowSettings, device: str, rate: Rate | None, *,
             free_bytes: int | None, gpu_free_bytes: int | None = None, confidence: bool = False,
             low_memory: bool = False, resident_bytes: int = 0, nnunet_settings: Any = None,
             warm: bool = False) -> Estimate:
    """Windows, time and peak memory of a run of ``card`` on ``case`` with ``settings`` on ``device``.

    ``device`` is the torch device type ("cpu", "cuda", "mps"). Time is windows × the measured seconds per
    window, plus the warm-up of a process's first window unless ``warm`` (the process already ran this
    network), plus the measured time outside the network per input voxel (when a real run measured it);
    reading files and loading the model are not included.
    The host peak is runtime + weights on the CPU + the largest phase of :func:`buffer_bytes`, the
    network phase including one window's working set on the CPU; on a GPU the weights and working set
    are the GPU's peak instead. Unknown parts are left out and the peak marked as a lower bound.
    """
    grid = network_shape(case, card, nnunet_settings)
    windows = network_passes(grid, settings)
    buffers = buffer_bytes(case, card, grid, settings, confidence)
    window = rate.window_bytes if rate is not None else None
    seconds = None
    if rate is not None:
        seconds = windows * rate.seconds_per_window + (0.0 if warm else rate.warmup_seconds or 0.0)
        if rate.overhead_seconds_per_megavoxel is not None:
            seconds += rate.overhead_seconds_per_megavoxel * case.voxels * case.channels / 1e6
    on_gpu = device == "cuda"  # Apple's GPU shares the main memory: counted as the host's
    host = max(buffers.prepare, buffers.network + (0 if on_gpu else window or 0), buffers.restore)
    if rate is not None:
        host += (rate.runtime_bytes or 0) + (0 if on_gpu else rate.weights_bytes)
    host_known = rate is not None and rate.runtime_bytes is not None and (on_gpu or window is not None)
    gpu = rate.weights_bytes + window if on_gpu and rate is not None and window is not None else None
    return Estimate(windows=windows, network_shape=tuple(grid), device=device, seconds=seconds,
                    peak_bytes=host, peak_is_lower_bound=not host_known, gpu_peak_bytes=gpu, free_bytes=free_bytes,
                    gpu_free_bytes=gpu_free_bytes, low_memory=low_memory, resident_bytes=resident_bytes,
                    buffers=buffers)


@dataclass(frozen=True)
class Shortfall:
    """The estimate says the run does not fit: where ("memory" or "GPU memory"), needed and free bytes."""

    where: str
    needed_bytes: int
    free_bytes: int
    low_memory: bool
    on_gpu: bool


def memory_shortfall(est: Estimate) -> Shortfall | None:
    """A :class:`Shortfall` when the run clearly needs more than is free, else None.

    "Clearly": the memory still to be allocated (the predicted peak less what the process already holds)
    exceeds what the system reports available. Free memory that is unknown never refuses a run. A GPU is
    checked first: running out there fails at once, while the main memory check uses the host peak.
    """
    if est.gpu_peak_bytes is not None and est.gpu_free_bytes is not None and est.gpu_peak_bytes > est.gpu_free_bytes:
        return Shortfall("GPU memory", est.gpu_peak_bytes, est.gpu_free_bytes, est.low_memory, on_gpu=True)
    if est.free_bytes is not None:
        needed = est.peak_bytes - est.resident_bytes
        if needed > est.free_bytes:
            return Shortfall("memory", needed, est.free_bytes, est.low_memory, on_gpu=est.device != "cpu")
    return None


def format_bytes(size: int | None) -> str:
    """``1.2 GiB`` or ``640 MiB``; ``unknown`` for None."""
    if size is None:
        return "unknown"
    if size >= GIB:
        return f"{size / GIB:.1f} GiB"
    return f"{max(1, round(size / 2**20))} MiB"


def format_duration(seconds: float) -> str:
    """``35 s``, ``4 min``, ``1.3 h``: as precise as an estimate deserves."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


def summary(est: Estimate, unknown_time: str = "time measured during the first run") -> str:
    """One line: windows, time, peak memory and free memory (``60 windows, ~35 s, peak ~1.2 GiB (free 18.3 GiB)``)."""
    windows = f"{est.windows} window{'s' if est.windows != 1 else ''}"
    time_part = f"~{format_duration(est.seconds)}" if est.seconds is not None else unknown_time
    peak = (f"peak ≥ {format_bytes(est.peak_bytes)} (the network's share measured during the first run)"
            if est.peak_is_lower_bound else f"peak ~{format_bytes(est.peak_bytes)}")
    text = f"{windows}, {time_part}, {peak} (free {format_bytes(est.free_bytes)})"
    if est.gpu_peak_bytes is not None:
        text += f", GPU peak ~{format_bytes(est.gpu_peak_bytes)} (free {format_bytes(est.gpu_free_bytes)})"
    return text


def shortfall_message(short: Shortfall, low_memory_hint: str, cpu_hint: str) -> str:
    """What to tell the user: what is needed and free, and what to change (named by the front end's hints)."""
    head = (f"this run needs about {format_bytes(short.needed_bytes)} of {short.where} but only "
            f"{format_bytes(short.free_bytes)} is free, so it would probably be stopped for lack of memory.")
    fixes = []
    if not short.low_memory:
        fixes.append(f"turn on {low_memory_hint} (slower, less memory)")
    if short.on_gpu and short.where == "GPU memory":
        fixes.append(f"run on {cpu_hint} (slower, uses the main memory)")
    fixes.append("close other programs" if short.where == "memory" else "close other programs using the GPU")
    return f"{head} Try: {'; '.join(fixes)}."


# ---------------------------------------------------------------- one run, as the front ends ask


def estimate_run(case: CaseGrid, card: ModelCard, options: SegmentOptions, device: torch.device, *,
                 threads: int | None = None, resident_bytes: int = 0, gpu_free_bytes: int | None = None,
                 warm: bool = False, cache: str | os.PathLike[str] | None = None) -> tuple[Estimate, str, Rate | None]:
    """The estimate of a run with ``options``, from the rate cached for it; also its key and that rate.

    Free memory is read now; ``gpu_free_bytes`` None reads the CUDA device's (in-process front ends) —
    the Slicer module passes its GPU's total instead, so that no CUDA context is made in Slicer itself.
    """
    from .pipeline import window_settings

    settings = window_settings(card, options)
    key = run_key(card, options, device, threads)
    rate = cached_rate(key, cache)
    nnunet = _nnunet_settings(card, options.weights, options.folds) if settings.tiling == "nnunet" else None
    gpu_free = gpu_free_bytes if gpu_free_bytes is not None else gpu_free_memory(device)
    est = estimate(case, card, settings, device.type, rate, free_bytes=available_memory(), gpu_free_bytes=gpu_free,
                   confidence=options.confidence, low_memory=options.low_memory,
                   resident_bytes=resident_bytes, nnunet_settings=nnunet, warm=warm)
    return est, key, rate

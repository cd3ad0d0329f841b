"""Qt-free segmentation logic on an MRML scene (the Slicer module's Logic and widget delegate here).

It turns the selected volume nodes into images with their exact world geometry, runs the one
shared pipeline — in this process (scripts, self-test) or in a background worker process that stays
warm between runs (the GUI) — and writes the label map into a segmentation node on the first input's
grid. It also holds what the widget shows but can be decided without Qt: the device list and info
line, the progress/ETA text, the volumes table, and the label/region display switch. It works in the
Slicer application and on a headless slicer-core scene.

Review display: each label is a segment sharing one labelmap layer; each derived region (e.g.
BraTS TC/WT/ET) is an extra segment of the same segmentation on a layer of its own (regions
overlap), hidden until the user switches the display to regions. The segment IDs are those of the
CLI's .seg.nrrd files, so a saved result looks the same whichever way it was made. A result with a
confidence map also gets a scalar volume "<segmentation> confidence", referenced from the segmentation
(role :data:`CONFIDENCE_ROLE`, so it is found again after the scene is saved and reloaded), shown as a
colour overlay of the voxels below the review threshold; the table's numbers come from :mod:`.review`.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk
from torch import nn

from ..engine import estimate as estimates
from ..engine.devices import resolve_device
from ..engine.memory import process_rss
from ..engine.pipeline import SegmentationResult, SegmentOptions, load_network, segment
from ..errors import CancelCallback, CheckpointError, InputImageError, ProgressCallback
from ..io.seg_nrrd import segment_ids
from ..models.cards import LabelSpec, ModelCard
from ..run.worker import (
    WarmWorker,
    WorkerError,
    WorkerEvent,
    WorkerProcess,
    default_worker_threads,
    usable_cpu_count,
)
from . import mrml
from .review import PriorComparison, compare_with_prior

if TYPE_CHECKING:
    import slicer

_SCRATCH_NODE_NAME = "SegMamba region (temporary)"
#: Node reference role from a result segmentation to its confidence volume.
CONFIDENCE_ROLE = "SegMambaConfidence"
#: Red (least sure) to blue: Slicer's HotToColdRainbow table (Base/Logic/Resources/ColorFiles, 5.10-5.12).
CONFIDENCE_COLOR_NODE_ID = "vtkMRMLColorTableNodeFileHotToColdRainbow.txt"
#: Opacity of the confidence overlay: the anatomy stays readable under it.
CONFIDENCE_OPACITY = 0.4


# ---------------------------------------------------------------- device list and info line


@dataclass(frozen=True)
class GpuInfo:
    """One CUDA device as the device selector lists it."""

    index: int
    name: str
    memory_gib: float


@dataclass(frozen=True)
class SystemInfo:
    """What the device selector and its info line show; ``fused_kernels`` is None when usable, else why not."""

    torch_version: str
    cuda_build: str | None
    gpus: tuple[GpuInfo, ...]
    mps: bool
    fused_kernels: str | None
    nvidia_driver: bool

    @property
    def cuda_usable(self) -> bool:
        """A CUDA GPU torch can use (what the fused kernels need)."""
        return bool(self.gpus)


def system_info() -> SystemInfo:
    """Probe torch, the GPUs and the fused kernels of this Python (the worker's Python is the same one)."""
    import torch

    from ..networks.ops.scan import available_backends

    gpus: tuple[GpuInfo, ...] = ()
    if torch.cuda.is_available():
        properties = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
        gpus = tuple(GpuInfo(i, p.name, p.total_memory / 2**30) for i, p in enumerate(properties))
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    return SystemInfo(
        torch_version=torch.__version__, cuda_build=torch.version.cuda, gpus=gpus, mps=bool(mps),
        fused_kernels=available_backends()["fused"], nvidia_driver=shutil.which("nvidia-smi") is not None,
    )


def device_choices(info: SystemInfo) -> list[tuple[str, str]]:
    """(device value for SegmentOptions, label) pairs for the device selector; automatic first."""
    if info.gpus:
        auto = f"Automatic (GPU {info.gpus[0].index}: {info.gpus[0].name})"
    else:
        auto = "Automatic (Apple GPU)" if info.mps else "Automatic (CPU)"
    choices = [("auto", auto)]
    choices += [(f"cuda:{g.index}", f"GPU {g.index}: {g.name} ({g.memory_gib:.0f} GB)") for g in info.gpus]
    if info.mps:
        choices.append(("mps", "Apple GPU (MPS)"))
    choices.append(("cpu", "CPU (slow: several minutes per case)"))
    return choices


def describe_system(info: SystemInfo) -> str:
    """The info line under the device selector, including the fix for the usual GPU problems."""
    build = f"CUDA {info.cuda_build} build" if info.cuda_build else "CPU-only build"
    parts = [f"PyTorch {info.torch_version} ({build})"]
    if info.gpus:
        parts.append(", ".join(f"GPU {g.index}: {g.name}, {g.memory_gib:.1f} GB" for g in info.gpus))
    elif info.mps:
        parts.append("Apple GPU (MPS) available")
    else:
        parts.append("no GPU in use")
    parts.append("fast fused Mamba kernels: " + ("yes" if info.fused_kernels is None else "no (pure PyTorch scan)"))
    text = "; ".join(parts) + "."
    if info.cuda_build and not info.gpus:
        text += (" This PyTorch is built for CUDA but finds no usable NVIDIA GPU: update the NVIDIA driver, "
                 "or reinstall PyTorch for your GPU with the PyTorch extension.")
    elif not info.cuda_build and info.nvidia_driver:
        text += (" An NVIDIA driver is installed but this PyTorch cannot use it: reinstall PyTorch with CUDA "
                 "through the PyTorch extension to segment on the GPU.")
    return text


# ---------------------------------------------------------------- progress


@dataclass
class ProgressClock:
    """Estimates the time left from the network phase's progress fraction.

    The clock starts at the last report with fraction 0 (reading, loading the model), so that start-up
    time does not distort the rate of windows.
    """

    clock: Callable[[], float] = time.monotonic
    _start: float | None = None

    def update(self, fraction: float) -> float | None:
        """Record a progress fraction; returns the estimated seconds left, or None while unknown."""
        now = self.clock()
        if fraction <= 0.0 or self._start is None:
            self._start = now
            return None
        return (now - self._start) * (1.0 - fraction) / fraction


def format_seconds(seconds: float) -> str:
    """``m:ss`` or ``h:mm:ss``, rounded up so that a run never shows "0:00 left" while working."""
    total = math.ceil(max(seconds, 0.0))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress_text(message: str, seconds_left: float | None) -> str:
    """Text inside the progress bar: the step or window count, and the time left while there is some."""
    if seconds_left is None or seconds_left <= 0.0:
        return message
    return f"{message} · about {format_seconds(seconds_left)} left"


# ---------------------------------------------------------------- review


@dataclass(frozen=True)
class VolumeRow:
    """One row of the volumes table: a label or a derived region."""

    name: str
    kind: str  # "label" | "region"
    segment_id: str
    volume_ml: float
    color: tuple[float, float, float]


def volume_rows(result: SegmentationResult) -> list[VolumeRow]:
    """Volumes table rows (labels, then regions) from the result's volumes, with their segment IDs."""
    card = result.card
    ids = segment_ids(card.labels, card.regions)
    rows = [VolumeRow(label.name, "label", segment_id, result.volumes[label.name], label.color)
            for label, segment_id in zip(card.labels, ids)]
    rows += [VolumeRow(region.display_name, "region", segment_id, result.volumes[region.name], region.color)
             for region, segment_id in zip(card.regions, ids[len(card.labels):])]
    return rows


def show_regions(segmentation_node: object, card: ModelCard, regions: bool) -> None:
    """Show the derived regions (True) or the labels (False) of a result segmentation, hiding the other."""
    ids = segment_ids(card.labels, card.regions)
    display = segmentation_node.GetDisplayNode()
    segmentation = segmentation_node.GetSegmentation()
    for index, segment_id in enumerate(ids):
        if segmentation.GetSegment(segment_id) is not None:
            display.SetSegmentVisibility(segment_id, (index >= len(card.labels)) == regions)


def show_surfaces(segmentation_node: object, visible: bool) -> None:
    """Show or hide the segmentation as 3-D surfaces (made from the label maps on first use)."""
    if visible:
        segmentation_node.CreateClosedSurfaceRepresentation()
    segmentation_node.GetDisplayNode().SetVisibility3D(visible)


def add_confidence_volume(segmentation_node: object, confidence: sitk.Image, scene: object) -> object:
    """Add the confidence map as "<segmentation> confidence" (replacing the one of an earlier run).

    Coloured on a fixed 0-1 window, so that a colour means the same confidence in every case; the threshold
    that hides the confident voxels is set by :func:`show_confidence`.
    """
    earlier = segmentation_node.GetNodeReference(CONFIDENCE_ROLE)
    if earlier is not None:
        scene.RemoveNode(earlier)
    node = mrml.volume_node_from_image(confidence, scene, f"{segmentation_node.GetName()} confidence")
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID(CONFIDENCE_COLOR_NODE_ID)
    display.SetAutoWindowLevel(0)
    display.SetWindowLevelMinMax(0.0, 1.0)
    display.SetAutoThreshold(0)
    display.SetApplyThreshold(1)
    segmentation_node.SetNodeReferenceID(CONFIDENCE_ROLE, node.GetID())
    return node


def show_confidence(segmentation_node: object, visible: bool, threshold: float) -> None:
    """Overlay the voxels whose confidence is below ``threshold`` in every slice view, or take the overlay away.

    The upper display threshold is the largest value below ``threshold``, so the overlay shows exactly the
    voxels the review table counts. Hiding leaves a foreground the user chose for another volume alone.
    """
    node = segmentation_node.GetNodeReference(CONFIDENCE_ROLE)
    if node is None:
        return
    node.GetDisplayNode().SetThreshold(0.0, math.nextafter(threshold, -math.inf))
    scene = segmentation_node.GetScene()
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(index, "vtkMRMLSliceCompositeNode")
        if visible:
            composite.SetForegroundVolumeID(node.GetID())
            composite.SetForegroundOpacity(CONFIDENCE_OPACITY)
        elif composite.GetForegroundVolumeID() == node.GetID():
            composite.SetForegroundVolumeID(None)


def write_report(path: str | Path, result: SegmentationResult, input_nodes: Sequence[object],
                 options: SegmentOptions) -> Path:
    """The one-page PDF report of a result shown in the module (see docs/review.md), from its input nodes."""
    from ..evaluation.case_report import write_case_report

    image = mrml.image_from_volume_node(input_nodes[0])
    return write_case_report(path, result, image, options, [node.GetName() for node in input_nodes])


#: The volume node attribute in which Slicer's DICOM module lists the instances a volume was loaded from.
DICOM_INSTANCES_ATTRIBUTE = "DICOM.instanceUIDs"


def write_dicom_segmentation(path: str | Path, result: SegmentationResult, input_node: object,
                             file_for_instance: Callable[[str], str]) -> Path:
    """A DICOM SEG of the result, referencing the DICOM series the first input was loaded from.

    Slicer's DICOM module records the series' instance UIDs on the volume node; ``file_for_instance``
    (``slicer.dicomDatabase.fileForInstance`` in the application) finds their files. The label map lies
    on that volume's grid, which is the series' grid.
    """
    from ..io.dicom_seg import DicomSegError, check_highdicom, read_source_files, write_dicom_seg

    check_highdicom()
    uids = (input_node.GetAttribute(DICOM_INSTANCES_ATTRIBUTE) or "").split()
    if not uids:
        raise DicomSegError(
            f"The volume '{input_node.GetName()}' was not loaded from DICOM (Slicer's DICOM module), so a DICOM "
            "segmentation has no series to reference; load the study through the DICOM module to export one."
        )
    files = [file_for_instance(uid) for uid in uids]
    source = read_source_files([f for f in files if f], f"the volume '{input_node.GetName()}'")
    card = result.card
    return write_dicom_seg(result.labelmap, card.labels, source, path, algorithm_name=card.display_name,
                           algorithm_version=card.id)


def prior_comparison(result: SegmentationResult, prior_node: object) -> PriorComparison:
    """Compare a result with a prior segmentation or label map node of the same patient space (not registered)."""
    prior = mrml.prior_labelmap(prior_node, result.card.labels)
    return compare_with_prior(result, prior, f"The prior '{prior_node.GetName()}'")


def _add_region_segments(node: object, labelmap: sitk.Image, card: ModelCard, scene: object) -> None:
    """Add each region as a segment on its own layer (regions overlap), hidden until asked for.

    The MRML adapter puts all segments of one call on one shared layer, so each region mask is
    imported into a scratch node and its segment copied over.
    """
    array = sitk.GetArrayViewFromImage(labelmap)
    segmentation = node.GetSegmentation()
    display = node.GetDisplayNode()
    for region, segment_id in zip(card.regions, segment_ids(card.labels, card.regions)[len(card.labels):]):
        mask = sitk.GetImageFromArray(np.isin(array, region.labels).astype(np.uint8))
        mask.CopyInformation(labelmap)
        scratch = mrml.import_labelmap_to_segmentation(
            mask, [LabelSpec(1, segment_id, region.color)], scene, name=_SCRATCH_NODE_NAME)
        try:
            segmentation.CopySegmentFromSegmentation(scratch.GetSegmentation(), segment_id, False)
        finally:
            scene.RemoveNode(scratch)
        segmentation.GetSegment(segment_id).SetName(region.display_name)
        display.SetSegmentVisibility(segment_id, False)


# ---------------------------------------------------------------- running


@dataclass(frozen=True)
class RunUpdate:
    """One change of the run panel: the progress bar (value out of 1000, text) or a line for the log."""

    value: int | None = None
    text: str = ""
    log: str = ""


@dataclass
class SegmentationRun:
    """A segmentation running in a worker process, started by :meth:`SegmentationLogic.start_segmentation`."""

    worker: WorkerProcess
    card: ModelCard
    input_nodes: list[object]
    segmentation_node: object | None
    clock: ProgressClock = field(default_factory=ProgressClock)

    def poll(self) -> list[WorkerEvent]:
        """New worker events (never blocks); call from a timer until :attr:`finished`."""
        return self.worker.poll()

    def updates(self) -> list[RunUpdate]:
        """What the panel shows for the new events: progress bar states and log lines, in order."""
        shown: list[RunUpdate] = []
        for event in self.poll():
            if event.kind == "progress":
                seconds_left = self.clock.update(event.fraction)
                shown.append(RunUpdate(round(1000 * event.fraction), progress_text(event.message, seconds_left)))
            elif event.kind in ("log", "stderr") and event.message.strip():
                shown.append(RunUpdate(log=event.message))
            elif event.kind == "started":
                shown.append(RunUpdate(log=f"Worker process {event.data.get('pid')} started "
                                           f"({event.data.get('python')})."))
            elif event.kind == "network":
                how = "reused the network it had loaded" if event.data.get("reused") else "loaded the network"
                shown.append(RunUpdate(log=f"Worker process {event.data.get('pid')} {how}."))
        return shown

    @property
    def finished(self) -> bool:
        return self.worker.finished

    def cancel(self) -> None:
        """Stop the worker at once; the scene is left untouched."""
        self.worker.cancel()


@dataclass
class SegmentationLogic:
    """Segments volume nodes of one scene; keeps the last loaded network for repeated in-process runs, and
    a warm worker process (:attr:`worker`) with the last network loaded for repeated background runs."""

    scene: object
    worker: WarmWorker = field(default_factory=WarmWorker, repr=False)
    _cache_key: tuple | None = field(default=None, repr=False)
    _network: nn.Module | None = field(default=None, repr=False)
    #: Grid and content box per volume node ID, with the modification times they were computed at.
    _grids: dict[str, tuple[tuple[int, ...], estimates.CaseGrid]] = field(default_factory=dict, repr=False)
    #: What the worker's last job ran (:meth:`_network_of`): the next job with the same one starts warm.
    _worker_network: tuple | None = field(default=None, repr=False)

    def estimate(self, input_nodes: Sequence[object], card: ModelCard, options: SegmentOptions | None = None,
                 threads: int | None = None) -> estimates.Estimate:
        """The estimate of a background run of these nodes (windows, time, peak memory, free memory).

        Cheap enough to call whenever an input, the model or an option changes: each volume's grid and
        content box are computed once per modification of the volume. The time comes from the rate the
        worker measured in earlier runs on this computer (none before the first run); a warm worker's
        resident memory counts as available to the run, which reuses or replaces what it holds. On a
        GPU the device's total memory stands for its free memory, so that Slicer makes no CUDA context.
        """
        options = options or SegmentOptions()
        grids = [self._grid_of(node) for node in self._checked_nodes(input_nodes, card)]  # input errors first
        device = resolve_device(options.device)
        pid = self.worker.pid
        resident = (process_rss(pid) or 0) if pid is not None else 0
        gpu_total = None
        if device.type == "cuda":
            import torch

            index = device.index if device.index is not None else torch.cuda.current_device()
            gpu_total = int(torch.cuda.get_device_properties(index).total_memory)
        workers = default_worker_threads(usable_cpu_count()) if threads is None else threads
        warm = pid is not None and self._worker_network == self._network_of(card, options, device)
        est, _key, _rate = estimates.estimate_run(estimates.combine_grids(grids), card, options, device,
                                                  threads=workers, resident_bytes=resident, gpu_free_bytes=gpu_total,
                                                  warm=warm)
        return est

    @staticmethod
    def _network_of(card: ModelCard, options: SegmentOptions, device: object) -> tuple:
        """What decides whether the warm worker reuses its network (as the worker's own network key does)."""
        weights = Path(options.weights).expanduser() if options.weights else card.weights_path()
        return (card.id, card.architecture, str(weights), str(device), tuple(map(str, options.folds or ())),
                options.scan_backend)

    def _grid_of(self, node: slicer.vtkMRMLScalarVolumeNode) -> estimates.CaseGrid:
        image_data = node.GetImageData()
        transform = node.GetParentTransformNode()
        stamp = (node.GetMTime(), image_data.GetMTime() if image_data is not None else 0,
                 transform.GetMTime() if transform is not None else 0)
        cached = self._grids.get(node.GetID())
        if cached is None or cached[0] != stamp:
            cached = (stamp, estimates.image_grid(mrml.image_from_volume_node(node)))
            self._grids[node.GetID()] = cached
        return cached[1]

    def network_for(self, card: ModelCard, options: SegmentOptions) -> nn.Module:
        """Load (or reuse) the card's network on the requested device."""
        device = resolve_device(options.device)
        weights = Path(options.weights).expanduser() if options.weights else card.weights_path()
        folds = tuple(options.folds) if options.folds else None
        key = (card.id, card.architecture, str(weights), str(device), folds)
        if key != self._cache_key or self._network is None:
            self._network = load_network(card, options.weights, device, options.folds)
            self._cache_key = key
        return self._network

    def segment_nodes(
        self,
        input_nodes: Sequence[object],
        card: ModelCard,
        options: SegmentOptions | None = None,
        segmentation_node: object | None = None,
        progress: ProgressCallback | None = None,
        cancel: CancelCallback | None = None,
        network: nn.Module | None = None,
        *,
        in_worker: bool = False,
    ) -> tuple[object, SegmentationResult]:
        """Segment one case given as volume nodes (card channel order) and wait; returns (node, result).

        ``in_worker=True`` runs the network in the warm worker process (crash-proof, Ctrl+C kills it);
        otherwise it runs here. Either way the loaded network is reused between calls.
        """
        options = options or SegmentOptions()
        images = self._images(input_nodes, card)
        if in_worker:
            if network is not None:
                raise WorkerError("A network object cannot be sent to a worker process; run it in-process.")
            result = self.worker.start(images, card, options).run(progress, cancel)
        else:
            network = network or self.network_for(card, options)
            result = segment(images, card, options, progress=progress, cancel=cancel, network=network)
        return self.import_result(result, input_nodes[0], segmentation_node), result

    def segment_node_groups(
        self,
        groups: Sequence[Sequence[object]],
        card: ModelCard,
        options: SegmentOptions | None = None,
        progress: ProgressCallback | None = None,
        cancel: CancelCallback | None = None,
        network: nn.Module | None = None,
    ) -> list[tuple[object, SegmentationResult]]:
        """Segment several cases already in the scene, one group of volume nodes per case.

        The network is loaded once and reused; ``progress`` gets the overall fraction over
        all groups. Each case gets its own new segmentation node.
        """
        options = options or SegmentOptions()
        network = network or self.network_for(card, options)
        results = []
        for index, nodes in enumerate(groups):

            def case_progress(fraction: float, message: str, index: int = index) -> None:
                if progress is not None:
                    progress((index + fraction) / len(groups), f"case {index + 1}/{len(groups)}: {message}")

            results.append(self.segment_nodes(nodes, card, options, None, case_progress, cancel, network))
        return results

    def start_segmentation(
        self,
        input_nodes: Sequence[object],
        card: ModelCard,
        options: SegmentOptions | None = None,
        segmentation_node: object | None = None,
        threads: int | None = None,
        idle_timeout: float | None = None,
    ) -> SegmentationRun:
        """Start one case in the warm worker process and return at once (the GUI polls the run).

        Missing weights are reported here, before a fresh worker spends seconds importing PyTorch.
        ``idle_timeout`` (seconds; None keeps the current setting) is how long the worker then stays
        warm for the next run.
        """
        options = options or SegmentOptions()
        weights = Path(options.weights).expanduser() if options.weights else card.weights_path()
        if weights is None or not weights.exists():
            hint = card.weights.instructions or "Use 'Load checkpoint…' to add a weights file for it."
            raise CheckpointError(f"No weights for {card.display_name}{f' at {weights}' if weights else ''}. {hint}")
        if idle_timeout is not None:
            self.worker.idle_timeout = idle_timeout
        job = self.worker.start(self._images(input_nodes, card), card, options, threads=threads)
        self._worker_network = self._network_of(card, options, resolve_device(options.device))
        return SegmentationRun(job, card, list(input_nodes), segmentation_node)

    def finish_segmentation(self, run: SegmentationRun) -> tuple[object, SegmentationResult]:
        """Import a finished run's result into the scene; raises the worker's error or CancelledError."""
        result = run.worker.result()
        return self.import_result(result, run.input_nodes[0], run.segmentation_node), result

    def import_result(
        self, result: SegmentationResult, reference_node: object, segmentation_node: object | None = None
    ) -> object:
        """Write a result into a segmentation node: label segments shown, region segments hidden, and the
        confidence map (when the result has one) as a volume the segmentation references."""
        card = result.card
        node = mrml.import_labelmap_to_segmentation(
            result.labelmap, card.labels, self.scene, segmentation_node=segmentation_node,
            reference_volume_node=reference_node, name=f"{reference_node.GetName()} {card.id} segmentation",
        )
        _add_region_segments(node, result.labelmap, card, self.scene)
        if result.confidence is not None:
            add_confidence_volume(node, result.confidence, self.scene)
        return node

    @staticmethod
    def _checked_nodes(input_nodes: Sequence[object], card: ModelCard) -> Sequence[object]:
        if len(input_nodes) != len(card.channels) or any(n is None for n in input_nodes):
            names = ", ".join(c.display_name for c in card.channels)
            raise InputImageError(f"Select one volume for each input of {card.display_name}: {names}.")
        return input_nodes

    @classmethod
    def _images(cls, input_nodes: Sequence[object], card: ModelCard) -> list[sitk.Image]:
        return [mrml.image_from_volume_node(node) for node in cls._checked_nodes(input_nodes, card)]

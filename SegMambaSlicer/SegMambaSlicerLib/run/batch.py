"""Segment every case in a folder: resumable, atomic, one worker process per device.

The Python-console entry point is :func:`segment_folder` (the Slicer logic calls it too); the command
line ``segmamba-slicer batch INPUT_DIR OUTPUT_DIR --model ...`` (:mod:`..cli.batch`) calls it as well.

Cases are found by :func:`.cases.discover_cases`: either in the BraTS 2023 layout
``<case>/<case>-{t2w,t2f,t1n,t1c}.nii.gz`` or by a pattern such as ``imagesTs/{case}_{index}.nii.gz``.
Every output is written to a hidden temporary file and renamed into place, so an interrupted batch leaves
complete files or none; a case whose label map exists is skipped on the next run unless ``overwrite`` is
set. A case that fails is logged and recorded in the summary CSV, and the batch goes on with the next case.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import queue
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue as MPQueue
from pathlib import Path
from typing import TYPE_CHECKING

import SimpleITK as sitk

from ..engine.volumes import volumes_ml
from ..errors import CancelCallback, CancelledError, InputImageError, ProgressCallback, SegMambaError
from ..io.atomic import (
    OutputError,
    check_writable,
    refuse_overwriting_inputs,
    remove_stale_temporaries,
    write_csv_atomic,
)
from ..io.geometry import same_grid
from ..io.images import read_image, read_image_file, write_image_atomic
from ..models.cards import ModelCard
from .cases import BatchError, Case, discover_cases

if TYPE_CHECKING:  # torch and the pipeline are imported on use: the command line should start fast
    from torch import nn

    from ..engine.pipeline import SegmentationResult, SegmentOptions

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
CaseCallback = Callable[["CaseResult"], None]

DONE, SKIPPED, FAILED = "done", "skipped", "failed"
#: ``local``: this process or one worker process per device; ``ray``: actors on a Ray cluster (run/ray_engine.py).
ENGINES = ("local", "ray")
SUMMARY_NAME = "summary.csv"
OUTPUT_SUFFIX = ".nii.gz"
PREVIEW_SUFFIX = ".png"
#: Seconds between checks for cancellation and for workers that died while the parent waits.
_POLL_SECONDS = 0.5


@dataclass(frozen=True)
class CaseResult:
    """What happened to one case; ``volumes`` (mL per label and region name) also for skipped cases."""

    case_id: str
    status: str
    seconds: float = 0.0
    device: str = ""
    windows: int = 0
    volumes: dict[str, float] = field(default_factory=dict)
    output: Path | None = None
    error: str = ""
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class BatchResult:
    """Every case's result in discovery order and the summary CSV that lists them."""

    cases: tuple[CaseResult, ...]
    summary_csv: Path

    @property
    def failed(self) -> tuple[CaseResult, ...]:
        return tuple(c for c in self.cases if c.status == FAILED)

    @property
    def ok(self) -> bool:
        return not self.failed


# ---------------------------------------------------------------- outputs


def output_path(output_dir: Path, case_id: str) -> Path:
    """Where a case's label map goes: ``<output_dir>/<case>.nii.gz`` (the BraTS submission naming)."""
    return output_dir / f"{case_id}{OUTPUT_SUFFIX}"


def preview_path(output_dir: Path, case_id: str) -> Path:
    return output_dir / f"{case_id}{PREVIEW_SUFFIX}"


def confidence_path(output_dir: Path, case_id: str) -> Path:
    """Where a case's confidence map goes when asked for: ``<output_dir>/<case>_confidence.nii.gz``."""
    return output_dir / f"{case_id}_confidence{OUTPUT_SUFFIX}"


def dicom_seg_path(output_dir: Path, case_id: str) -> Path:
    """Where a case's DICOM segmentation goes when asked for: ``<output_dir>/<case>.dcm``."""
    return output_dir / f"{case_id}.dcm"


def existing_volumes(path: Path, card: ModelCard, reference: Path | None = None) -> dict[str, float] | None:
    """Volumes of a finished case's label map, or None when it is absent, incomplete or off-grid (then redone).

    Only an output that reads back completely (a NIfTI cut short by a full disk is refused, see
    :func:`.imageio.read_image_file`) on the grid of ``reference`` (the case's first input) counts.
    """
    if not path.is_file():
        return None
    try:
        labelmap = read_image_file(path, "existing output")
        if reference is not None and not _on_grid_of(labelmap, reference):
            log.warning("Segmenting %s again: the existing output is not on the grid of %s.", path.name,
                        reference.name)
            return None
        return volumes_ml(labelmap, card)
    except (SegMambaError, RuntimeError, TypeError, ValueError, IndexError) as exc:  # unreadable or not labels
        log.warning("Segmenting %s again: the existing output cannot be read (%s).", path.name, exc)
        return None


def _on_grid_of(image: sitk.Image, reference: Path) -> bool:
    """Whether ``image`` lies on the grid of ``reference``: an image file (only its header is read) or a
    DICOM series folder (read as the pipeline reads it)."""
    if Path(reference).is_dir():
        return same_grid(image, read_image(reference))
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(reference))
    reader.ReadImageInformation()
    return same_grid(image, reader)


def summary_columns(card: ModelCard) -> list[str]:
    """case, status, seconds, device, windows, one ``<name> (mL)`` column per label and region, output, error,
    warnings (about the inputs, e.g. a channel without contrast)."""
    names = [label.name for label in card.labels] + [region.name for region in card.regions]
    return ["case", "status", "seconds", "device", "windows", *(f"{n} (mL)" for n in names), "output", "error",
            "warnings"]


def write_summary(results: Sequence[CaseResult], card: ModelCard, path: Path) -> Path:
    """Write the summary CSV atomically (a killed batch leaves the previous complete summary)."""
    names = [label.name for label in card.labels] + [region.name for region in card.regions]
    rows = ([r.case_id, r.status, f"{r.seconds:.2f}", r.device, r.windows or "",
             *(f"{r.volumes[n]:.6f}" if n in r.volumes else "" for n in names),
             "" if r.output is None else str(r.output), r.error, " ".join(r.warnings)] for r in results)
    return write_csv_atomic(path, summary_columns(card), rows, what="batch summary")


# ---------------------------------------------------------------- one case


@dataclass(frozen=True)
class _Job:
    """Everything a process needs to segment cases (picklable for worker processes)."""

    card: ModelCard
    options: SegmentOptions
    output_dir: Path
    preview: bool
    #: Also write each case's confidence map, and a DICOM SEG referencing its first input's DICOM series.
    confidence: bool = False
    dicom_seg: bool = False

    def extra_outputs(self, case_id: str) -> list[Path]:
        """The outputs asked for besides the label map (and the preview)."""
        return ([confidence_path(self.output_dir, case_id)] if self.confidence else []) + (
            [dicom_seg_path(self.output_dir, case_id)] if self.dicom_seg else [])


def run_case(job: _Job, case: Case, network: nn.Module | None, progress: ProgressCallback | None,
             cancel: CancelCallback | None) -> CaseResult:
    """Segment one case and write its outputs; expected errors become a failed result, cancel propagates."""
    from ..engine.pipeline import segment

    start = time.perf_counter()
    try:
        source = prepare_case(job, case)
        result = segment(list(case.inputs), job.card, job.options, progress, cancel, network)
    except CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - one broken case must not stop a cohort (see case_failed)
        return case_failed(case.case_id, start, exc)
    return write_case(job, case, result, source, start)


def prepare_case(job: _Job, case: Case) -> tuple[object, ...] | None:
    """The checks before a case's network runs; returns the DICOM series its SEG references (None without).

    Raises for a case that cannot be segmented (found without its files, an output that would replace an
    input, an unusable DICOM series), so that it fails before the network. The Ray engine's driver calls it
    too when it reads the cases for actors that do not share the storage.
    """
    if case.problem:
        raise InputImageError(case.problem)
    output = output_path(job.output_dir, case.case_id)
    extra = job.extra_outputs(case.case_id)
    refuse_overwriting_inputs([output, preview_path(job.output_dir, case.case_id), *extra], case.inputs)
    remove_stale_temporaries(output)
    return _dicom_source(case) if job.dicom_seg else None


def case_failed(case_id: str, start: float, exc: Exception) -> CaseResult:
    """The failed result of a case that raised ``exc``: our errors by their message, others with the
    traceback in the log (one broken case must not stop a cohort)."""
    if isinstance(exc, SegMambaError):
        return CaseResult(case_id, FAILED, time.perf_counter() - start, error=str(exc))
    log.error("Case %s failed unexpectedly", case_id, exc_info=exc)
    return CaseResult(case_id, FAILED, time.perf_counter() - start, error=f"unexpected {type(exc).__name__}: {exc}")


def write_case(job: _Job, case: Case, result: SegmentationResult, source: tuple[object, ...] | None,
               start: float) -> CaseResult:
    """Write a segmented case's outputs atomically and return its result; ``start`` is when the case began.

    Called where the case was segmented, or by the Ray engine's driver for the label maps its actors send
    back, so that both write alike. A full disk or a lost folder raises :class:`OutputError` (the batch ends).
    """
    output = output_path(job.output_dir, case.case_id)
    write_image_atomic(result.labelmap, output)  # a full disk or lost folder ends the batch (OutputError)
    if result.confidence is not None:
        write_image_atomic(result.confidence, confidence_path(job.output_dir, case.case_id), what="confidence map")
    if source is not None:
        from ..io.dicom_seg import write_dicom_seg

        write_dicom_seg(result.labelmap, job.card.labels, source, dicom_seg_path(job.output_dir, case.case_id),
                        algorithm_name=job.card.display_name, algorithm_version=job.card.id)
    error = _write_preview(job, case, result.labelmap) if job.preview else ""
    return CaseResult(case.case_id, DONE, time.perf_counter() - start, result.device, result.windows,
                      result.volumes, output, error, result.warnings)


def _dicom_source(case: Case) -> tuple[object, ...]:
    """The DICOM series of the case's first input, which its SEG references (a DicomSegError if unusable)."""
    from ..io.dicom_seg import check_dicom_source, read_source_series

    check_dicom_source(case.inputs[0])
    return read_source_series(case.inputs[0])


def _write_preview(job: _Job, case: Case, labelmap: sitk.Image) -> str:
    """Write the PNG preview; a failure is reported in the summary but does not undo the label map."""
    from ..io.report import write_preview_png

    path = preview_path(job.output_dir, case.case_id)
    try:
        remove_stale_temporaries(path)
        write_preview_png(read_image(case.inputs[0]), labelmap, job.card, path)
    except SegMambaError as exc:
        log.warning("No preview for %s: %s", case.case_id, exc)
        return f"preview not written: {exc}"
    return ""


def _skipped(job: _Job, case: Case) -> CaseResult | None:
    """The result of a case that is already finished (its label map exists and reads), else None.

    A preview that was asked for but is missing is made from the existing label map.
    """
    output = output_path(job.output_dir, case.case_id)
    volumes = existing_volumes(output, job.card, case.inputs[0] if case.inputs else None)
    if volumes is None or not all(path.is_file() for path in job.extra_outputs(case.case_id)):
        return None
    error = ""
    if job.preview and not preview_path(job.output_dir, case.case_id).is_file() and not case.problem:
        error = _write_preview(job, case, sitk.ReadImage(str(output)))
    return CaseResult(case.case_id, SKIPPED, volumes=volumes, output=output, error=error)


# ---------------------------------------------------------------- the batch


def segment_folder(
    input_dir: PathLike,
    output_dir: PathLike,
    model: str | PathLike | ModelCard,
    options: SegmentOptions | None = None,
    *,
    pattern: str | None = None,
    overwrite: bool = False,
    preview: bool = False,
    devices: Sequence[str] | None = None,
    summary_csv: PathLike | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelCallback | None = None,
    on_case: CaseCallback | None = None,
    network: nn.Module | None = None,
    engine: str = "local",
    address: str | None = None,
    confidence: bool = False,
    dicom_seg: bool = False,
    ship_inputs: bool = False,
) -> BatchResult:
    """Segment every case in ``input_dir`` into ``output_dir/<case>.nii.gz`` and write a summary CSV.

    ``model`` is a model id, a card ``.json``, a checkpoint or a :class:`ModelCard`; ``options`` are the
    per-run settings of :func:`.pipeline.segment` (device, weights, overlap, TTA ...). ``pattern`` describes
    the file layout (:func:`discover_cases`). Cases whose label map exists are skipped (and measured for the
    summary) unless ``overwrite``. ``preview`` also writes ``<case>.png``. ``devices`` with more than one
    entry (e.g. ``["cuda:0", "cuda:1"]``) runs one worker process per device, each with its own copy of
    the network; otherwise cases run in this process on ``options.device`` (with ``network``, if given, as
    the already loaded model). ``progress(fraction, message)`` covers cases and windows, ``cancel()``
    returning True stops after the current window and raises :class:`CancelledError` (the summary lists
    the cases finished so far), ``on_case(result)`` is called as each case ends. A failing case does not
    stop the batch: check :attr:`BatchResult.failed`.

    ``engine="ray"`` segments on a Ray cluster instead (docs/scale.md): one actor per GPU or CPU slot, the
    same outputs, summary and resume; ``address`` joins a running cluster (``auto``, ``ray://host:10001``),
    without it a local Ray instance is started for the batch and stopped after it. ``ship_inputs`` (Ray
    only) is for a cluster that does not share the storage with this computer: this process reads every
    case and sends its images through Ray's object store, the actors send the label maps back, and every
    output is written here.

    ``confidence`` also writes ``<case>_confidence.nii.gz`` (see :class:`.pipeline.SegmentOptions`), and
    ``dicom_seg`` a ``<case>.dcm`` DICOM segmentation for cases whose first input is a DICOM series folder
    (``pattern="{case}/{channel}"`` finds series folders named by channel); a case without such a series
    fails with the reason. A finished case missing an asked-for output is segmented again.
    """
    out, summary = check_batch_outputs(output_dir, summary_csv)
    _check_engine(engine, address, devices, network, ship_inputs)
    from ..engine.pipeline import SegmentOptions
    from ..models.registry import resolve_model

    card = model if isinstance(model, ModelCard) else resolve_model(model)
    options = options or SegmentOptions()
    if confidence:
        options = dataclasses.replace(options, confidence=True)
    if dicom_seg:
        from ..io.dicom_seg import check_highdicom

        check_highdicom()
    devices = _check_devices(devices, network)
    cases = discover_cases(input_dir, card, pattern, skip=out)
    job = _Job(card, options, out, preview, confidence, dicom_seg)
    runner = _Runner(cases, job, summary, progress, on_case)
    todo = []
    for case in cases:
        done = None if overwrite else _skipped(runner.job, case)
        if done is None:
            todo.append(case)
        else:
            runner.finish(done, write=False)
    try:
        if engine == "ray":
            _run_on_ray(runner, todo, address, cancel, ship_inputs)
        elif len(devices) > 1 and len(todo) > 1:
            _run_workers(runner, todo, devices[: len(todo)], cancel)
        else:
            if devices:
                runner.job = dataclasses.replace(runner.job, options=dataclasses.replace(options, device=devices[0]))
            _run_here(runner, todo, network, cancel)
    finally:
        runner.write()
    return BatchResult(tuple(runner.ordered()), summary)


def check_batch_outputs(output_dir: PathLike, summary_csv: PathLike | None = None) -> tuple[Path, Path]:
    """The output folder and summary path, checked writable before anything slow (imports, models, cases)."""
    out = Path(output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise BatchError(f"The output folder {out} is a file; give a folder for the results.")
    summary = Path(summary_csv).expanduser() if summary_csv else out / SUMMARY_NAME
    check_writable(output_path(out, "case"), what="label maps")
    check_writable(summary, suffixes=(".csv",), what="batch summary")
    return out, summary


def _check_engine(engine: str, address: str | None, devices: Sequence[str] | None,
                  network: nn.Module | None, ship_inputs: bool = False) -> None:
    """Refuse engine settings that cannot work within seconds, before PyTorch, the model and the cases load."""
    if engine not in ENGINES:
        raise BatchError(f"Unknown batch engine {engine!r}; use one of: {', '.join(ENGINES)}.")
    if engine == "local":
        if address is not None or ship_inputs:
            what = "A Ray address" if address is not None else "Shipping the inputs to the actors"
            raise BatchError(f"{what} needs the Ray engine: add --engine ray (engine='ray').")
        return
    if any(d.strip() for d in devices or ()) or network is not None:
        raise BatchError("The Ray engine places one actor per GPU or CPU slot of the cluster; leave out --devices "
                         "and the loaded network (use --device cpu|cuda|auto).")
    from .ray_engine import check_address

    check_address(address)


def _run_on_ray(runner: _Runner, todo: Sequence[Case], address: str | None, cancel: CancelCallback | None,
                ship_inputs: bool = False) -> None:
    """The Ray engine, handed this module's case steps so that both engines segment and write alike."""
    from .ray_engine import CaseSteps, run_on_ray

    def failed(case_id: str, error: str) -> CaseResult:
        return CaseResult(case_id, FAILED, error=error)

    steps = CaseSteps(run_case, prepare_case, write_case, case_failed, failed)
    run_on_ray(runner, todo, address, cancel, steps, ship_inputs)


def _check_devices(devices: Sequence[str] | None, network: nn.Module | None) -> list[str]:
    """Validate the device list up front, so a typo fails before the first case rather than in a worker."""
    from ..engine.devices import resolve_device

    names = [d.strip() for d in devices or () if d.strip()]
    for name in names:
        resolve_device(name)
    if len(names) > 1 and network is not None:
        raise BatchError("A loaded network can only be used on one device; pass one device or no network.")
    return names


class _Runner:
    """Collects results, keeps the summary current and turns per-case progress into batch progress."""

    def __init__(self, cases: Sequence[Case], job: _Job, summary: Path, progress: ProgressCallback | None,
                 on_case: CaseCallback | None) -> None:
        self.order = {c.case_id: i for i, c in enumerate(cases)}
        self.job, self.summary, self.progress, self.on_case = job, summary, progress, on_case
        self.results: dict[str, CaseResult] = {}
        self.running: dict[str, float] = {}

    def finish(self, result: CaseResult, write: bool = True) -> None:
        """Record a finished case: summary rewritten (``write``), failure logged, callback told, progress advanced."""
        self.results[result.case_id] = result
        self.running.pop(result.case_id, None)
        if write:
            self.write()
        if result.status == FAILED:
            log.warning("%s failed: %s", result.case_id, result.error)
        if self.on_case is not None:
            self.on_case(result)
        self.report(result.case_id, result.status + (f" in {result.seconds:.1f} s" if result.status != SKIPPED else ""))

    def case_progress(self, case_id: str) -> ProgressCallback:
        def report(fraction: float, message: str) -> None:
            self.running[case_id] = fraction
            self.report(case_id, message)

        return report

    def report(self, case_id: str, message: str) -> None:
        if self.progress is None:
            return
        total = len(self.order)
        fraction = (len(self.results) + sum(self.running.values())) / total
        self.progress(min(fraction, 1.0), f"{len(self.results)}/{total} cases, {case_id}: {message}")

    def ordered(self) -> list[CaseResult]:
        return sorted(self.results.values(), key=lambda r: self.order[r.case_id])

    def write(self) -> None:
        write_summary(self.ordered(), self.job.card, self.summary)


def _run_here(runner: _Runner, todo: Sequence[Case], network: nn.Module | None, cancel: CancelCallback | None) -> None:
    """Segment the cases one after another in this process, loading the network once, when first needed.

    Freed CPU memory stays in the process for the whole cohort, not only for one case's windows: giving
    it back after every case makes each next case fault the same gigabytes in again (measured in
    docs/benchmarks.md, "Speed-ups, before and after"). It is released when the loop ends.
    """
    from ..engine.devices import resolve_device
    from ..engine.inference import kept_cpu_memory
    from ..engine.pipeline import load_network

    with kept_cpu_memory(runner.job.options.low_memory):
        for case in todo:
            if cancel is not None and cancel():
                raise CancelledError("Batch cancelled.")
            if network is None and not case.problem:
                job = runner.job
                network = load_network(job.card, job.options.weights, resolve_device(job.options.device),
                                       job.options.folds)
            runner.finish(run_case(runner.job, case, network, runner.case_progress(case.case_id), cancel))


# ---------------------------------------------------------------- worker processes


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _worker_main(index: int, device: str, threads: int, job: _Job, tasks: MPQueue, results: MPQueue) -> None:
    """A worker process: load the network on ``device`` once, then segment cases from ``tasks`` until None.

    Messages to the parent: ("start", index, case_id), ("progress", index, case_id, fraction, message),
    ("done", index, CaseResult), ("fatal", index, message). The parent handles Ctrl-C; a worker whose
    parent died stops at the next window instead of segmenting the rest of the cohort unattended.
    """
    import torch

    from ..engine.devices import resolve_device
    from ..engine.inference import kept_cpu_memory
    from ..engine.pipeline import load_network

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # the parent's terminate(): unwind, removing temporaries
    torch.set_num_threads(threads)
    parent = multiprocessing.parent_process()

    def orphaned() -> bool:
        return parent is not None and not parent.is_alive()

    options = dataclasses.replace(job.options, device=device)
    job = dataclasses.replace(job, options=options)
    try:
        network = load_network(job.card, options.weights, resolve_device(device), options.folds)
    except SegMambaError as exc:
        results.put(("fatal", index, f"{device}: {exc}"))
        return
    with kept_cpu_memory(options.low_memory):  # for the whole cohort, as in _run_here
        for case in iter(tasks.get, None):
            if orphaned():
                return
            results.put(("start", index, case.case_id))

            def report(fraction: float, message: str, case_id: str = case.case_id) -> None:
                results.put(("progress", index, case_id, fraction, message))

            try:
                result = run_case(job, case, network, report, orphaned)
            except CancelledError:
                return
            except OutputError as exc:  # the disk is full or the folder went away: no case can be written
                results.put(("output", index, str(exc)))
                return
            results.put(("done", index, dataclasses.replace(result, device=result.device or device)))


def _run_workers(runner: _Runner, todo: Sequence[Case], devices: Sequence[str], cancel: CancelCallback | None) -> None:
    """One spawned worker per device pulling cases from a shared queue (faster GPUs take more cases)."""
    context = multiprocessing.get_context("spawn")  # fork is unsafe with CUDA and with OpenMP thread pools
    tasks, results = context.Queue(), context.Queue()
    for case in todo:
        tasks.put(case)
    for _ in devices:
        tasks.put(None)
    cpu_workers = sum(d.lower() == "cpu" for d in devices) or 1
    from .worker import usable_cpu_count  # the CPUs this process may use (affinity), not all the machine's

    threads = max(1, (usable_cpu_count() or 1) // cpu_workers)
    workers = [
        context.Process(target=_worker_main, args=(i, d, threads, runner.job, tasks, results), daemon=True,
                        name=f"segmamba-batch-{d}")
        for i, d in enumerate(devices)
    ]
    for worker in workers:
        worker.start()
    try:
        _collect(runner, todo, devices, workers, results, cancel)
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
            worker.join()


def _collect(runner: _Runner, todo: Sequence[Case], devices: Sequence[str], workers: Sequence[BaseProcess], results: MPQueue,
             cancel: CancelCallback | None) -> None:
    """Handle worker messages until every case has a result; cases of workers that died are failed."""
    waiting = {c.case_id for c in todo}
    current: dict[int, str] = {}
    fatal: dict[int, str] = {}
    while waiting:
        if cancel is not None and cancel():
            raise CancelledError("Batch cancelled.")
        try:
            message = results.get(timeout=_POLL_SECONDS)
        except queue.Empty:
            if _reap(runner, workers, devices, current, fatal, waiting, results):
                continue
            if all(not w.is_alive() for w in workers):
                reason = "; ".join(fatal.values()) or "every worker process stopped"
                for case_id in sorted(waiting, key=runner.order.get):
                    runner.finish(CaseResult(case_id, FAILED, error=f"not segmented: {reason}"))
                if len(fatal) == len(workers):
                    raise BatchError(f"No worker could load the model: {reason}") from None
                return
            continue
        _handle(message, runner, current, fatal, waiting)


def _handle(message: tuple, runner: _Runner, current: dict[int, str], fatal: dict[int, str],
            waiting: set[str]) -> None:
    kind, index = message[0], message[1]
    if kind == "start":
        current[index] = message[2]
    elif kind == "progress":
        runner.case_progress(message[2])(message[3], message[4])
    elif kind == "done":
        current.pop(index, None)
        waiting.discard(message[2].case_id)
        runner.finish(message[2])
    elif kind == "fatal":
        fatal[index] = message[2]
        log.error("Worker %s", message[2])
    elif kind == "output":
        raise OutputError(message[2])


def _reap(runner: _Runner, workers: Sequence[BaseProcess], devices: Sequence[str], current: dict[int, str],
          fatal: dict[int, str], waiting: set[str], results: MPQueue) -> bool:
    """Fail the case a dead worker was segmenting (after reading its last messages). True if any was failed."""
    failed_any = False
    for index, worker in enumerate(workers):
        if worker.is_alive() or index not in current:
            continue
        while True:  # the worker's final messages may still be in the pipe
            try:
                _handle(results.get_nowait(), runner, current, fatal, waiting)
            except queue.Empty:
                break
        case_id = current.pop(index, None)
        if case_id is None or case_id not in waiting:
            continue
        waiting.discard(case_id)
        runner.finish(CaseResult(case_id, FAILED, device=devices[index], error=(
            f"the worker on {devices[index]} stopped (exit code {worker.exitcode}) while segmenting this case; "
            "it may have run out of memory")))
        failed_any = True
    return failed_any

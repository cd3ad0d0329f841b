"""``segmamba-slicer predict``: segment one case into a label map; on request a .seg.nrrd, DICOM SEG, report.

The outputs are checked before PyTorch is imported, so a wrong path is refused within a second rather
than after the model has loaded; keep the slow imports below :func:`check_outputs` in :func:`run`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from .common import add_run_options, progress_bar, segment_options

if TYPE_CHECKING:
    import SimpleITK as sitk
    import torch
    from torch import nn

    from ..engine.estimate import CaseGrid, Estimate
    from ..engine.pipeline import SegmentationResult, SegmentOptions
    from ..engine.rates import MeasuredNetwork
    from ..models.cards import ModelCard

#: What the estimate's advice calls the settings of the command line.
LOW_MEMORY_HINT, CPU_HINT, FORCE_HINT = "--low-memory", "--device cpu", "--force"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``predict --model ... -i ... -o ...`` to a ``segmamba-slicer`` sub-command parser."""
    p = subparsers.add_parser("predict", help="segment one case")
    p.add_argument("--model", "-m", required=True, help="model card id, card .json, or checkpoint .pt")
    p.add_argument("-i", "--input", nargs="+", required=True,
                   help="one image per model input in the card's order (e.g. T2W T2F T1N T1C), "
                   "or one case folder")
    p.add_argument("-o", "--output", required=True, type=Path, help="label map to write (.nii.gz, .nrrd)")
    p.add_argument("--seg-nrrd", nargs="?", const="auto",
                   help="also write a Slicer .seg.nrrd (path optional)")
    p.add_argument("--confidence", type=Path, metavar="PATH",
                   help="also write the per-voxel confidence in [0, 1] (1 - normalised entropy of the "
                   "prediction) as a float image on the input grid (.nii.gz, .nrrd)")
    p.add_argument("--dicom-seg", type=Path, metavar="PATH",
                   help="also write a DICOM Segmentation (.dcm) that references the first input, which must be "
                   "a DICOM series folder (needs highdicom: pip install 'segmamba-slicer[dicom]')")
    p.add_argument("--report", type=Path, metavar="PATH",
                   help="also write a one-page PDF report: model, settings, views through the largest "
                   "lesion, region and lesion measurements, confidence per region (computes the confidence)")
    add_run_options(p)
    add_force_option(p)
    p.set_defaults(func=run)
    return p


def add_force_option(parser: argparse.ArgumentParser) -> None:
    """``--force``: run even when the estimate says the free memory is clearly too little."""
    parser.add_argument(FORCE_HINT, action="store_true",
                        help="run even when the estimate printed before the run says the free memory is too "
                        "little (the run may then be stopped by the system)")


def run(args: argparse.Namespace) -> int:
    """Segment the case, write the outputs, print where they went and the volumes."""
    seg_path = None
    if args.seg_nrrd:
        seg_path = Path(args.seg_nrrd) if args.seg_nrrd != "auto" else seg_nrrd_beside(args.output)
    check_outputs(args.input, label_map=args.output, segmentation=seg_path, dicom_seg=args.dicom_seg,
                  confidence=args.confidence, report=args.report)
    source = None
    if args.dicom_seg is not None:  # headers only, fast: a series the SEG cannot reference stops us here
        from ..io.dicom_seg import read_source_series

        source = read_source_series(Path(args.input[0]))

    from ..engine.pipeline import segment
    from ..io.images import read_image, resolve_inputs, write_image_atomic
    from ..models.registry import resolve_model

    card = resolve_model(args.model)
    if source is not None:
        from ..io.dicom_seg import check_labels

        check_labels(card.labels)
    inputs = resolve_inputs(args.input, card)
    wants_confidence = args.confidence is not None or args.report is not None  # the report summarises it
    options = dataclasses.replace(segment_options(args), confidence=wants_confidence)
    images = [read_image(s, name=c.display_name) for s, c in zip(inputs, card.channels)]
    plan = preflight(images, card, options, force=args.force)
    result = segment(images, card, options, progress=progress_bar(args), network=plan.network)
    plan.record(result)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    out = write_image_atomic(result.labelmap, args.output)
    print(f"label map: {out}")
    if args.confidence is not None:
        print(f"confidence: {write_image_atomic(result.confidence, args.confidence, what='confidence map')}")
    if seg_path is not None:
        from ..io.seg_nrrd import write_seg_nrrd

        written = write_seg_nrrd(result.labelmap, card.labels, seg_path, extra_segments=card.regions)
        print(f"segmentation: {written}")
    if source is not None:
        from ..io.dicom_seg import write_dicom_seg

        written = write_dicom_seg(result.labelmap, card.labels, source, args.dicom_seg,
                                  algorithm_name=card.display_name, algorithm_version=card.id)
        print(f"DICOM segmentation: {written}")
    if args.report is not None:
        from ..evaluation.case_report import write_case_report

        print(f"report: {write_case_report(args.report, result, images[0], options, inputs)}")
    print(f"device {result.device}, {result.windows} windows, {result.seconds:.1f} s")
    for name, ml in result.volumes.items():
        print(f"  {name}: {ml:.2f} mL")
    return 0


def check_outputs(
    inputs: Sequence[str | Path],
    label_map: Path,
    segmentation: Path | None = None,
    dicom_seg: Path | None = None,
    confidence: Path | None = None,
    report: Path | None = None,
) -> None:
    """Before any work: every output can be written, replaces no input and no other output.

    ``inputs`` are the paths as given: image files, DICOM series folders, or one case folder, whose
    image files are the inputs (the folder itself may receive outputs). This needs no model, so it
    runs before PyTorch is imported, within a second of the start. Stale temporary files that killed
    runs left beside the outputs are removed here, as a batch does. A DICOM SEG also needs highdicom
    and a first input that is a DICOM series folder, the series it will reference.
    """
    from ..io.atomic import OutputError, check_writable, refuse_overwriting_inputs, remove_stale_temporaries
    from ..io.dicom_seg import DICOM_SEG_SUFFIXES, check_dicom_source, check_highdicom
    from ..io.images import LABELMAP_SUFFIXES, is_image_file

    if dicom_seg is not None:  # first: a run that cannot make its SEG creates no output folder either
        check_highdicom()
        check_dicom_source(Path(inputs[0]))
    named = [("label map", check_writable(label_map, suffixes=LABELMAP_SUFFIXES, what="label map"))]
    if segmentation is not None:
        named.append(("segmentation", check_writable(segmentation, suffixes=(".seg.nrrd",), what="segmentation")))
    if confidence is not None:
        named.append(("confidence map", check_writable(confidence, suffixes=LABELMAP_SUFFIXES, what="confidence map")))
    if report is not None:
        named.append(("report", check_writable(report, suffixes=(".pdf",), what="report")))
    if dicom_seg is not None:
        named.append(("DICOM segmentation",
                      check_writable(dicom_seg, suffixes=DICOM_SEG_SUFFIXES, what="DICOM segmentation")))
    for i, (what, path) in enumerate(named):
        for other, other_path in named[:i]:
            if path.resolve() == other_path.resolve():
                raise OutputError(f"The {other} and the {what} would both be written to {other_path}.")
    outputs = [path for _, path in named]
    sources: list[Path] = []
    for given in map(Path, inputs):
        images = [p for p in given.iterdir() if is_image_file(p)] if given.is_dir() else []
        sources.extend(images or [given])
    refuse_overwriting_inputs(outputs, sources)
    for output in outputs:
        remove_stale_temporaries(output)


def seg_nrrd_beside(path: Path) -> Path:
    """``<name>.seg.nrrd`` beside a label map ``<name>.nii.gz`` (or another image suffix)."""
    from ..io.images import IMAGE_SUFFIXES

    path = Path(path)
    name = path.name
    suffix = next((s for s in IMAGE_SUFFIXES if name.lower().endswith(s)), "")
    return path.with_name(name[: len(name) - len(suffix)] + ".seg.nrrd")


@dataclass
class Preflight:
    """What :func:`preflight` prepared for a run: the loaded network, measured while it runs, and what
    :meth:`record` needs to fold the run's measurements into this computer's rate."""

    key: str
    network: MeasuredNetwork
    case: CaseGrid
    weights_bytes: int
    runtime_bytes: int | None
    estimate: Estimate
    #: Whether this computer's rate was measured just now (no rate was cached for this model and device).
    calibrated: bool

    def record(self, result: SegmentationResult) -> None:
        """Keep the run's time per window and memory for the next estimate (docs/user-guide.md)."""
        from ..engine.rates import record_run

        record_run(self.key, self.network, result.seconds, self.case.voxels * self.case.channels,
                   self.weights_bytes, self.runtime_bytes, cold=not self.calibrated)


def preflight(images: Sequence[sitk.Image], card: ModelCard, options: SegmentOptions, force: bool = False,
              out: TextIO | None = None) -> Preflight:
    """Print the estimate of the run (measuring this computer once when no rate is cached), refuse a run that
    clearly does not fit in the free memory unless ``force``, and load the network for the run.

    Without a cached rate the network is loaded first and two windows are timed (printed as such); with
    one, the verdict comes before the model loads. Raises :class:`..engine.estimate.NotEnoughMemoryError`.
    """
    from ..engine import estimate as est
    from ..engine import rates
    from ..engine.devices import resolve_device
    from ..engine.memory import current_rss

    out = out or sys.stdout
    device = resolve_device(options.device)
    case = est.case_grid(images)
    network = runtime = None
    key = rates.run_key(card, options, device)
    calibrated = rates.cached_rate(key) is None
    if calibrated:
        network, runtime = _load_network(card, options, device, case)
        print("measuring how fast this computer runs this model (once per model and device: 2 windows) ...",
              file=out, flush=True)
        rates.remember_rate(key, rates.calibrate_run(network, card, options, device, runtime))
    estimate, _, _ = est.estimate_run(case, card, options, device, resident_bytes=current_rss() or 0,
                                      warm=calibrated)  # the calibration's first window was the warm-up
    print(f"estimate: {est.summary(estimate)}", file=out, flush=True)
    short = est.memory_shortfall(estimate)
    if short is not None:
        message = est.shortfall_message(short, LOW_MEMORY_HINT, CPU_HINT)
        if not force:
            raise est.NotEnoughMemoryError(f"{message} To run anyway, add {FORCE_HINT}.")
        print(f"warning: {message} Running anyway ({FORCE_HINT}).", file=sys.stderr, flush=True)
    if network is None:
        network, runtime = _load_network(card, options, device, case)
    return Preflight(key, rates.MeasuredNetwork(network), case, rates.weights_bytes(network), runtime, estimate,
                     calibrated)


def _load_network(card: ModelCard, options: SegmentOptions, device: torch.device,
                  case: CaseGrid) -> tuple[nn.Module, int | None]:
    """The run's network, and the runtime part of this process's resident size once it is loaded."""
    from ..engine import rates
    from ..engine.memory import current_rss
    from ..engine.pipeline import load_network

    network = load_network(card, options.weights, device, options.folds)
    on_cpu = device.type != "cuda"
    return network, rates.runtime_bytes(current_rss(), rates.weights_bytes(network) if on_cpu else 0,
                                        case.stored_bytes)  # the images read, resident now

"""``segmamba-slicer predict``: segment one case into a label map; on request a .seg.nrrd, DICOM SEG, report.

The outputs are checked before PyTorch is imported, so a wrong path is refused within a second rather
than after the model has loaded; keep the slow imports below :func:`check_outputs` in :func:`run`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

from .common import add_run_options, progress_bar, segment_options


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
    p.set_defaults(func=run)
    return p


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
    result = segment(inputs, card, options, progress=progress_bar(args))
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

        first = read_image(inputs[0], name=card.channels[0].display_name)
        print(f"report: {write_case_report(args.report, result, first, options, inputs)}")
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

"""``segmamba-slicer batch INPUT_DIR OUTPUT_DIR --model ...``: the command line of :mod:`..run.batch`."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..run.batch import (
    DONE,
    ENGINES,
    FAILED,
    SKIPPED,
    CaseResult,
    check_batch_outputs,
    output_path,
    segment_folder,
)
from .common import add_run_options, progress_bar, segment_options
from .predict import add_force_option, preflight

if TYPE_CHECKING:
    from torch import nn

    from ..engine.pipeline import SegmentOptions
    from ..models.cards import ModelCard

#: Cases tried, in order, for the estimate before a batch (a cohort may begin with unreadable ones).
ESTIMATE_TRIES = 3


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``batch INPUT_DIR OUTPUT_DIR --model ...`` to a ``segmamba-slicer`` sub-command parser."""
    p = subparsers.add_parser(
        "batch", help="segment every case in a folder (resumable, one worker per device)",
        description="Segment every case of INPUT_DIR into OUTPUT_DIR/<case>.nii.gz and write "
        "OUTPUT_DIR/summary.csv. Finished cases are skipped unless --overwrite; a failing case is recorded "
        "and the batch goes on (exit code 1 if any failed).",
    )
    p.add_argument("input_dir", type=Path, help="folder of cases (BraTS 2023: <case>/<case>-t2w.nii.gz ...)")
    p.add_argument("output_dir", type=Path, help="folder for <case>.nii.gz, previews and summary.csv")
    p.add_argument("--model", "-m", required=True, help="model card id, card .json, or checkpoint .pt")
    p.add_argument("--pattern", help="file layout, e.g. 'imagesTs/{case}_{index}.nii.gz' or "
                   "'{case}/{case}_{channel}.nii.gz' (default: BraTS 2023 case folders)")
    p.add_argument("--overwrite", action="store_true", help="segment cases whose output already exists")
    p.add_argument("--preview", action="store_true", help="also write <case>.png (three slices with labels)")
    p.add_argument("--confidence", action="store_true",
                   help="also write <case>_confidence.nii.gz (1 - normalised entropy of the prediction)")
    p.add_argument("--dicom-seg", action="store_true",
                   help="also write <case>.dcm, a DICOM segmentation referencing the case's first input, which "
                   "must be a DICOM series folder (e.g. --pattern '{case}/{channel}'; needs highdicom)")
    p.add_argument("--devices", help="comma-separated devices, one worker process each, e.g. cuda:0,cuda:1")
    p.add_argument("--summary", type=Path, help="summary CSV (default OUTPUT_DIR/summary.csv)")
    p.add_argument("--engine", choices=ENGINES, default="local",
                   help="local: this machine (default); ray: actors on a Ray cluster, one per GPU or CPU slot "
                   "(needs segmamba-slicer[cluster]; docs/scale.md)")
    p.add_argument("--address", help="with --engine ray: the cluster to join (auto, ray://HEAD:10001); "
                   "default: a Ray instance on this machine for this batch")
    p.add_argument("--ship-inputs", action="store_true",
                   help="with --engine ray, for a cluster that does not share the storage with this computer: "
                   "this computer reads every case, sends its images to the actors and writes the outputs "
                   "they send back (the model must still load on every node; docs/scale.md)")
    add_run_options(p)
    add_force_option(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``batch``: one line per case, failures listed at the end; exit 1 if any case failed."""
    check_batch_outputs(args.output_dir, args.summary)  # within a second, before PyTorch is imported
    from ..models.registry import resolve_model

    card = resolve_model(args.model)
    options = segment_options(args)
    devices = [d.strip() for d in args.devices.split(",") if d.strip()] if args.devices else None
    network = None
    if args.engine == "local" and len(devices or ()) <= 1:  # this process runs the cases: estimate them here
        if devices:
            options = dataclasses.replace(options, device=devices[0])
        network = estimate_first_case(args, card, options)
    progress = progress_bar(args)

    def print_case(result: CaseResult) -> None:
        if result.status == FAILED:  # already logged with its error, and listed again at the end
            return
        where = f" on {result.device}" if result.device else ""
        took = f" in {result.seconds:.1f} s{where}" if result.seconds else ""
        line = f"{result.case_id}: {result.status}{took}"
        stream = sys.stderr if progress else sys.stdout
        print(line + (f" - {result.error}" if result.error else ""), file=stream)
        for warning in result.warnings:
            print(f"  warning: {warning}", file=stream)

    result = segment_folder(
        args.input_dir, args.output_dir, card, options, pattern=args.pattern, overwrite=args.overwrite,
        preview=args.preview, devices=devices, network=network,
        summary_csv=args.summary, progress=progress, on_case=print_case, engine=args.engine,
        address=args.address, confidence=args.confidence, dicom_seg=args.dicom_seg, ship_inputs=args.ship_inputs,
    )
    counts = {s: sum(c.status == s for c in result.cases) for s in (DONE, SKIPPED, FAILED)}
    print(f"{len(result.cases)} cases: {counts[DONE]} segmented, {counts[SKIPPED]} skipped (already done), "
          f"{counts[FAILED]} failed\nsummary: {result.summary_csv}")
    for case in result.failed:
        print(f"FAILED {case.case_id}: {case.error}")
    return 0 if result.ok else 1


def estimate_first_case(args: argparse.Namespace, card: ModelCard, options: SegmentOptions) -> nn.Module | None:
    """Print the estimate of the first case still to segment and load the network for the batch.

    What ``predict`` does before its case (:func:`.predict.preflight`: measuring this computer once per model
    and device, refusing a run that clearly does not fit in the free memory unless ``--force``), on the
    first case the batch will segment, with the cohort's time if the other cases are like it. Returns the
    loaded network, which the batch then uses; None when no case is left to segment or none of the first
    :data:`ESTIMATE_TRIES` can be read (the batch then reports them as it would).
    """
    from ..engine.estimate import format_duration
    from ..errors import SegMambaError
    from ..io.images import read_image
    from ..run.cases import discover_cases

    out = Path(args.output_dir).expanduser()
    cases = [c for c in discover_cases(args.input_dir, card, args.pattern, skip=out) if not c.problem]
    todo = cases if args.overwrite else [c for c in cases if not output_path(out, c.case_id).exists()]
    for case in todo[:ESTIMATE_TRIES]:
        try:
            images = [read_image(path, name=channel.display_name) for path, channel in zip(case.inputs, card.channels)]
        except SegMambaError:
            continue
        print(f"{len(todo)} case{'s' if len(todo) != 1 else ''} to segment; the estimate is for {case.case_id}")
        plan = preflight(images, card, options, force=args.force)
        if plan.estimate.seconds is not None and len(todo) > 1:
            total = format_duration(plan.estimate.seconds * len(todo))
            print(f"all {len(todo)} cases: ~{total} if they are like {case.case_id}", flush=True)
        return plan.network
    return None

"""``segmamba-slicer evaluate PRED_DIR REF_DIR``: the command line of :mod:`..evaluation.metrics`."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..evaluation.metrics import (
    BRATS_GROUPS,
    CASE_COLUMNS,
    OK,
    SUMMARY_COLUMNS,
    case_rows,
    evaluate_folders,
    format_summary,
    groups_for_card,
    summary_rows,
)
from ..io.atomic import write_csv_atomic


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``evaluate PRED_DIR REF_DIR`` to a ``segmamba-slicer`` sub-command parser."""
    p = subparsers.add_parser(
        "evaluate", help="Dice and HD95 of predicted label maps against references",
        description="Score <PRED_DIR>/<case>.nii.gz against <REF_DIR>/<case>/<case>-seg.nii.gz (BraTS) or "
        "<REF_DIR>/<case>.nii.gz per label and region. Both empty: Dice 1, HD95 0; one empty: Dice 0, "
        "HD95 as --one-empty-hd95.",
    )
    p.add_argument("pred_dir", type=Path, help="folder of predicted label maps")
    p.add_argument("ref_dir", type=Path, help="folder of reference label maps (BraTS case folders or flat)")
    p.add_argument("--model", "-m",
                   help="model id or card .json whose labels and regions to score (default BraTS)")
    p.add_argument("--csv", type=Path, help="per-case CSV (default PRED_DIR/metrics.csv; summary beside it)")
    p.add_argument("--one-empty-hd95", type=_one_empty_value, default=None, metavar="diagonal|nan|MM",
                   help="HD95 when only one of prediction and reference is empty (default: image diagonal)")
    p.set_defaults(func=run)
    return p


def _one_empty_value(text: str) -> float | None:
    """``diagonal`` (default), ``nan`` or a number of mm."""
    if text.lower() == "diagonal":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected 'diagonal', 'nan' or a distance in mm, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    """Score the folders, write the CSVs, print the summary; exit 1 when any reference case was not scored."""
    groups = BRATS_GROUPS
    if args.model:
        from ..models.registry import resolve_model

        groups = groups_for_card(resolve_model(args.model))
    evaluation = evaluate_folders(args.pred_dir, args.ref_dir, groups, args.one_empty_hd95)
    csv_path = Path(args.csv or Path(args.pred_dir) / "metrics.csv").expanduser()
    write_csv_atomic(csv_path, CASE_COLUMNS, case_rows(evaluation))
    summary_path = write_csv_atomic(csv_path.with_name(csv_path.name.removesuffix(".csv") + "_summary.csv"),
                                    SUMMARY_COLUMNS, summary_rows(evaluation))
    print(format_summary(evaluation))
    print(f"per-case scores: {csv_path}\nsummary: {summary_path}")
    for name in evaluation.unmatched_predictions:
        print(f"note: prediction {name} has no reference and was not scored")
    unscored = [c for c in evaluation.cases if c.status != OK]
    for case in unscored:
        print(f"not scored: {case.case}: {case.error}")
    return 0 if not unscored else 1

"""``segmamba-slicer measure LABELMAP --json OUT``: the command line of :mod:`..evaluation.lesions`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the command line should start fast: the library is imported when the command runs
    from ..evaluation.lesions import Change, Measurement

DEFAULT_MODEL = "segmamba-brats2023"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``measure LABELMAP --json OUT`` to a ``segmamba-slicer`` sub-command parser."""
    p = subparsers.add_parser(
        "measure", help="lesions of a label map: volumes, centroids, axial diameters, change from a prior",
        description="Measure each lesion (26-connected component) of the model's regions (BraTS: TC, WT, "
        "ET): volume, RAS centroid, the longest axial diameter and the longest perpendicular to it on the "
        "image's own axial slices, their product, and whether both are at least 10 mm. With --prior, "
        "compare region volumes and the enhancing tumour's sum of products. The prior is resampled onto "
        "the label map's grid by nearest neighbour and is NOT registered: it must already be in the same "
        "patient space.",
    )
    p.add_argument("labelmap", type=Path, help="label map to measure, with the model's label values")
    p.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help="model id or card .json whose labels and regions the label map uses "
                   f"(default {DEFAULT_MODEL})")
    p.add_argument("--prior", type=Path, help="label map of an earlier scan of the same patient, same space")
    p.add_argument("--json", type=Path, required=True, metavar="OUT.json",
                   help="where to write the measurements")
    p.add_argument("--min-volume-ml", type=_non_negative, default=0.0, metavar="ML",
                   help="components smaller than this are not lesions (mL; default 0: every one counts)")
    p.set_defaults(func=run)
    return p


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0.0:
        raise argparse.ArgumentTypeError(f"expected a volume in mL of 0 or more, got {text!r}")
    return value


def run(args: argparse.Namespace) -> int:
    """Measure the label map (and the prior), write the JSON, print the tables."""
    import json

    from ..evaluation.lesions import checked_labels, compare, measure, measurement_json, prior_on_grid
    from ..io.atomic import check_writable, refuse_overwriting_inputs, write_text_atomic
    from ..io.images import read_image
    from ..models.registry import resolve_model

    output = check_writable(args.json, suffixes=(".json",), what="measurements file")
    refuse_overwriting_inputs([output], [args.labelmap, *([args.prior] if args.prior else [])])
    card = resolve_model(args.model)
    labelmap = read_image(args.labelmap, "label map")
    current = measure(labelmap, card, args.min_volume_ml, f"The label map {args.labelmap}")
    change = None
    if args.prior:
        name = f"The prior label map {args.prior}"
        prior = read_image(args.prior, "prior label map")
        checked_labels(prior, card, name)  # on its own grid: values outside the overlap must not go unseen
        prior_measurement = measure(prior_on_grid(prior, labelmap, name), card, args.min_volume_ml, name)
        change = compare(current, prior_measurement)
    write_text_atomic(output, json.dumps(measurement_json(current, change), indent=2) + "\n",
                      what="measurements file")
    print(format_tables(current, change))
    print(f"measurements: {output}")
    return 0


def _number(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _percent(value: float | None) -> str:
    return "n/a (no measurable prior)" if value is None else f"{value:+.1f} %"


def _region_table(measurement: Measurement) -> list[str]:
    lines = [f"{'region':<8}{'volume_ml':>11}{'lesions':>9}{'measurable':>12}{'sum_products_mm2':>18}"]
    for r in measurement.regions:
        measurable = sum(lesion.measurable for lesion in r.lesions)
        lines.append(f"{r.name:<8}{r.volume_ml:>11.3f}{len(r.lesions):>9}{measurable:>12}"
                     f"{r.sum_of_products_mm2:>18.1f}")
    return lines


def _lesion_table(measurement: Measurement) -> list[str]:
    lines = [f"{'region':<8}{'volume_ml':>11}  {'centroid RAS (mm)':<24}{'diameters_mm':>14}"
             f"{'product_mm2':>13}  measurable"]
    for lesion in measurement.lesions:
        centroid = " ".join(f"{v:.1f}" for v in lesion.centroid_ras)
        diameters = " x ".join(f"{v:.1f}" for v in lesion.axial_diameters_mm)
        lines.append(f"{lesion.region:<8}{lesion.volume_ml:>11.3f}  {centroid:<24}{diameters:>14}"
                     f"{lesion.product_mm2:>13.1f}  {'yes' if lesion.measurable else 'no'}")
    return lines


def _change_table(change: Change, enhancing: str | None) -> list[str]:
    lines = [f"{'region':<8}{'volume_ml':>11}{'prior_ml':>11}{'change_%':>10}"]
    lines += [f"{r.name:<8}{r.volume_ml:>11.3f}{r.prior_volume_ml:>11.3f}{_number(r.volume_change_pct):>10}"
              for r in change.regions]
    lines.append(f"sum of products ({enhancing or 'no enhancing region'}): "
                 f"{_number(change.sum_of_products_mm2)} mm² "
                 f"(prior {_number(change.prior_sum_of_products_mm2)} mm², "
                 f"change {_percent(change.product_change_pct)})")
    return lines


def format_tables(measurement: Measurement, change: Change | None) -> str:
    """Regions, lesions (if any) and, with a prior, the change, as short aligned text tables."""
    tables = [_region_table(measurement)]
    if measurement.lesions:
        tables.append(_lesion_table(measurement))
    if change is not None:
        tables.append(_change_table(change, measurement.enhancing_region))
    return "\n\n".join("\n".join(table) for table in tables)

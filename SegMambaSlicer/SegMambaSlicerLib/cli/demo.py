"""``segmamba-slicer demo``: the README's main command, a synthetic case segmented end to end, offline.

The phantom comes with its own labels, so the demo ends with their Dice as a check that the install works.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from ..evaluation.metrics import dice
from ..evaluation.phantom import BRATS_SHAPE
from ..models.cards import DEMO_MODEL_ID
from .common import DEVICE_HELP, ProgressBar
from .predict import add_force_option, preflight

if TYPE_CHECKING:
    import SimpleITK as sitk

    from ..models.cards import ModelCard

#: The model the README's main command runs: a small SegMamba trained on phantoms, not for clinical use.


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``demo`` to a ``segmamba-slicer`` sub-command parser."""
    p = subparsers.add_parser("demo",
                              help="segment a synthetic case with the demo model (offline, no patient data)")
    p.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder (default out/demo)")
    p.add_argument("--shape", type=int, nargs=3, default=list(BRATS_SHAPE), metavar=("X", "Y", "Z"),
                   help="grid of the synthetic case (default: BraTS 240 240 155)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--model", "-m", default=DEMO_MODEL_ID,
                   help=f"model id or card .json (default {DEMO_MODEL_ID})")
    p.add_argument("--low-memory", action="store_true",
                   help="lower peak memory at some speed cost (what the estimate suggests when memory is short)")
    add_force_option(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Generate the phantom, segment it, write every output kind and print the Dice per label and region."""
    from ..engine.pipeline import SegmentOptions, segment
    from ..evaluation.phantom import make_phantom, write_brats_case
    from ..io.images import read_image, resolve_inputs, write_image_atomic
    from ..io.report import write_preview_png, write_volumes_csv
    from ..io.seg_nrrd import write_seg_nrrd

    card = _demo_card(args.model)
    print(f"model: {card.display_name}" + (f" - {card.intended_use}" if card.intended_use else ""))
    shape, case_id = tuple(args.shape), f"Phantom-{args.seed:05d}"
    print(f"generating a synthetic BraTS-like case {'x'.join(map(str, shape))} (seed {args.seed}) ...")
    case = make_phantom(shape=shape, seed=args.seed)
    case_dir = write_brats_case(case, args.out / "case", case_id)["seg"].parent
    inputs = resolve_inputs([case_dir], card)
    images = [read_image(s, name=c.display_name) for s, c in zip(inputs, card.channels)]
    options = SegmentOptions(device=args.device, low_memory=args.low_memory)
    plan = preflight(images, card, options, force=args.force)
    result = segment(images, card, options, progress=ProgressBar(), network=plan.network)
    plan.record(result)
    out = args.out / "segmentation"
    written = {
        "label map": write_image_atomic(result.labelmap, out / "seg.nii.gz"),
        "segmentation": write_seg_nrrd(result.labelmap, card.labels, out / "seg.seg.nrrd",
                                       extra_segments=card.regions),
        "preview": write_preview_png(images[0], result.labelmap, card, out / "preview.png"),
        "volumes": write_volumes_csv(result.volumes, card, out / "volumes.csv"),
    }
    print(f"case: {case_dir}")
    for what, path in written.items():
        print(f"{what}: {path}")
    print(f"device {result.device}, {result.windows} windows, {result.seconds:.1f} s")
    print("Dice against the phantom's own labels:")
    for name, score in _dice_scores(result.labelmap, case.seg, card).items():
        print(f"  {name}: {'n/a (absent in both)' if score is None else f'{score:.3f}'}")
    return 0


def _demo_card(spec: str) -> ModelCard:
    """The model the demo runs, with its weights present; the demo model ships separately, so say so."""
    from ..models.registry import READY, RegistryError, resolve_model, weights_state

    try:
        card = resolve_model(spec)
    except RegistryError:
        if spec != DEMO_MODEL_ID:
            raise
        raise RegistryError(
            f"the demo model is not installed in this checkout (no model card {DEMO_MODEL_ID!r} in "
            "SegMambaSlicer/Resources/Models); pass another model with --model."
        ) from None
    if weights_state(card) != READY:
        where = card.weights_path() or card.weights.url or "no weights named in its card"
        raise RegistryError(
            f"the weights of {card.id} are not installed ({where}); "
            + (f"run: segmamba-slicer models download {card.id}" if card.weights.kind == "url"
               else "see: segmamba-slicer models show " + card.id)
        )
    return card


def _dice_scores(predicted: sitk.Image, reference: sitk.Image, card: ModelCard) -> dict[str, float | None]:
    """Dice per label and region (:func:`..evaluation.metrics.dice`); None when both images lack it.

    None rather than the metrics' 1.0 for "both empty": a phantom without, say, necrosis is then reported
    as such instead of as a perfect segmentation.
    """
    import numpy as np
    import SimpleITK as sitk

    pred, ref = sitk.GetArrayViewFromImage(predicted), sitk.GetArrayViewFromImage(reference)
    groups = [(f"{lab.abbreviation or lab.value} {lab.name}", (lab.value,)) for lab in card.labels]
    groups += [(f"{region.name} {region.display_name}", region.labels) for region in card.regions]
    scores: dict[str, float | None] = {}
    for name, values in groups:
        p, r = np.isin(pred, values), np.isin(ref, values)
        scores[name] = dice(p, r) if p.any() or r.any() else None
    return scores

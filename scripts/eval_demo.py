"""Evaluate the DEMO model on held-out synthetic phantoms through the real segmentation pipeline.

DEMO ONLY: the model and the cases are synthetic; the figures say how well the demo learned the
phantoms, nothing about real MRI, and the model is not for clinical use.

Each case is a phantom drawn from a seed that training never uses (``>= HELD_OUT_SEED_START``, see
scripts/train_demo.py), on the BraTS grid by default. It is segmented by ``pipeline.segment`` with the
demo card, exactly as the CLI and Slicer would do it, and compared with the phantom's own label map:
Dice per label (1 NCR, 2 ED, 3 ET) and per BraTS region (TC, WT, ET). Prints a Markdown table with the
mean and minimum of each column, for docs/demo-model.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from SegMambaSlicerLib.engine.pipeline import SegmentOptions, load_network, segment
from SegMambaSlicerLib.evaluation.phantom import make_phantom
from SegMambaSlicerLib.models.cards import ModelCard, load_card
from SegMambaSlicerLib.models.resources import models_dir
from torch import nn

DEMO_CARD = models_dir() / "segmamba-demo.json"
#: First held-out seed; must match scripts/train_demo.py (training draws seeds below it).
HELD_OUT_SEED_START = 100_000
BRATS_SHAPE = (240, 240, 155)


def dice(prediction: np.ndarray, reference: np.ndarray, labels: Sequence[int]) -> float:
    """Dice of the voxel sets whose value is in ``labels``; 1.0 when both sets are empty (BraTS convention)."""
    pred = np.isin(prediction, labels)
    ref = np.isin(reference, labels)
    total = int(pred.sum()) + int(ref.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(pred, ref).sum()) / total


@dataclass(frozen=True)
class CaseScores:
    """Dice per column (``label N`` and region names) of one held-out case, and its segmentation time."""

    seed: int
    scores: dict[str, float]
    seconds: float


def score_columns(card: ModelCard) -> dict[str, tuple[int, ...]]:
    """Column name -> label values: each label alone, then the card's regions (TC, WT, ET)."""
    columns = {f"{label.abbreviation or label.name} ({label.value})": (label.value,) for label in card.labels}
    columns.update({region.name: region.labels for region in card.regions})
    return columns


def evaluate_case(card: ModelCard, seed: int, shape: Sequence[int], network: nn.Module) -> CaseScores:
    """Segment the phantom of ``seed`` with the card through the pipeline and score it against its labels."""
    case = make_phantom(shape=shape, seed=seed)
    images = [case.images[channel.key] for channel in card.channels]
    result = segment(images, card, SegmentOptions(device="cpu"), network=network)
    prediction = sitk.GetArrayFromImage(result.labelmap)
    reference = sitk.GetArrayFromImage(case.seg)
    scores = {name: dice(prediction, reference, labels) for name, labels in score_columns(card).items()}
    return CaseScores(seed=seed, scores=scores, seconds=result.seconds)


def markdown_table(card: ModelCard, results: Sequence[CaseScores]) -> str:
    """One row per case, then the mean and the minimum of every column."""
    columns = list(score_columns(card))
    lines = ["| seed | " + " | ".join(columns) + " | seconds |", "|---" * (len(columns) + 2) + "|"]
    for r in results:
        lines.append(f"| {r.seed} | " + " | ".join(f"{r.scores[c]:.3f}" for c in columns) + f" | {r.seconds:.1f} |")
    for name, reduce in (("**mean**", np.mean), ("**min**", np.min)):
        values = [float(reduce([r.scores[c] for r in results])) for c in columns]
        seconds = float(reduce([r.seconds for r in results]))
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {seconds:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--card", type=Path, default=DEMO_CARD, help="model card (default: the shipped demo card)")
    parser.add_argument("--cases", type=int, default=20, help="number of held-out phantoms (default 20)")
    parser.add_argument("--first-seed", type=int, default=HELD_OUT_SEED_START)
    parser.add_argument("--shape", type=int, nargs=3, default=BRATS_SHAPE, metavar=("X", "Y", "Z"),
                        help="phantom grid in voxels (default: the BraTS grid 240 240 155)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared 2-core machine two threads ran 6x slower)")
    args = parser.parse_args(argv)
    if args.first_seed < HELD_OUT_SEED_START:
        parser.error(f"seeds below {HELD_OUT_SEED_START} are training seeds; evaluate on held-out ones")
    torch.set_num_threads(args.threads)
    card = load_card(args.card)
    network = load_network(card, None, torch.device("cpu"))
    print(f"{card.display_name}: {args.cases} held-out phantoms of {tuple(args.shape)} voxels "
          f"(seeds {args.first_seed}..{args.first_seed + args.cases - 1}); synthetic data, not for clinical use.",
          flush=True)
    results = []
    for seed in range(args.first_seed, args.first_seed + args.cases):
        results.append(evaluate_case(card, seed, args.shape, network))
        summary = ", ".join(f"{k} {v:.3f}" for k, v in results[-1].scores.items())
        print(f"seed {seed}: {summary} ({results[-1].seconds:.1f} s)", flush=True)
    print()
    print(markdown_table(card, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

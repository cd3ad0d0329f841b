"""``segmamba-slicer phantom``: write a synthetic BraTS-like case, to try the tools without patient data."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``phantom OUT_DIR`` to a ``segmamba-slicer`` sub-command parser."""
    p = subparsers.add_parser("phantom", help="write a synthetic BraTS-like case (not real anatomy)")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape", type=int, nargs=3, default=[240, 240, 155], metavar=("X", "Y", "Z"))
    p.add_argument("--case-id", help="case folder name (default Phantom-<seed>)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Write the case's images and labels and print their paths."""
    from ..evaluation.phantom import make_phantom, write_brats_case

    case = make_phantom(shape=tuple(args.shape), seed=args.seed)
    paths = write_brats_case(case, Path(args.out_dir), args.case_id or f"Phantom-{args.seed:05d}")
    for key, path in paths.items():
        print(f"{key}: {path}")
    return 0

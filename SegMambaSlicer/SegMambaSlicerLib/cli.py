"""Command line: ``segmamba-slicer predict|models|phantom``.

Errors the user can fix print one line and exit non-zero; ``--verbose`` adds the traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from .errors import SegMambaError

EXIT_USER_ERROR = 1
EXIT_BUG = 2
EXIT_CANCELLED = 130


class ProgressBar:
    """A one-line text progress bar on stderr with an ETA (redrawn in place on terminals)."""

    def __init__(self, stream=sys.stderr, width: int = 30) -> None:
        self.stream, self.width = stream, width
        self.start = time.perf_counter()
        self.tty = stream.isatty()
        self.last_printed = -1.0
        self.message = ""

    def __call__(self, fraction: float, message: str) -> None:
        if fraction <= 0.0:
            if message != self.message:
                self._finish_line()
                print(f"{message} ...", file=self.stream, flush=True)
            self.message = message
            self.start = time.perf_counter()
            return
        if not self.tty and fraction - self.last_printed < 0.1 and fraction < 1.0:
            return
        self.last_printed = fraction
        elapsed = time.perf_counter() - self.start
        eta = elapsed * (1.0 - fraction) / fraction
        filled = int(self.width * fraction)
        bar = "#" * filled + "-" * (self.width - filled)
        line = f"[{bar}] {100 * fraction:5.1f}% {message} elapsed {elapsed:5.0f}s eta {eta:5.0f}s"
        end = "" if self.tty and fraction < 1.0 else "\n"
        print(("\r" if self.tty else "") + line, end=end, file=self.stream, flush=True)

    def _finish_line(self) -> None:
        if self.tty and 0.0 < self.last_printed < 1.0:
            print(file=self.stream)


def _cmd_predict(args: argparse.Namespace) -> int:
    from .imageio import write_image_atomic
    from .pipeline import SegmentOptions, segment
    from .registry import resolve_model

    card = resolve_model(args.model)
    options = SegmentOptions(
        device=args.device, weights=args.weights, overlap=args.overlap, sw_batch_size=args.sw_batch_size,
        tta=args.tta, mixed_precision=not args.no_amp, scan_backend=args.scan_backend,
    )
    progress = None if args.quiet else ProgressBar()
    result = segment(args.input, card, options, progress=progress)
    out = write_image_atomic(result.labelmap, args.output)
    print(f"label map: {out}")
    if args.seg_nrrd:
        from .seg_nrrd import write_seg_nrrd

        seg_path = Path(args.seg_nrrd) if args.seg_nrrd != "auto" else _seg_nrrd_beside(out)
        written = write_seg_nrrd(result.labelmap, card.labels, seg_path, extra_segments=card.regions)
        print(f"segmentation: {written}")
    print(f"device {result.device}, {result.windows} windows, {result.seconds:.1f} s")
    for name, ml in result.volumes.items():
        print(f"  {name}: {ml:.2f} mL")
    return 0


def _seg_nrrd_beside(path: Path) -> Path:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return path.with_name(name + ".seg.nrrd")


def _cmd_models(args: argparse.Namespace) -> int:
    from .cards import builtin_cards
    from .registry import resolve_model

    if args.action == "list":
        for card in builtin_cards().values():
            weights = card.weights_path()
            state = "weights ready" if weights and weights.is_file() else f"weights: {card.weights.kind}"
            print(f"{card.id:28s} {card.architecture:12s} {state:16s} {card.display_name}")
        return 0
    card = resolve_model(args.model)
    print(f"id: {card.id}\nname: {card.display_name}\narchitecture: {card.architecture} {card.architecture_kwargs}")
    print("inputs: " + ", ".join(f"{c.key} ({c.display_name})" for c in card.channels))
    print("labels: " + ", ".join(f"{lab.value}={lab.name}" for lab in card.labels))
    if card.regions:
        print("regions: " + ", ".join(f"{r.name}={'+'.join(map(str, r.labels))}" for r in card.regions))
    print(f"weights: {card.weights.kind} {card.weights.file or card.weights.url or ''}")
    if card.weights.instructions:
        print(f"  {card.weights.instructions}")
    if card.intended_use:
        print(f"intended use: {card.intended_use}")
    return 0


def _cmd_phantom(args: argparse.Namespace) -> int:
    from .phantom import make_phantom, write_brats_case

    case = make_phantom(shape=tuple(args.shape), seed=args.seed)
    paths = write_brats_case(case, Path(args.out_dir), args.case_id or f"Phantom-{args.seed:05d}")
    for key, path in paths.items():
        print(f"{key}: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (separate so tests and docs can inspect it)."""
    parser = argparse.ArgumentParser(prog="segmamba-slicer", description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", "-v", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("predict", help="segment one case")
    p.add_argument("--model", "-m", required=True, help="model card id, card .json, or checkpoint .pt")
    p.add_argument("--weights", "-w", help="weights file (overrides the card's)")
    p.add_argument("-i", "--input", nargs="+", required=True,
                   help="one image per model input in the card's order (e.g. T2W T2F T1N T1C), or one case folder")
    p.add_argument("-o", "--output", required=True, type=Path, help="label map to write (.nii.gz, .nrrd)")
    p.add_argument("--seg-nrrd", nargs="?", const="auto", help="also write a Slicer .seg.nrrd (path optional)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--overlap", type=float, help="sliding-window overlap in [0, 1) (card default)")
    p.add_argument("--sw-batch-size", type=int, help="windows per network call (card default)")
    p.add_argument("--tta", action="store_true", help="mirror test-time augmentation (8x slower)")
    p.add_argument("--no-amp", action="store_true", help="float32 on CUDA instead of fp16 autocast")
    p.add_argument("--scan-backend", choices=["auto", "torch", "fused", "reference"], help="selective-scan backend")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("models", help="list or show model cards")
    msub = p.add_subparsers(dest="action", required=True)
    msub.add_parser("list", help="list built-in models")
    show = msub.add_parser("show", help="show one model card")
    show.add_argument("model", help="card id, card .json or checkpoint")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("phantom", help="write a synthetic BraTS-like case (not real anatomy)")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape", type=int, nargs=3, default=[240, 240, 155], metavar=("X", "Y", "Z"))
    p.add_argument("--case-id", help="case folder name (default Phantom-<seed>)")
    p.set_defaults(func=_cmd_phantom)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``segmamba-slicer`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("\ncancelled", file=sys.stderr)
        return EXIT_CANCELLED
    except SegMambaError as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as exc:  # noqa: BLE001 - last resort: one line, traceback on request
        if args.verbose:
            traceback.print_exc()
        print(f"error: unexpected {type(exc).__name__}: {exc} (run with --verbose for details)", file=sys.stderr)
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())

"""What several commands share: the progress bar and the run options of the commands that segment.

The run options are added by :func:`add_run_options` and read back by :func:`segment_options` only, so
``predict`` and ``batch`` cannot drift apart (one gaining an option the other silently lacks).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING, TextIO

from ..networks.ops import SCAN_BACKENDS

if TYPE_CHECKING:
    from ..engine.pipeline import SegmentOptions

DEVICE_HELP = "auto | cpu | cuda | cuda:N | mps"


class ProgressBar:
    """A one-line text progress bar on stderr with an ETA (redrawn in place on terminals)."""

    def __init__(self, stream: TextIO | None = None, width: int = 30) -> None:
        self.stream, self.width = stream or sys.stderr, width  # looked up now: tests and GUIs swap sys.stderr
        self.start = time.perf_counter()
        self.tty = self.stream.isatty()
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


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Add the options of a segmentation run (device, weights, windows, folds, quiet) to ``parser``."""
    parser.add_argument("--weights", "-w", help="weights file (overrides the card's)")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--overlap", type=float, help="sliding-window overlap in [0, 1) (card default)")
    parser.add_argument("--sw-batch-size", type=int, help="windows per network call (card default)")
    parser.add_argument("--tta", action="store_true", help="mirror test-time augmentation (8x slower)")
    parser.add_argument("--no-amp", action="store_true", help="float32 on CUDA instead of fp16 autocast")
    parser.add_argument("--scan-backend", choices=SCAN_BACKENDS, help="selective-scan backend")
    parser.add_argument("--low-memory", action="store_true",
                        help="lower peak memory at some speed cost (docs/benchmarks.md, \"Memory\")")
    parser.add_argument("--folds", nargs="+",
                        help="nnU-Net result folders: folds to ensemble (e.g. 0 1 2 or all)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def segment_options(args: argparse.Namespace) -> SegmentOptions:
    """The :class:`SegmentOptions` that the options of :func:`add_run_options` ask for.

    Imports the pipeline, and with it PyTorch: call it after the output checks, which must stay fast.
    """
    from ..engine.pipeline import SegmentOptions

    return SegmentOptions(
        device=args.device, weights=args.weights, overlap=args.overlap, sw_batch_size=args.sw_batch_size,
        tta=args.tta, mixed_precision=not args.no_amp, scan_backend=args.scan_backend, folds=args.folds,
        low_memory=args.low_memory,
    )


def progress_bar(args: argparse.Namespace) -> ProgressBar | None:
    """The progress bar of a run, or None with ``--quiet``."""
    return None if args.quiet else ProgressBar()

"""Command line: ``segmamba-slicer predict|models|phantom|demo|batch|evaluate|measure``.

Errors the user can fix print one line and exit non-zero; ``--verbose`` adds the traceback.
Each command lives in its own module (``add_parser`` and the function it runs); this module builds the
parser from them and turns what the commands raise into exit codes.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Sequence

from ..errors import SegMambaError
from . import batch, demo, evaluate, measure, models, phantom, predict
from .predict import check_outputs, seg_nrrd_beside

__all__ = [
    "EXIT_BUG",
    "EXIT_CANCELLED",
    "EXIT_TERMINATED",
    "EXIT_USER_ERROR",
    "Terminated",
    "build_parser",
    "check_outputs",
    "handle_sigterm",
    "main",
    "seg_nrrd_beside",
]

EXIT_USER_ERROR = 1
EXIT_BUG = 2
EXIT_CANCELLED = 130
#: 128 + SIGTERM, as a shell reports a process that SIGTERM ended.
EXIT_TERMINATED = 143

#: The commands in the order ``--help`` lists them.
_COMMANDS = (predict, models, phantom, demo, batch, evaluate, measure)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (separate so tests and docs can inspect it)."""
    parser = argparse.ArgumentParser(prog="segmamba-slicer", description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", "-v", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in _COMMANDS:
        command.add_parser(sub)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler or ``kill`` ending the run), raised like Ctrl-C so that cleanup runs."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def handle_sigterm() -> None:
    """Make SIGTERM unwind like Ctrl-C (temporary files removed); only the main thread may set this."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``segmamba-slicer`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(message)s")
    if sys.platform == "darwin":  # read when PyTorch loads: MPS lacks some 3-D operations, the CPU does them
        os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")
    previous = signal.getsignal(signal.SIGTERM)
    handle_sigterm()
    try:
        return args.func(args)
    except Terminated:
        print("\nterminated", file=sys.stderr)
        return EXIT_TERMINATED
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
        print(f"error: unexpected {type(exc).__name__}: {exc} (run with --verbose for details)",
              file=sys.stderr)
        return EXIT_BUG
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)

"""The child side of the Slicer module's worker: ``python -m SegMambaSlicerLib.run.worker_child JOB.json``.

It reads the job (:mod:`.worker_protocol`), runs the one shared pipeline and reports on its stdout as
JSON lines; everything the libraries print goes to stderr instead, so no stray line can break the
stream. It exits by itself when the parent dies (its stdin closes), so a crashed Slicer leaves no
process computing for nobody. Errors are reported with their class name, so the parent can raise
the same SegMambaError the in-process run would.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import SimpleITK as sitk

from ..errors import SegMambaError
from ..models.cards import card_from_dict
from .worker_protocol import (
    CHILD_MODULE,
    EXIT_ORPHANED,
    KIND_INTERNAL_ERROR,
    KIND_OUT_OF_MEMORY,
    format_event,
    load_image_npz,
    read_job,
    save_image_npz,
)

_OOM_HINT = (
    "The computer ran out of memory while segmenting. Try, in this order: sliding-window batch size 1, "
    "mirror TTA off, mixed precision on (GPU), closing other programs, or the CPU device "
    "(slower, but it uses the computer's main memory)."
)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CPU, CUDA and MPS out-of-memory errors (recognised without importing torch)."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


class _Emitter:
    """Writes events as JSON lines to the private copy of the original stdout."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream, self.lock = stream, threading.Lock()

    def emit(self, event: str, **data: Any) -> None:
        line = format_event(event, **data)
        with self.lock:
            self.stream.write(line)
            self.stream.flush()

    def progress(self, fraction: float, message: str) -> None:
        self.emit("progress", fraction=float(fraction), message=message)


class _LogForwarder(logging.Handler):
    def __init__(self, emitter: _Emitter) -> None:
        super().__init__(logging.INFO)
        self.emitter = emitter

    def emit(self, record: logging.LogRecord) -> None:
        self.emitter.emit("log", level=record.levelname, message=record.getMessage())


def _private_stdout() -> IO[str]:
    """Keep the real stdout for events; send fd 1 (prints of Python and C libraries) to stderr."""
    sys.stdout.flush()
    events_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(events_fd, "w", encoding="utf-8", newline="\n")


def _exit_when_parent_goes() -> None:
    """The parent holds our stdin open; end of file means it died, so stop computing for nobody."""

    def watch() -> None:
        while os.read(0, 4096):  # raw reads: a buffered stdin would block interpreter shutdown
            pass
        os._exit(EXIT_ORPHANED)

    threading.Thread(target=watch, daemon=True).start()


def _load_input(path: str) -> sitk.Image | str:
    return load_image_npz(path) if path.endswith(".npz") else path


def _run_job(job: Mapping[str, Any], emitter: _Emitter) -> None:
    card_path = job.get("card_path")
    card = card_from_dict(job["card"], source_path=Path(card_path) if card_path else None)
    emitter.progress(0.0, "loading PyTorch")
    import torch

    from ..engine.pipeline import SegmentOptions, segment

    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    known = {f.name for f in dataclasses.fields(SegmentOptions)}
    options = SegmentOptions(**{k: v for k, v in job.get("options", {}).items() if k in known})
    images = [_load_input(path) for path in job["inputs"]]
    result = segment(images, card, options, progress=emitter.progress)
    save_image_npz(result.labelmap, job["output"])
    confidence = None
    if result.confidence is not None:  # asked for in the options: handed over beside the label map
        confidence = str(save_image_npz(result.confidence, Path(job["output"]).with_name("confidence.npz")))
    emitter.emit("result", output=job["output"], confidence=confidence, device=result.device,
                 seconds=result.seconds, windows=result.windows, volumes=result.volumes,
                 warnings=list(result.warnings))


def main(argv: Sequence[str] | None = None) -> int:
    """Child entry point: ``python -m SegMambaSlicerLib.run.worker_child JOB.json``; 0 on success."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print(f"usage: python -m {CHILD_MODULE} JOB.json", file=sys.stderr)
        return 2
    emitter = _Emitter(_private_stdout())
    emitter.emit("started", pid=os.getpid(), python=sys.executable)
    logger = logging.getLogger("SegMambaSlicerLib")  # the whole library: every module logs below it
    logger.addHandler(_LogForwarder(emitter))
    logger.setLevel(logging.INFO)
    try:
        job = read_job(args[0])
        if job.get("watch_parent"):
            _exit_when_parent_goes()
        _run_job(job, emitter)
    except SegMambaError as exc:
        emitter.emit("error", kind=type(exc).__name__, message=str(exc), traceback=traceback.format_exc())
        return 1
    except Exception as exc:  # noqa: BLE001 - everything else is reported, with its traceback
        if is_out_of_memory(exc):
            emitter.emit("error", kind=KIND_OUT_OF_MEMORY, traceback=traceback.format_exc(),
                         message=f"{_OOM_HINT} ({type(exc).__name__}: {exc})")
        else:
            emitter.emit("error", kind=KIND_INTERNAL_ERROR, message=f"{type(exc).__name__}: {exc}",
                         traceback=traceback.format_exc())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

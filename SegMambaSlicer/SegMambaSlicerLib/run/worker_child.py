"""The child side of the Slicer module's worker: ``python -m SegMambaSlicerLib.run.worker_child``.

It reads job file paths from its stdin, one per line, and for each reads the job (:mod:`.worker_protocol`),
runs the one shared pipeline and reports on its stdout as JSON lines, ending each job with
:data:`EVENT_JOB_DONE`; everything the libraries print goes to stderr instead, so no stray line can break
the stream. Between jobs it keeps PyTorch imported and the last network loaded, so the next Segment
click on the same model skips seconds of imports, loading and first-touch memory faults. It exits by
itself when the parent dies (its stdin closes), so a crashed Slicer leaves no process computing for
nobody; the parent ends it on cancel, on release and after its idle timeout. Errors are reported with
their class name, so the parent can raise the same SegMambaError the in-process run would.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import sys
import threading
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import SimpleITK as sitk

from ..errors import SegMambaError
from ..models.cards import ModelCard, card_from_dict
from .worker_protocol import (
    CHILD_MODULE,
    EVENT_JOB_DONE,
    EVENT_NETWORK,
    EXIT_ORPHANED,
    KIND_INTERNAL_ERROR,
    KIND_OUT_OF_MEMORY,
    format_event,
    load_image_npz,
    parse_job_line,
    read_job,
    save_image_npz,
)

if TYPE_CHECKING:
    from ..engine.pipeline import SegmentOptions

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


def _job_paths() -> queue.Queue[Path]:
    """Job file paths as the parent writes them to our stdin, read by a thread so that the main thread can
    compute; end of file means the parent went away (Slicer closed or crashed), so stop computing for nobody.
    """
    jobs: queue.Queue[Path] = queue.Queue()

    def read() -> None:
        pending = b""
        while chunk := os.read(0, 4096):  # raw reads: a buffered stdin would block interpreter shutdown
            *lines, pending = (pending + chunk).split(b"\n")
            for line in filter(None, (raw.strip() for raw in lines)):
                jobs.put(parse_job_line(line.decode("utf-8")))
        os._exit(EXIT_ORPHANED)

    threading.Thread(target=read, daemon=True).start()
    return jobs


def _load_input(path: str) -> sitk.Image | str:
    return load_image_npz(path) if path.endswith(".npz") else path


def _file_signature(path: Path | None) -> tuple[str, int, int] | str | None:
    """A weights file by path, size and modification time, so one replaced in place is loaded again."""
    if path is None or not path.is_file():
        return None if path is None else str(path)
    stat = path.stat()
    return str(path), stat.st_size, stat.st_mtime_ns


def network_key(
    job: Mapping[str, Any], card: ModelCard, options: SegmentOptions, device: str
) -> tuple[Any, ...]:
    """Everything a loaded network depends on, so a job reuses the last network only when it would build the
    same one: the card, its weights file as it is now, the folds, the device, and the scan backend (which
    ``segment`` sets on the network itself)."""
    weights = Path(options.weights).expanduser() if options.weights else card.weights_path()
    folds = tuple(str(f) for f in options.folds) if options.folds else None
    card_json = json.dumps(job["card"], sort_keys=True)
    return card_json, job.get("card_path"), _file_signature(weights), folds, device, options.scan_backend


@dataclass
class _LoadedNetwork:
    """The last job's network, kept so that the next job with the same key skips building and loading it
    (and finds its memory already mapped): the warm worker's whole point."""

    key: tuple[Any, ...] | None = None
    network: Any = None
    loads: int = 0

    def get(self, key: tuple[Any, ...], load: Callable[[], Any]) -> tuple[Any, bool]:
        """The network for ``key`` and whether it was reused; another key drops the old one before loading,
        so two networks never hold memory at once."""
        if key == self.key and self.network is not None:
            return self.network, True
        self.key = self.network = None
        self.network = load()
        self.key, self.loads = key, self.loads + 1
        return self.network, False


def _run_job(job: Mapping[str, Any], emitter: _Emitter, loaded: _LoadedNetwork) -> None:
    card_path = job.get("card_path")
    card = card_from_dict(job["card"], source_path=Path(card_path) if card_path else None)
    if "torch" not in sys.modules:
        emitter.progress(0.0, "loading PyTorch")
    import torch

    from ..engine import rates
    from ..engine.devices import resolve_device
    from ..engine.memory import current_rss
    from ..engine.pipeline import SegmentOptions, load_network, segment

    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    known = {f.name for f in dataclasses.fields(SegmentOptions)}
    options = SegmentOptions(**{k: v for k, v in job.get("options", {}).items() if k in known})
    device = resolve_device(options.device)

    def load() -> Any:
        emitter.progress(0.0, "loading model")
        return load_network(card, options.weights, device, options.folds)

    network, reused = loaded.get(network_key(job, card, options, str(device)), load)
    emitter.emit(EVENT_NETWORK, reused=reused, loads=loaded.loads, pid=os.getpid())
    weights = rates.weights_bytes(network)
    # the runtime is measured with the network just loaded and no image read yet (a reused one has leftovers)
    runtime = None if reused else rates.runtime_bytes(current_rss(), weights if device.type != "cuda" else 0)
    images = [_load_input(path) for path in job["inputs"]]
    measured = rates.MeasuredNetwork(network)
    result = segment(images, card, options, progress=emitter.progress, network=measured)
    _record_rate(card, options, device, images, measured, result.seconds, weights, runtime, cold=not reused)
    save_image_npz(result.labelmap, job["output"])
    confidence = None
    if result.confidence is not None:  # asked for in the options: handed over beside the label map
        confidence = str(save_image_npz(result.confidence, Path(job["output"]).with_name("confidence.npz")))
    emitter.emit("result", output=job["output"], confidence=confidence, device=result.device,
                 seconds=result.seconds, windows=result.windows, volumes=result.volumes,
                 warnings=list(result.warnings))


def _record_rate(card: ModelCard, options: SegmentOptions, device: Any, images: Sequence[sitk.Image | str],
                 measured: Any, seconds: float, weights: int, runtime: int | None, cold: bool) -> None:
    """Fold the job's measured time per window and memory into this computer's rate (the module's estimate
    before the next click reads it). Bookkeeping only: a failure is logged, never the job's error."""
    from ..engine.rates import record_run, run_key

    try:
        first = images[0] if isinstance(images[0], sitk.Image) else None
        voxels = (int(np.prod(first.GetSize())) * len(images)) if first is not None else 0
        record_run(run_key(card, options, device), measured, seconds, voxels, weights, runtime, cold)
    except Exception as exc:  # noqa: BLE001 - the segmentation succeeded; the estimate just stays as it was
        logging.getLogger(__name__).warning("could not record the run's speed for the next estimate: %s", exc)


def _serve(job_path: Path, emitter: _Emitter, loaded: _LoadedNetwork) -> None:
    """Run one job and report its result or its error; an error ends the job, never the process."""
    try:
        _run_job(read_job(job_path), emitter, loaded)
    except SegMambaError as exc:
        emitter.emit("error", kind=type(exc).__name__, message=str(exc), traceback=traceback.format_exc())
    except Exception as exc:  # noqa: BLE001 - everything else is reported, with its traceback
        if is_out_of_memory(exc):
            emitter.emit("error", kind=KIND_OUT_OF_MEMORY, traceback=traceback.format_exc(),
                         message=f"{_OOM_HINT} ({type(exc).__name__}: {exc})")
        else:
            emitter.emit("error", kind=KIND_INTERNAL_ERROR, message=f"{type(exc).__name__}: {exc}",
                         traceback=traceback.format_exc())


def main(argv: Sequence[str] | None = None) -> int:
    """Child entry point: ``python -m SegMambaSlicerLib.run.worker_child``, then job file paths on stdin.

    Serves one job after the other, each ending with :data:`EVENT_JOB_DONE`, until its stdin closes
    (exit :data:`EXIT_ORPHANED`) or the parent ends it.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args:
        print(f"usage: python -m {CHILD_MODULE}  (then one job file path per line on stdin)", file=sys.stderr)
        return 2
    emitter = _Emitter(_private_stdout())
    emitter.emit("started", pid=os.getpid(), python=sys.executable)
    logger = logging.getLogger("SegMambaSlicerLib")  # the whole library: every module logs below it
    logger.addHandler(_LogForwarder(emitter))
    logger.setLevel(logging.INFO)
    jobs, loaded = _job_paths(), _LoadedNetwork()
    while True:
        _serve(jobs.get(), emitter, loaded)
        emitter.emit(EVENT_JOB_DONE)


if __name__ == "__main__":
    sys.exit(main())

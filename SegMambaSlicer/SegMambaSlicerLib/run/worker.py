"""Run one segmentation in a separate Python process, with streamed progress and a hard cancel.

Why a child process: the Slicer GUI must never freeze; Cancel must stop work that sits deep inside
PyTorch kernels (only ending the process does that, at once); and a crash or an out-of-memory kill
of the network must not take Slicer down with it. The child is the same Python that runs Slicer
(:func:`python_executable`), started as ``python -m SegMambaSlicerLib.run.worker JOB.json``.

Hand-over, all in a private temporary folder that is deleted afterwards:

* inputs: one uncompressed ``.npz`` per channel holding the voxels and the exact LPS geometry as
  float64 (no rounding through a file header, no slow compression), or plain image file paths;
* ``job.json``: the model card (as its JSON dict), the :class:`~.pipeline.SegmentOptions`, the
  output path and the torch thread count;
* stdout of the child: one JSON object per line — ``started``, ``progress`` (fraction, message),
  ``log``, then ``result`` or ``error``. Anything else the child's libraries print goes to stderr,
  whose last lines are kept for error messages;
* output: the label map as ``.npz`` on the first input's grid.

The parent side (:class:`WorkerProcess`) never blocks in :meth:`~WorkerProcess.poll`: two reader
threads move lines into a queue. The child exits by itself when the parent dies (its stdin closes).
This module imports neither torch nor Qt in the parent; the child imports the pipeline.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import SimpleITK as sitk

from ..errors import CancelledError, SegMambaError
from ..models.cards import ModelCard, card_from_dict, card_to_dict

if TYPE_CHECKING:
    from ..engine.pipeline import SegmentationResult, SegmentOptions

JOB_VERSION = 1
STDERR_TAIL_LINES = 30
#: Seconds a finished worker's leftover children may keep its output pipes open before they are killed.
PIPE_GRACE_SECONDS = 2.0
#: Exit code of a child whose parent went away (its stdin reached end of file).
EXIT_ORPHANED = 3
_LIB_PARENT = Path(__file__).resolve().parents[2]
_OOM_HINT = (
    "The computer ran out of memory while segmenting. Try, in this order: sliding-window batch size 1, "
    "mirror TTA off, mixed precision on (GPU), closing other programs, or the CPU device "
    "(slower, but it uses the computer's main memory)."
)
# Windows NTSTATUS exit codes of crashed processes.
_WINDOWS_CRASHES = {
    0xC0000005: "crashed (access violation)",
    0xC00000FD: "crashed (stack overflow)",
    0xC0000409: "crashed (fatal runtime error)",
    0xC0000017: "ran out of memory",
    0xC000012D: "ran out of memory (the page file is too small)",
}


class WorkerError(SegMambaError):
    """The segmentation worker failed; ``details`` holds its traceback or last stderr lines."""

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.details = details


class WorkerCrashedError(WorkerError):
    """The worker process ended without reporting a result or an error (crash, kill, bad interpreter)."""


class WorkerOutOfMemoryError(WorkerError):
    """The network ran out of GPU or main memory in the worker."""


# ---------------------------------------------------------------- hand-over formats


def save_image_npz(image: sitk.Image, path: str | os.PathLike[str]) -> Path:
    """Write a 3-D scalar image uncompressed with float64 geometry, so it reads back bit-identical."""
    path = Path(path)
    np.savez(
        path,
        voxels=sitk.GetArrayViewFromImage(image),
        spacing=np.asarray(image.GetSpacing(), dtype=np.float64),
        origin=np.asarray(image.GetOrigin(), dtype=np.float64),
        direction=np.asarray(image.GetDirection(), dtype=np.float64),
    )
    return path


def load_image_npz(path: str | os.PathLike[str]) -> sitk.Image:
    """Read an image written by :func:`save_image_npz`."""
    with np.load(path, allow_pickle=False) as data:
        image = sitk.GetImageFromArray(data["voxels"])
        image.SetSpacing(data["spacing"].tolist())
        image.SetOrigin(data["origin"].tolist())
        image.SetDirection(data["direction"].tolist())
    return image


def options_to_dict(options: SegmentOptions | None) -> dict[str, Any]:
    """SegmentOptions as JSON values (paths as strings); ``{}`` means the defaults."""
    if options is None:
        return {}
    values = dataclasses.asdict(options)
    return {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in values.items()}


# ---------------------------------------------------------------- interpreter and process helpers


def python_executable(
    executable: str = sys.executable,
    platform: str = sys.platform,
    which: Callable[[str], str | None] = shutil.which,
    is_file: Callable[[Path], bool] = Path.is_file,
) -> str:
    """The Python interpreter for the child: this one, or Slicer's ``PythonSlicer`` launcher.

    Inside the Slicer application ``sys.executable`` is the application itself (``SlicerApp-real``,
    ``Slicer.exe``), which would open a second Slicer. ``PythonSlicer`` sets up Slicer's libraries
    and runs plain Python; it sits next to the application (Linux, Windows), in ``Contents/bin``
    (macOS), and on the PATH that Slicer's launcher sets.
    """
    here = Path(executable)
    if here.name.lower().startswith("python"):
        return executable
    name = "PythonSlicer.exe" if platform == "win32" else "PythonSlicer"
    for candidate in (here.with_name(name), here.parent.parent / "bin" / name):
        if is_file(candidate):
            return str(candidate)
    found = which("PythonSlicer")
    if found:
        return found
    raise WorkerError(
        f"Cannot find 3D Slicer's Python interpreter (PythonSlicer) next to {executable} or on the PATH, "
        "so the segmentation cannot run in the background. Reinstall Slicer, or segment from the Python "
        "console with the logic's synchronous segment()."
    )


def worker_environment(base: Mapping[str, str]) -> dict[str, str]:
    """The child's environment: the parent's, with this package importable and unbuffered UTF-8 I/O."""
    env = dict(base)
    paths = [str(_LIB_PARENT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def describe_exit(returncode: int, platform: str = sys.platform) -> str:
    """How a process ended, in words a user can act on ("was killed (SIGKILL) ... out of memory")."""
    if platform == "win32":
        code = returncode & 0xFFFFFFFF
        if code in _WINDOWS_CRASHES:
            return f"{_WINDOWS_CRASHES[code]} (exit code 0x{code:08X})"
        return f"exited with code {returncode}"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        if name == "SIGKILL":
            return ("was killed (SIGKILL); the operating system does this when the computer runs out of "
                    "memory")
        if name == "SIGSEGV":
            return "crashed (SIGSEGV, segmentation fault)"
        return f"was stopped by {name}"
    return f"exited with code {returncode}"


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CPU, CUDA and MPS out-of-memory errors (recognised without importing torch)."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def kill_process_tree(process: subprocess.Popen) -> None:
    """End the child and everything it started, at once (its own process group / Windows job tree)."""
    if process.poll() is not None and os.name != "nt":
        try:  # the leader is gone, but processes it started may still be in its group
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return
    if os.name == "nt":
        done = subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], capture_output=True,
                              check=False, creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))
        if done.returncode != 0 and process.poll() is None:
            process.kill()
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _error_class(kind: str) -> type[SegMambaError] | None:
    """The SegMambaError subclass named ``kind`` (so the caller sees the same error type as in-process)."""
    pending: list[type[SegMambaError]] = [SegMambaError]
    while pending:
        cls = pending.pop()
        if cls.__name__ == kind:
            return cls
        pending.extend(cls.__subclasses__())
    return None


# ---------------------------------------------------------------- parent side


@dataclass(frozen=True)
class WorkerEvent:
    """One thing the worker reported: ``started``, ``progress``, ``log``, ``stderr``, ``result``, ``error``,
    or ``finished``, which the parent adds last once the child has ended (its message is the outcome)."""

    kind: str
    message: str = ""
    fraction: float | None = None
    data: Mapping[str, Any] = field(default_factory=dict)


def parse_event(line: str) -> WorkerEvent:
    """One stdout line of the child as an event; a line that is not an event object becomes a log line."""
    text = line.rstrip("\r\n")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("event"), str):
        return WorkerEvent("log", text)
    fraction = data.get("fraction")
    return WorkerEvent(data["event"], str(data.get("message", "")),
                       float(fraction) if fraction is not None else None, data)


_NEW, _RUNNING, _DONE, _FAILED, _CANCELLED = "new", "running", "done", "failed", "cancelled"


class WorkerProcess:
    """One segmentation in a child process. Call :meth:`poll` from a timer, or :meth:`run` to wait.

    ``images`` are SimpleITK images (handed over as ``.npz``) or image file paths, one per card
    channel. ``threads`` limits the child's torch CPU threads (None = torch's default).
    """

    def __init__(
        self,
        images: Sequence[sitk.Image | str | os.PathLike[str]],
        card: ModelCard,
        options: SegmentOptions | None = None,
        python: str | None = None,
        threads: int | None = None,
    ) -> None:
        self.images, self.card, self.options = list(images), card, options
        self.python, self.threads = python, threads
        self.folder: Path | None = None
        self.process: subprocess.Popen | None = None
        self._events: queue.Queue[WorkerEvent] = queue.Queue()
        self._readers: list[threading.Thread] = []
        self._stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self._state = _NEW
        self._result_event: WorkerEvent | None = None
        self._error_event: WorkerEvent | None = None
        self._error: SegMambaError | None = None
        self._labelmap: sitk.Image | None = None
        self._exited_at: float | None = None

    # -- lifecycle

    def start(self) -> None:
        """Write the job to a private temporary folder and start the child (returns at once)."""
        if self._state != _NEW:
            raise WorkerError("This worker was already started; create a new one for another run.")
        python = self.python or python_executable()
        self.folder = Path(tempfile.mkdtemp(prefix="segmamba-"))
        try:
            job = self._write_job(self.folder)
            self.process = subprocess.Popen(
                [python, "-m", "SegMambaSlicerLib.run.worker", str(job)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                cwd=self.folder, env=worker_environment(os.environ), text=True, encoding="utf-8",
                errors="replace", bufsize=1, **_new_process_group(),
            )
        except OSError as exc:
            self._cleanup()
            raise WorkerError(f"Cannot start the segmentation worker with {python}: {exc}") from None
        except BaseException:
            self._cleanup()
            raise
        self._state = _RUNNING
        self._readers = [
            threading.Thread(target=self._read_events, args=(self.process.stdout,), daemon=True),
            threading.Thread(target=self._read_stderr, args=(self.process.stderr,), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def poll(self) -> list[WorkerEvent]:
        """Events since the last call, without waiting; after the child ends, the last one is ``finished``."""
        if self._state != _RUNNING:
            return []
        assert self.process is not None
        exited = self.process.poll() is not None
        drained = not any(r.is_alive() for r in self._readers)  # checked before draining: no line is lost
        if exited and not drained:
            self._exited_at = self._exited_at or time.monotonic()
            if time.monotonic() - self._exited_at > PIPE_GRACE_SECONDS:
                kill_process_tree(self.process)  # something the worker started still holds its pipes
        events = list(self._drain())
        if exited and drained:
            events.append(self._finish())
        return events

    @property
    def finished(self) -> bool:
        """True once the outcome is known: done, failed or cancelled."""
        return self._state in (_DONE, _FAILED, _CANCELLED)

    def cancel(self) -> None:
        """Kill the child and its process group now and delete the temporary files."""
        if self._state != _RUNNING:
            self._cleanup()
            return
        assert self.process is not None
        self._state = _CANCELLED
        kill_process_tree(self.process)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        self._close()
        self._cleanup()

    def result(self) -> SegmentationResult:
        """The segmentation, once finished; raises the worker's error, or CancelledError."""
        from ..engine.pipeline import SegmentationResult

        if self._state == _DONE:
            assert self._result_event is not None and self._labelmap is not None
            data = self._result_event.data
            return SegmentationResult(
                labelmap=self._labelmap, card=self.card, device=str(data["device"]),
                seconds=float(data["seconds"]), windows=int(data["windows"]),
                volumes={str(k): float(v) for k, v in data["volumes"].items()},
                warnings=tuple(str(w) for w in data.get("warnings", ())),
            )
        if self._state == _CANCELLED:
            raise CancelledError("Segmentation cancelled.")
        if self._state == _FAILED:
            assert self._error is not None
            raise self._error
        raise WorkerError("The segmentation has not finished yet.")

    def run(
        self,
        progress: Callable[[float, str], None] | None = None,
        cancel: Callable[[], bool] | None = None,
        poll_interval: float = 0.1,
    ) -> SegmentationResult:
        """Start (if needed) and wait for the result: the synchronous call for scripts and consoles.

        ``progress(fraction, message)`` is called for each progress event; ``cancel()`` is asked
        between polls. Ctrl+C (KeyboardInterrupt) kills the child too.
        """
        if self._state == _NEW:
            self.start()
        try:
            while not self.finished:
                for event in self.poll():
                    if event.kind == "progress" and progress is not None:
                        progress(event.fraction or 0.0, event.message)
                if cancel is not None and cancel():
                    self.cancel()
                elif not self.finished:
                    time.sleep(poll_interval)
        except BaseException:
            self.cancel()
            raise
        return self.result()

    # -- internals

    def _write_job(self, folder: Path) -> Path:
        inputs = []
        for index, image in enumerate(self.images):
            if isinstance(image, sitk.Image):
                inputs.append(str(save_image_npz(image, folder / f"input{index}.npz")))
            else:
                inputs.append(str(Path(image).expanduser().resolve()))
        job = {
            "version": JOB_VERSION,
            "inputs": inputs,
            "card": card_to_dict(self.card),
            "card_path": str(self.card.source_path) if self.card.source_path else None,
            "options": options_to_dict(self.options),
            "output": str(folder / "labelmap.npz"),
            "threads": self.threads,
            "watch_parent": True,
        }
        path = folder / "job.json"
        path.write_text(json.dumps(job, indent=1), encoding="utf-8")
        return path

    def _read_events(self, stream: IO[str]) -> None:
        for line in stream:
            self._events.put(parse_event(line))

    def _read_stderr(self, stream: IO[str]) -> None:
        for line in stream:
            text = line.rstrip("\r\n")
            self._stderr_tail.append(text)
            self._events.put(WorkerEvent("stderr", text))

    def _drain(self) -> Iterator[WorkerEvent]:
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return
            if event.kind == "result":
                self._result_event = event
            elif event.kind == "error":
                self._error_event = event
            yield event

    def _finish(self) -> WorkerEvent:
        assert self.process is not None
        returncode = self.process.wait()
        self._close()
        try:
            if self._result_event is not None and returncode == 0:
                self._labelmap = load_image_npz(self._result_event.data["output"])
                self._state = _DONE
                return WorkerEvent("finished", "Segmentation finished.")
            self._error = self._failure(returncode)
            self._state = _FAILED
            return WorkerEvent("finished", str(self._error))
        finally:
            self._cleanup()

    def _failure(self, returncode: int) -> SegMambaError:
        tail = "\n".join(self._stderr_tail)
        event = self._error_event
        if event is None:
            return WorkerCrashedError(
                f"The segmentation worker {describe_exit(returncode)} before it could report a result."
                + (f" Its last messages:\n{tail}" if tail else ""),
                details=tail,
            )
        kind, message = str(event.data.get("kind", "")), event.message
        details = str(event.data.get("traceback") or tail)
        if kind == "OutOfMemory":
            return WorkerOutOfMemoryError(message, details)
        cls = _error_class(kind)
        if cls is not None and not issubclass(cls, WorkerError):
            return cls(message)
        return WorkerError(f"The segmentation failed: {message}", details)

    def _close(self) -> None:
        assert self.process is not None
        for reader in self._readers:
            reader.join(timeout=2)
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass

    def _cleanup(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def _new_process_group() -> dict[str, Any]:
    """Popen arguments that give the child its own process group, so a cancel reaches its children."""
    if os.name == "nt":
        flags = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        return {"creationflags": flags}
    return {"start_new_session": True}


# ---------------------------------------------------------------- child side


class _Emitter:
    """Writes events as JSON lines to the private copy of the original stdout."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream, self.lock = stream, threading.Lock()

    def emit(self, event: str, **data: Any) -> None:
        line = json.dumps({"event": event, **data})
        with self.lock:
            self.stream.write(line + "\n")
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
    if job.get("version") != JOB_VERSION:
        raise WorkerError(f"Job version {job.get('version')} is not supported by this worker (expects 1).")
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
    emitter.emit("result", output=job["output"], device=result.device, seconds=result.seconds,
                 windows=result.windows, volumes=result.volumes, warnings=list(result.warnings))


def main(argv: Sequence[str] | None = None) -> int:
    """Child entry point: ``python -m SegMambaSlicerLib.run.worker JOB.json``; exit code 0 on success."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m SegMambaSlicerLib.run.worker JOB.json", file=sys.stderr)
        return 2
    emitter = _Emitter(_private_stdout())
    emitter.emit("started", pid=os.getpid(), python=sys.executable)
    logger = logging.getLogger("SegMambaSlicerLib")  # the whole library: every module logs below it
    logger.addHandler(_LogForwarder(emitter))
    logger.setLevel(logging.INFO)
    try:
        job = json.loads(Path(args[0]).read_text(encoding="utf-8"))
        if job.get("watch_parent"):
            _exit_when_parent_goes()
        _run_job(job, emitter)
    except SegMambaError as exc:
        emitter.emit("error", kind=type(exc).__name__, message=str(exc), traceback=traceback.format_exc())
        return 1
    except Exception as exc:  # noqa: BLE001 - everything else is reported, with its traceback
        if is_out_of_memory(exc):
            emitter.emit("error", kind="OutOfMemory", message=f"{_OOM_HINT} ({type(exc).__name__}: {exc})",
                         traceback=traceback.format_exc())
        else:
            emitter.emit("error", kind="InternalError", message=f"{type(exc).__name__}: {exc}",
                         traceback=traceback.format_exc())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

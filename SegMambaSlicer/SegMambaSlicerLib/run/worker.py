"""The worker's parent side: one segmentation in a separate Python process, with progress and a hard cancel.

Why a child process: the Slicer GUI must never freeze; Cancel must stop work that sits deep inside
PyTorch kernels (only ending the process does that, at once); and a crash or an out-of-memory kill
of the network must not take Slicer down with it. The child is the same Python that runs Slicer
(:func:`python_executable`), started as ``python -m SegMambaSlicerLib.run.worker_child JOB.json``
(:mod:`.worker_child`); what they exchange, all in a private temporary folder that is deleted
afterwards, is defined in :mod:`.worker_protocol`, whose public names are re-exported here.

:class:`WorkerProcess` never blocks in :meth:`~WorkerProcess.poll`: two reader threads move the
child's stdout events and stderr lines into a queue; the last stderr lines are kept for error
messages. By default the child leaves one CPU core free, so Slicer stays responsive while it computes.
This module imports neither torch nor Qt.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import SimpleITK as sitk

from ..errors import CancelledError, SegMambaError
from ..models.cards import ModelCard
from .worker_protocol import (
    CHILD_MODULE,
    EXIT_ORPHANED,
    JOB_VERSION,
    KIND_OUT_OF_MEMORY,
    WorkerCrashedError,
    WorkerError,
    WorkerEvent,
    WorkerOutOfMemoryError,
    load_image_npz,
    options_to_dict,
    parse_event,
    save_image_npz,
    write_job,
)

if TYPE_CHECKING:
    from ..engine.pipeline import SegmentationResult, SegmentOptions

__all__ = [
    "EXIT_ORPHANED", "JOB_VERSION", "WorkerCrashedError", "WorkerError", "WorkerEvent",
    "WorkerOutOfMemoryError", "WorkerProcess", "default_worker_threads", "describe_exit",
    "kill_process_tree", "load_image_npz", "options_to_dict", "parse_event", "python_executable",
    "save_image_npz", "taskkill_command", "usable_cpu_count", "worker_environment",
]

STDERR_TAIL_LINES = 30
#: Seconds a finished worker's leftover children may keep its output pipes open before they are killed.
PIPE_GRACE_SECONDS = 2.0
#: Lets PyTorch run the 3-D operations that Apple's MPS backend lacks on the CPU instead of failing.
MPS_FALLBACK_VARIABLE = "PYTORCH_ENABLE_MPS_FALLBACK"
_LIB_PARENT = Path(__file__).resolve().parents[2]
# Windows NTSTATUS exit codes of crashed processes.
_WINDOWS_CRASHES = {
    0xC0000005: "crashed (access violation)",
    0xC00000FD: "crashed (stack overflow)",
    0xC0000409: "crashed (fatal runtime error)",
    0xC0000017: "ran out of memory",
    0xC000012D: "ran out of memory (the page file is too small)",
}


# ---------------------------------------------------------------- interpreter, environment, threads


def python_executable(
    executable: str | None = sys.executable,
    platform: str = sys.platform,
    which: Callable[[str], str | None] = shutil.which,
    is_file: Callable[[Path], bool] = Path.is_file,
) -> str:
    """The Python interpreter for the child: this one, or Slicer's ``PythonSlicer`` launcher.

    Inside the Slicer application ``sys.executable`` is ``PythonSlicer`` — or the application itself
    (``SlicerApp-real``, ``Slicer.exe``), which would open a second Slicer, or an empty string (or
    None) when Slicer could not find its launcher. ``PythonSlicer`` sets up Slicer's libraries and
    runs plain Python; it sits next to the application (Linux, Windows), in ``Contents/bin`` (macOS),
    and on the PATH that Slicer's launcher sets. A WorkerError says what to do when it is nowhere.
    """
    here = Path(executable or "")
    if here.name.lower().startswith("python"):
        return str(executable)
    name = "PythonSlicer.exe" if platform == "win32" else "PythonSlicer"
    beside = (here.with_name(name), here.parent.parent / "bin" / name) if here.name else ()
    for candidate in beside:
        if is_file(candidate):
            return str(candidate)
    found = which("PythonSlicer")
    if found:
        return found
    where = f"next to the application ({executable})" if executable else "(Slicer names no Python executable)"
    raise WorkerError(
        f"Slicer's Python launcher (PythonSlicer) was not found {where} or on the PATH, so the segmentation "
        "cannot run in the background. Reinstall Slicer, or segment from the Python console with the "
        "logic's synchronous segment()."
    )


def worker_environment(base: Mapping[str, str], platform: str = sys.platform) -> dict[str, str]:
    """The child's environment: the parent's, with this package importable and unbuffered UTF-8 I/O.

    On macOS it also turns on PyTorch's CPU fallback for the 3-D operations Apple's GPU backend (MPS)
    lacks, so the network runs instead of failing (as the command line does); PyTorch reads it when it
    loads, hence here and not in the child. A value the user set is kept.
    """
    env = dict(base)
    paths = [str(_LIB_PARENT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    if platform == "darwin":
        env.setdefault(MPS_FALLBACK_VARIABLE, "1")
    return env


def default_worker_threads(cpu_count: int | None) -> int:
    """Torch CPU threads for the child when the caller names none: all cores but one, so Slicer's GUI
    keeps a core to stay responsive (at least one thread; one when the count is unknown)."""
    return max(1, (cpu_count or 1) - 1)


def usable_cpu_count() -> int | None:
    """CPUs this process may run on: the affinity mask (containers, ``taskset``) where there is one."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count()  # macOS and Windows have no affinity call


# ---------------------------------------------------------------- process helpers


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


def taskkill_command(pid: int) -> list[str]:
    """The Windows command that ends a process and every process it started (``/T``), at once (``/F``).

    The tree matters: the child may be the PythonSlicer launcher, and ending only the launcher would
    leave the real Python computing.
    """
    return ["taskkill", "/T", "/F", "/PID", str(pid)]


def kill_process_tree(process: subprocess.Popen) -> None:
    """End the child and everything it started, at once (its own process group / Windows process tree)."""
    if os.name == "nt":
        done = subprocess.run(taskkill_command(process.pid), capture_output=True, check=False,
                              creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))
        if done.returncode != 0 and process.poll() is None:
            process.kill()
        return
    try:  # even when the leader is gone, processes it started may still be in its group
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
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


def _new_process_group() -> dict[str, Any]:
    """Popen arguments that give the child its own process group, so a cancel reaches its children."""
    if os.name == "nt":
        flags = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        return {"creationflags": flags}
    return {"start_new_session": True}


# ---------------------------------------------------------------- the parent side


_NEW, _RUNNING, _DONE, _FAILED, _CANCELLED = "new", "running", "done", "failed", "cancelled"


class WorkerProcess:
    """One segmentation in a child process. Call :meth:`poll` from a timer, or :meth:`run` to wait.

    ``images`` are SimpleITK images (handed over as ``.npz``) or image file paths, one per card
    channel. ``threads`` sets the child's torch CPU threads; None leaves one core free
    (:func:`default_worker_threads`).
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
        self.python = python
        self.threads: int = default_worker_threads(usable_cpu_count()) if threads is None else threads
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
        self._confidence: sitk.Image | None = None
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
                [python, "-m", CHILD_MODULE, str(job)],
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
                confidence=self._confidence,
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
        return write_job(folder / "job.json", inputs, self.card, self.options, folder / "labelmap.npz",
                         self.threads)

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
                if self._result_event.data.get("confidence"):
                    self._confidence = load_image_npz(self._result_event.data["confidence"])
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
        if kind == KIND_OUT_OF_MEMORY:
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

"""The worker's parent side: segmentations in a separate Python process, with progress and a hard cancel.

Why a child process: the Slicer GUI must never freeze; Cancel must stop work that sits deep inside
PyTorch kernels (only ending the process does that, at once); and a crash or an out-of-memory kill
of the network must not take Slicer down with it. The child is the same Python that runs Slicer
(:func:`python_executable`), started as ``python -m SegMambaSlicerLib.run.worker_child``
(:mod:`.worker_child`), which then takes job file paths on its stdin; what they exchange, each job in a
private temporary folder that is deleted afterwards, is defined in :mod:`.worker_protocol`, whose public
names are re-exported here.

:class:`WorkerProcess` is one segmentation: in a process of its own (scripts), or in the long-lived
process of a :class:`WarmWorker` (the Slicer module), which keeps PyTorch imported and the last network
loaded between clicks. Neither blocks in :meth:`~WorkerProcess.poll`: two reader threads move the
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
    EVENT_JOB_DONE,
    EXIT_ORPHANED,
    JOB_VERSION,
    KIND_OUT_OF_MEMORY,
    WorkerCrashedError,
    WorkerError,
    WorkerEvent,
    WorkerOutOfMemoryError,
    format_job_line,
    load_image_npz,
    options_to_dict,
    parse_event,
    save_image_npz,
    write_job,
)

if TYPE_CHECKING:
    from ..engine.pipeline import SegmentationResult, SegmentOptions

__all__ = [
    "DEFAULT_IDLE_TIMEOUT", "EXIT_ORPHANED", "JOB_VERSION", "WarmWorker", "WorkerCrashedError", "WorkerError",
    "WorkerEvent", "WorkerOutOfMemoryError", "WorkerProcess", "default_worker_threads", "describe_exit",
    "kill_process_tree", "load_image_npz", "options_to_dict", "parse_event", "python_executable",
    "save_image_npz", "taskkill_command", "usable_cpu_count", "worker_environment",
]

STDERR_TAIL_LINES = 30
#: Seconds a warm worker waits for its next job before its process ends (the module's default: 10 minutes).
DEFAULT_IDLE_TIMEOUT = 600.0
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


# ---------------------------------------------------------------- one worker process


class _Child:
    """One running worker process: its pipes, the two threads that move its stdout events and stderr lines
    into a queue (so polling never blocks), and its last stderr lines for error messages. It outlives
    single jobs when a :class:`WarmWorker` keeps it."""

    def __init__(self, python: str) -> None:
        try:
            self.process = subprocess.Popen(
                [python, "-m", CHILD_MODULE],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                # not a job's folder: the process outlives it, and Windows cannot delete a working directory
                cwd=tempfile.gettempdir(), env=worker_environment(os.environ), text=True, encoding="utf-8",
                errors="replace", bufsize=1, **_new_process_group(),
            )
        except OSError as exc:
            raise WorkerError(f"Cannot start the segmentation worker with {python}: {exc}") from None
        self.events: queue.Queue[WorkerEvent] = queue.Queue()
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self._readers = [
            threading.Thread(target=self._read_events, args=(self.process.stdout,), daemon=True),
            threading.Thread(target=self._read_stderr, args=(self.process.stderr,), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    @property
    def drained(self) -> bool:
        """True once both pipes reached end of file, so every line the process wrote is in the queue."""
        return not any(reader.is_alive() for reader in self._readers)

    def send(self, job: Path) -> None:
        """Hand the process a job file; if it has just died, the job's poll reports how it ended."""
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(format_job_line(job))
            self.process.stdin.flush()
        except (OSError, ValueError):  # broken pipe, or stdin already closed
            pass

    def drain(self) -> Iterator[WorkerEvent]:
        while True:
            try:
                yield self.events.get_nowait()
            except queue.Empty:
                return

    def stop(self) -> None:
        """End the process and everything it started at once, reap it and close its pipes (idempotent).

        A process already reaped whose pipes are closed is not signalled: its process group id may have
        been given to other processes since.
        """
        if self.alive or not self.drained:
            kill_process_tree(self.process)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        for reader in self._readers:
            reader.join(timeout=2)
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass

    def _read_events(self, stream: IO[str]) -> None:
        for line in stream:
            self.events.put(parse_event(line))

    def _read_stderr(self, stream: IO[str]) -> None:
        for line in stream:
            text = line.rstrip("\r\n")
            self.stderr_tail.append(text)
            self.events.put(WorkerEvent("stderr", text))


# ---------------------------------------------------------------- one segmentation


_NEW, _RUNNING, _DONE, _FAILED, _CANCELLED = "new", "running", "done", "failed", "cancelled"


class WorkerProcess:
    """One segmentation in a worker process. Call :meth:`poll` from a timer, or :meth:`run` to wait.

    ``images`` are SimpleITK images (handed over as ``.npz``) or image file paths, one per card
    channel. ``threads`` sets the child's torch CPU threads; None leaves one core free
    (:func:`default_worker_threads`). On its own it starts a process for this one job and ends it
    afterwards (scripts); made by :meth:`WarmWorker.start` (``warm``), it runs in that worker's
    long-lived process instead. Either way its temporary files are deleted when it ends.
    """

    def __init__(
        self,
        images: Sequence[sitk.Image | str | os.PathLike[str]],
        card: ModelCard,
        options: SegmentOptions | None = None,
        python: str | None = None,
        threads: int | None = None,
        warm: WarmWorker | None = None,
    ) -> None:
        self.images, self.card, self.options = list(images), card, options
        self.python, self.warm = python, warm
        self.threads: int = default_worker_threads(usable_cpu_count()) if threads is None else threads
        self.folder: Path | None = None
        self.process: subprocess.Popen | None = None
        self._child: _Child | None = None
        self._state = _NEW
        self._result_event: WorkerEvent | None = None
        self._error_event: WorkerEvent | None = None
        self._error: SegMambaError | None = None
        self._labelmap: sitk.Image | None = None
        self._confidence: sitk.Image | None = None
        self._exited_at: float | None = None

    # -- lifecycle

    def start(self) -> None:
        """Write the job to a private temporary folder and hand it to a worker process (returns at once)."""
        if self._state != _NEW:
            raise WorkerError("This worker was already started; create a new one for another run.")
        self.folder = Path(tempfile.mkdtemp(prefix="segmamba-"))
        try:
            job = self._write_job(self.folder)
            if self.warm is not None:
                self._child = self.warm._acquire(self)
            else:
                self._child = _Child(self.python or python_executable())
        except BaseException:
            self._cleanup()
            raise
        self.process = self._child.process
        self._state = _RUNNING
        self._child.send(job)

    def poll(self) -> list[WorkerEvent]:
        """Events since the last call, without waiting; once the job has ended, the last is ``finished``."""
        if self._state != _RUNNING:
            return []
        assert self._child is not None
        exited = not self._child.alive
        drained = self._child.drained  # checked before draining: no line is lost
        if exited and not drained:
            self._exited_at = self._exited_at or time.monotonic()
            if time.monotonic() - self._exited_at > PIPE_GRACE_SECONDS:
                kill_process_tree(self._child.process)  # something the worker started still holds its pipes
        events, done = [], False
        for event in self._child.drain():
            if event.kind == EVENT_JOB_DONE:
                done = True
                continue
            if event.kind == "result":
                self._result_event = event
            elif event.kind == "error":
                self._error_event = event
            events.append(event)
        if done or (exited and drained):
            events.append(self._finish(done))
        return events

    @property
    def finished(self) -> bool:
        """True once the outcome is known: done, failed or cancelled."""
        return self._state in (_DONE, _FAILED, _CANCELLED)

    def cancel(self) -> None:
        """Kill the worker process and its process group now and delete the temporary files.

        Only ending the process stops work deep inside PyTorch at once; a warm worker starts a fresh
        process for its next job.
        """
        if self._state == _RUNNING:
            self._state = _CANCELLED
            self._hand_back(reusable=False)
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

    def _finish(self, done: bool) -> WorkerEvent:
        """The outcome, once the child ended the job (``done``) or ended itself."""
        assert self._child is not None
        reusable = False
        try:
            if self._result_event is not None:
                self._labelmap = load_image_npz(self._result_event.data["output"])
                if self._result_event.data.get("confidence"):
                    self._confidence = load_image_npz(self._result_event.data["confidence"])
                self._state, reusable = _DONE, done
                return WorkerEvent("finished", "Segmentation finished.")
            self._error = self._failure(None if done else self._child.process.wait())
            # after running out of memory a fresh process gives the memory back: do not keep this one
            self._state, reusable = _FAILED, done and not isinstance(self._error, WorkerOutOfMemoryError)
            return WorkerEvent("finished", str(self._error))
        finally:
            self._hand_back(reusable)
            self._cleanup()

    def _failure(self, returncode: int | None) -> SegMambaError:
        assert self._child is not None
        tail = "\n".join(self._child.stderr_tail)
        event = self._error_event
        if event is None:
            how = "ended the job" if returncode is None else describe_exit(returncode)
            return WorkerCrashedError(
                f"The segmentation worker {how} before it could report a result."
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

    def _hand_back(self, reusable: bool) -> None:
        """Give the process back to the warm worker (which keeps it or ends it), or end a one-job process."""
        assert self._child is not None
        if self.warm is not None:
            self.warm._job_ended(self._child, reusable)
        else:
            self._child.stop()

    def _cleanup(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


# ---------------------------------------------------------------- the warm worker


class WarmWorker:
    """A worker process kept alive between segmentations, with PyTorch imported and the last network loaded.

    Why: a fresh process pays seconds of imports, network loading and first-touch memory faults before
    its first window, and Slicer users click Segment again and again on the same model. The child keeps
    the network of its last job and reuses it when the next job's card, weights, folds, device and scan
    backend are the same (its ``network`` event says which). One job runs at a time. A process that
    crashed, was killed or was cancelled (cancel ends the process, as for a one-job worker) is replaced
    by a fresh one on the next job. The process ends ``idle_timeout`` seconds after its last job (0: right
    after each job), on :meth:`release`, and by itself when this process dies (its stdin closes).
    """

    def __init__(self, python: str | None = None, idle_timeout: float = DEFAULT_IDLE_TIMEOUT) -> None:
        self.python = python
        self.idle_timeout = idle_timeout
        self._lock = threading.Lock()  # the idle timer ends the process from its own thread
        self._child: _Child | None = None
        self._job: WorkerProcess | None = None
        self._timer: threading.Timer | None = None

    def start(
        self,
        images: Sequence[sitk.Image | str | os.PathLike[str]],
        card: ModelCard,
        options: SegmentOptions | None = None,
        threads: int | None = None,
    ) -> WorkerProcess:
        """Start one segmentation in the warm process (a fresh one when there is none) and return at once."""
        job = WorkerProcess(images, card, options, self.python, threads, warm=self)
        job.start()
        return job

    @property
    def pid(self) -> int | None:
        """The id of the warm process, or None when none is alive (the next job starts one)."""
        with self._lock:
            return self._child.process.pid if self._child is not None and self._child.alive else None

    def release(self) -> None:
        """End the process now, cancelling a job it runs, so that the memory its PyTorch and network hold
        goes back to the system; the next job starts a fresh process."""
        with self._lock:
            job = self._job
        if job is not None:
            job.cancel()  # hands the process back unusable: it is ended
        with self._lock:
            self._cancel_timer()
            child, self._child = self._child, None
        if child is not None:
            child.stop()

    # -- called by WorkerProcess

    def _acquire(self, job: WorkerProcess) -> _Child:
        """The process for ``job``: the warm one, or a fresh one when there is none or it died."""
        with self._lock:
            if self._job is not None:
                raise WorkerError("The worker is busy with another segmentation; wait for it or cancel it.")
            self._cancel_timer()
            if self._child is not None and not self._child.alive:  # crashed or killed since its last job
                self._child.stop()
                self._child = None
            if self._child is None:
                self._child = _Child(self.python or python_executable())
            self._job = job
            return self._child

    def _job_ended(self, child: _Child, reusable: bool) -> None:
        """Keep the job's process warm until the idle timeout, or end it (cancelled, crashed, no memory)."""
        with self._lock:
            self._job = None
            if reusable and child is self._child and child.alive:
                self._timer = threading.Timer(max(0.0, self.idle_timeout), self._expire, args=(child,))
                self._timer.daemon = True  # a pending timer must not keep Slicer or a script from exiting
                self._timer.start()
                return
            if child is self._child:
                self._child = None
        child.stop()

    def _expire(self, child: _Child) -> None:
        """The idle timeout passed: end the process unless a new job took it meanwhile."""
        with self._lock:
            if child is not self._child or self._job is not None:
                return
            self._child, self._timer = None, None
        child.stop()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

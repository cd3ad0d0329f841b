"""The Ray engine of :func:`.batch.segment_folder`: one cohort spread over the GPUs or CPUs of a Ray cluster.

Why Ray: it is the standard engine for distributed batch inference with GPU-aware scheduling, so a cohort
that takes days on one machine is spread over a cluster without our own cluster code. What stays ours is
what the local engine does too, reused rather than copied: :func:`.batch.run_case` segments and writes each
case (atomic outputs, per-case isolation), the driver's runner keeps the summary CSV and the progress, and
finished cases are skipped before Ray is even started.

Design: long-lived actors, one per GPU (``num_gpus=1``) or per CPU slot, each loading the network once and
segmenting many cases; the driver hands out cases one at a time, so a slow case never stalls the others.
By default only case ids and file paths travel: inputs are read and outputs written where they are, so every
node must see the input and output folders (and the weights) at the same paths. With ``ship_inputs`` the
driver reads each case instead and sends its voxels and geometry (:class:`Volume`, plain arrays: no user
file is unpickled anywhere) through Ray's object store; the actor sends the label map back and the driver
writes every output with the local engine's writer (:func:`.batch.write_case`). An actor that dies
mid-case is restarted by Ray and its case is retried up to :data:`CASE_ATTEMPTS` times, then reported
failed with the cause. Ray is imported only here and only on use: importing :mod:`.batch` or running a
local batch never imports it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import os
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import SimpleITK as sitk

from ..errors import CancelCallback, CancelledError, ProgressCallback, SegMambaError
from ..io.atomic import OutputError
from ..io.images import read_image, resolve_inputs
from ..models.cards import ModelCard
from .cases import BatchError, Case

if TYPE_CHECKING:  # batch imports this module on use; at run time its functions are handed in
    from types import ModuleType

    from torch import nn

    from ..engine.pipeline import SegmentationResult
    from .batch import CaseResult, _Job

log = logging.getLogger(__name__)

#: Tries per case when its actor dies (killed, out of memory, node lost): the first and two retries.
CASE_ATTEMPTS = 3
#: Threads (and Ray CPUs) per CPU actor, unless ``SEGMAMBA_RAY_CPUS_PER_ACTOR`` says otherwise: enough for
#: torch to use several cores, few enough that a many-core node runs several cases at once.
DEFAULT_CPUS_PER_ACTOR = 4
CPUS_PER_ACTOR_ENV = "SEGMAMBA_RAY_CPUS_PER_ACTOR"
#: Object store of a local Ray instance: only paths and results travel, so a small one leaves the RAM
#: (and /dev/shm) to the actors instead of Ray's default of 30 % of the memory.
LOCAL_OBJECT_STORE_BYTES = 256 * 1024**2
#: Seconds to wait for a Ray address to accept a connection (Ray itself retries for minutes).
CONNECT_TIMEOUT_S = 5.0
#: Seconds between looks at the cancel callback and the actors' progress.
_POLL_SECONDS = 0.5
#: Seconds an actor may take to come back after it died (Ray restarts it, on another node if its own is lost)
#: before it is given up.
RESTART_TIMEOUT_S = 600.0
#: Seconds that cancelled actors get to stop at their next sliding window before they are killed.
_STOP_GRACE_S = 10.0
#: Tests set this to a function called in the actor with each case id and the actor's "cancelled?" before
#: the case is segmented (to make a case slow or crash its process); it is shipped to the actors when they
#: are created.
FAULT_HOOK: Callable[[str, CancelCallback], None] | None = None

CaseRunner = Callable[["_Job", Case, "nn.Module | None", "ProgressCallback | None", "CancelCallback | None"],
                      "CaseResult"]


@dataclass(frozen=True)
class CaseSteps:
    """The local engine's steps for one case (run/batch.py), handed in so that both engines segment and write
    alike and this module needs :mod:`.batch` only when it runs."""

    #: Segment a case and write its outputs (in an actor that shares the storage).
    run: CaseRunner
    #: The checks before the network; returns the DICOM series a SEG references (in the driver when shipping).
    prepare: Callable[[_Job, Case], tuple[object, ...] | None]
    #: Write a segmented case's outputs, ``(job, case, result, source, start) -> CaseResult``.
    write: Callable[[_Job, Case, SegmentationResult, tuple[object, ...] | None, float], CaseResult]
    #: The failed result of a case that raised, ``(case_id, start, exception)``.
    failure: Callable[[str, float, Exception], CaseResult]
    #: The failed result of a case that could not be segmented, ``(case_id, why)``.
    failed: Callable[[str, str], CaseResult]


class Runner(Protocol):
    """What the engine needs of :class:`.batch._Runner`: the job, finishing a case, per-case progress."""

    job: _Job

    def finish(self, result: CaseResult, write: bool = True) -> None: ...

    def case_progress(self, case_id: str) -> ProgressCallback: ...


# ---------------------------------------------------------------- connecting


def import_ray() -> ModuleType:
    """Ray, or a :class:`BatchError` saying how to install it (it is the optional ``cluster`` extra)."""
    try:
        import ray
    except ImportError:
        raise BatchError("The Ray engine needs Ray: pip install 'segmamba-slicer[cluster]'.") from None
    return ray


def check_address(address: str | None) -> None:
    """Fail within seconds, with one line, when Ray is missing or ``address`` does not accept connections.

    Ray itself keeps retrying an address that does not answer for minutes; a TCP connection to the head's
    port tells the same in :data:`CONNECT_TIMEOUT_S`. ``auto`` and ``local`` are left to Ray, which
    answers at once.
    """
    import_ray()
    if address is None or address in ("auto", "local"):
        return
    host, port = _host_port(address)
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise BatchError(f"No Ray cluster answers at {address} ({reason}); start it or check the address "
                         "(ray://HEAD:10001 for Ray Client, HEAD:6379 on a cluster node).") from None


def _host_port(address: str) -> tuple[str, int]:
    """Host and port of a Ray address: ``ray://host:port`` (port 10001 if absent) or ``host:port`` (6379)."""
    client = address.startswith("ray://")
    rest = address[len("ray://"):] if client else address
    host, _, port = rest.rpartition(":") if ":" in rest else (rest, "", "")
    try:
        return host.strip("[]") or "127.0.0.1", int(port) if port else (10001 if client else 6379)
    except ValueError:
        raise BatchError(f"{address!r} is not a Ray address; use ray://HOST:PORT, HOST:PORT or auto.") from None


@contextlib.contextmanager
def ray_connection(address: str | None) -> Iterator[None]:
    """Be connected to Ray while inside; leave the cluster as it was afterwards.

    Without ``address`` a local instance is started (:func:`start_local_ray`) and shut down on exit; with
    one, this process joins that cluster and only disconnects on exit. A process already connected (e.g. a
    notebook that called ``ray.init``) keeps its connection, and ``address`` is then not used.
    """
    ray = import_ray()
    if ray.is_initialized():
        yield
        return
    if address is None or address == "local":
        start_local_ray()
    else:
        _join(ray, address)
    try:
        yield
    finally:
        ray.shutdown()


def _join(ray: ModuleType, address: str) -> None:
    """Join the cluster at ``address``; its refusals (version mismatch, no Ray Client, token) become one line.

    A cluster with token authentication (Ray's default for clusters started where a token exists) refuses
    a driver without its token as a connection that fails after Ray's retries, so the line says what to set.
    """
    try:
        ray.init(address=address, configure_logging=False, namespace="segmamba")
    except ray.exceptions.AuthenticationError as exc:
        raise BatchError(f"Cannot join the Ray cluster at {address}: {_one_line(exc)}; give this computer the "
                         "cluster's token (RAY_AUTH_TOKEN or ~/.ray/auth_token).") from None
    except (ConnectionError, ValueError, RuntimeError) as exc:
        hint = (" If the cluster uses token authentication, set RAY_AUTH_MODE=token and its token "
                "(RAY_AUTH_TOKEN or ~/.ray/auth_token)." if "Failed to connect" in str(exc) else "")
        raise BatchError(f"Cannot join the Ray cluster at {address}: {_one_line(exc)}{hint}") from None


def start_local_ray(num_cpus: int | None = None, object_store_bytes: int = LOCAL_OBJECT_STORE_BYTES) -> str:
    """Start Ray in this process, sized to this machine and reachable on 127.0.0.1 only; return its address.

    Ray resolves 127.0.0.1 to the machine's network address so that other nodes can join; a one-machine
    instance has no other nodes, and listening on the network would expose it, so its cluster mode is off
    while it starts (Ray's own setting for laptops, ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``). Usage
    statistics are not sent (``RAY_USAGE_STATS_ENABLED=0``, unless the environment says otherwise).
    """
    ray = import_ray()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with _loopback_only():
        context = ray.init(num_cpus=num_cpus or os.cpu_count() or 1, object_store_memory=object_store_bytes,
                           include_dashboard=False, _node_ip_address="127.0.0.1", configure_logging=False,
                           namespace="segmamba")
    return str(context.address_info["address"])


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """Ray's single-machine mode (loopback addresses) while inside, for this process and the ones it starts."""
    from ray._private import ray_constants

    name = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    before_env, before_flag = os.environ.get(name), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[name], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before_flag
        if before_env is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before_env


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """A Ray error as one line for the terminal and the summary: colours removed, whitespace collapsed."""
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------- sizing


@dataclass(frozen=True)
class ActorPlan:
    """How many actors to start and what each reserves: Ray's CPUs and GPUs, torch threads, the device."""

    count: int
    num_cpus: float
    num_gpus: float
    threads: int
    device: str


def plan_actors(device: str, nodes: Sequence[dict[str, float]], cases: int, cpus_per_actor: int) -> ActorPlan:
    """One actor per GPU when the cluster has GPUs and ``device`` allows them, else one per CPU slot.

    ``nodes`` are the alive nodes' resources (``{"CPU": 32.0, "GPU": 4.0}``). A GPU actor reserves one
    CPU for its reading and writing and uses its node's CPUs per GPU as torch threads; a CPU actor reserves
    ``cpus_per_actor`` CPUs (fewer on nodes that have fewer) and uses as many threads. Never more actors
    than cases.
    """
    name = device.strip().lower()
    if name not in ("auto", "cpu", "cuda"):
        raise BatchError(f"With the Ray engine the device is auto, cpu or cuda (Ray assigns the GPUs); got {device!r}.")
    gpu_nodes = [n for n in nodes if n.get("GPU", 0) >= 1]
    if name == "cuda" and not gpu_nodes:
        raise BatchError("The Ray cluster has no GPU; use --device cpu or auto.")
    if name != "cpu" and gpu_nodes:
        gpus = sum(int(n["GPU"]) for n in gpu_nodes)
        threads = min(max(1, int(n.get("CPU", 1) // n["GPU"])) for n in gpu_nodes)
        return ActorPlan(max(1, min(gpus, cases)), 1, 1, threads, "cuda")
    largest = max((int(n.get("CPU", 0)) for n in nodes), default=0)
    if largest < 1:
        raise BatchError("The Ray cluster has no CPU to run actors on.")
    per_actor = max(1, min(cpus_per_actor, largest))
    slots = sum(int(n.get("CPU", 0)) // per_actor for n in nodes)
    return ActorPlan(max(1, min(slots, cases)), per_actor, 0, per_actor, "cpu")


def cpus_per_actor() -> int:
    """Threads per CPU actor: ``SEGMAMBA_RAY_CPUS_PER_ACTOR`` if set, else :data:`DEFAULT_CPUS_PER_ACTOR`."""
    value = os.environ.get(CPUS_PER_ACTOR_ENV, "").strip()
    if not value:
        return DEFAULT_CPUS_PER_ACTOR
    if not value.isdigit() or int(value) < 1:
        raise BatchError(f"{CPUS_PER_ACTOR_ENV} must be a whole number of CPUs of at least 1; got {value!r}.")
    return int(value)


# ---------------------------------------------------------------- shipping cases


@dataclass(frozen=True)
class Volume:
    """An image as plain data for Ray's object store: voxels in SimpleITK's (k, j, i) order and the geometry.

    Only a numpy array and numbers travel, never a pickled SimpleITK object or user file; SimpleITK's
    metadata dictionary (file header fields) stays behind, since the pipeline uses the grid alone.
    """

    voxels: np.ndarray
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image, narrow: bool = False) -> Volume:
        """The image's voxels and grid; ``narrow``: as 16-bit integers when that holds every value exactly
        (scanners store 12-16-bit integers, which the reader widens to float32: half the bytes to send)."""
        voxels = sitk.GetArrayFromImage(image)
        if narrow:
            voxels = _narrowed(voxels)
        return cls(voxels, tuple(image.GetSpacing()), tuple(image.GetOrigin()), tuple(image.GetDirection()))

    def image(self) -> sitk.Image:
        """The SimpleITK image again, with the same voxel values and grid."""
        image = sitk.GetImageFromArray(np.ascontiguousarray(self.voxels))
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image


def _narrowed(voxels: np.ndarray) -> np.ndarray:
    """``voxels`` as int16 or uint16 when that type holds every value exactly, else unchanged."""
    if not np.issubdtype(voxels.dtype, np.floating) or voxels.size == 0:
        return voxels
    low, high = float(voxels.min()), float(voxels.max())  # NaN or infinity compare False below
    for dtype in (np.int16, np.uint16):
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            narrow = voxels.astype(dtype)
            if np.array_equal(narrow, voxels):
                return narrow
    return voxels


def read_case_images(case: Case, card: ModelCard) -> list[sitk.Image]:
    """The case's images, one per card channel, read and checked as the pipeline reads them (same errors)."""
    sources = resolve_inputs(list(case.inputs), card)
    return [read_image(source, name=channel.display_name) for source, channel in zip(sources, card.channels)]


@dataclass(frozen=True)
class Segmented:
    """What an actor sends back for a shipped case: the label map, its confidence if asked, the run's facts."""

    labelmap: Volume
    confidence: Volume | None
    device: str
    windows: int
    volumes: dict[str, float]
    warnings: tuple[str, ...]

    @classmethod
    def of(cls, result: SegmentationResult) -> Segmented:
        confidence = None if result.confidence is None else Volume.of(result.confidence)
        return cls(Volume.of(result.labelmap), confidence, result.device, result.windows, dict(result.volumes),
                   tuple(result.warnings))

    def result(self, card: ModelCard) -> SegmentationResult:
        """The pipeline's result again, for the driver's writer."""
        from ..engine.pipeline import SegmentationResult

        confidence = None if self.confidence is None else self.confidence.image()
        return SegmentationResult(labelmap=self.labelmap.image(), card=card, device=self.device, seconds=0.0,
                                  windows=self.windows, volumes=self.volumes, warnings=self.warnings,
                                  confidence=confidence)


@dataclass(frozen=True)
class _Shipment:
    """A case the driver has read for an actor: its images in the object store, what its SEG references,
    how long reading took; or its failed result when it could not be read."""

    case: Case
    reading_s: float
    inputs: Any = None  # the ObjectRef of a tuple of Volume
    source: tuple[object, ...] | None = None
    failed: CaseResult | None = None
    #: When the case began, as the local engine counts it: reading, then segmenting as soon as it is handed
    #: out (the time it waited, read ahead, for a free actor is not the case's).
    start: float = 0.0


# ---------------------------------------------------------------- the actor


class CaseActor:
    """One long-lived Ray actor: loads the network once, then segments the cases the driver hands it.

    Runs two threads (Ray's ``max_concurrency=2``): one segments, the other answers :meth:`status` and
    :meth:`stop`, so the driver can show progress and cancel at the next sliding window. A failure to load
    the model is kept in ``fatal`` (reported by :meth:`ready`), not raised, so Ray does not restart it in vain.
    """

    def __init__(self, job: _Job, plan: ActorPlan, steps: CaseSteps,
                 fault_hook: Callable[[str, CancelCallback], None] | None) -> None:
        import torch

        from ..engine.devices import resolve_device
        from ..engine.inference import kept_cpu_memory
        from ..engine.pipeline import load_network

        torch.set_num_threads(plan.threads)
        self.job = dataclasses.replace(job, options=dataclasses.replace(job.options, device=plan.device))
        self.steps, self.fault_hook = steps, fault_hook
        self.where = f"{plan.device} on {socket.gethostname()}"
        self.cancelled = threading.Event()
        self.state: tuple[str, float, str] = ("", 0.0, "")
        self.fatal = ""
        self.memory = contextlib.ExitStack()  # kept for the actor's life: as the local engine does per cohort
        self.memory.enter_context(kept_cpu_memory(self.job.options.low_memory))
        self.network: nn.Module | None = None
        try:
            options = self.job.options
            self.network = load_network(job.card, options.weights, resolve_device(plan.device), options.folds)
        except SegMambaError as exc:
            self.fatal = f"{self.where}: {exc}"

    def ready(self, probe: Path | None) -> str:
        """Empty when this actor can segment, else why not (model not loaded, folders not shared with it).

        ``probe`` is a path the actor must see (the first case's first input), None when the driver ships the
        cases: then the actor needs none of the driver's folders.
        """
        if self.fatal:
            return self.fatal
        for path in (self.job.output_dir, probe) if probe is not None else ():
            if not path.exists():
                return (f"{self.where} cannot see {path}: the input and output folders must be on storage "
                        "that every node mounts at the same path, or let this computer read and write every "
                        "case (--ship-inputs, ship_inputs=True)")
        return ""

    def segment(self, case: Case) -> CaseResult:
        """Segment one case and write its outputs (:func:`.batch.run_case`); raises if this actor is unusable."""
        report = self._begin(case.case_id)
        return self.steps.run(self.job, case, self.network, report, self.cancelled.is_set)

    def segment_shipped(self, case_id: str, inputs: Sequence[Volume]) -> Segmented | CaseResult:
        """Segment a case the driver read and sent; the label map goes back, nothing is read or written here.

        A case that cannot be segmented is a failed result, as in :func:`.batch.run_case`; cancel propagates.
        """
        from ..engine.pipeline import segment

        report = self._begin(case_id)
        start = time.perf_counter()
        try:
            result = segment([volume.image() for volume in inputs], self.job.card, self.job.options, report,
                             self.cancelled.is_set, self.network)
        except CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - one broken case must not stop a cohort (see case_failed)
            return self.steps.failure(case_id, start, exc)
        return Segmented.of(result)

    def _begin(self, case_id: str) -> ProgressCallback:
        """Start a case: refuse if this actor is unusable, run the tests' hook; the case's progress callback."""
        if self.fatal:
            raise BatchError(self.fatal)
        if self.fault_hook is not None:
            self.fault_hook(case_id, self.cancelled.is_set)

        def report(fraction: float, message: str) -> None:
            self.state = (case_id, fraction, message)

        self.state = (case_id, 0.0, "starting")
        return report

    def status(self) -> tuple[str, float, str]:
        """The case being segmented, its fraction done and what the pipeline is doing."""
        return self.state

    def stop(self) -> None:
        """Make the running case stop at its next sliding window (it raises CancelledError, writes nothing)."""
        self.cancelled.set()


@functools.cache
def _remote_actor_class() -> Any:
    """:class:`CaseActor` as a Ray actor class, made once per process and only when Ray is used."""
    return import_ray().remote(CaseActor)


# ---------------------------------------------------------------- the driver


def run_on_ray(runner: Runner, todo: Sequence[Case], address: str | None, cancel: CancelCallback | None,
               steps: CaseSteps, ship_inputs: bool = False) -> None:
    """Segment ``todo`` on the Ray cluster at ``address`` (a local instance when None), results to ``runner``.

    ``steps`` are the local engine's per-case steps. ``ship_inputs``: this process reads each case and sends
    its images to the actors, which send the label maps back to be written here (for a cluster that does
    not share the storage); otherwise the actors read and write the files themselves. Raises
    :class:`CancelledError` when ``cancel()`` says so (running cases stop at their next window and write
    nothing), :class:`OutputError` when the outputs cannot be written, :class:`BatchError` when no actor can
    segment.
    """
    if not todo:
        return
    ray = import_ray()
    job = _shared_job(runner.job)
    with ray_connection(address):
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        plan = plan_actors(runner.job.options.device, nodes, len(todo), cpus_per_actor())
        log.info("Ray engine: %d actor(s) of %g CPU / %g GPU on %d node(s)%s", plan.count, plan.num_cpus,
                 plan.num_gpus, len(nodes), ", cases shipped from this computer" if ship_inputs else "")
        actor_class = _remote_actor_class().options(
            num_cpus=plan.num_cpus, num_gpus=plan.num_gpus, max_restarts=-1, max_task_retries=0,
            max_concurrency=2)
        actors = [actor_class.remote(job, plan, steps, FAULT_HOOK) for _ in range(plan.count)]
        cases = list(todo) if ship_inputs else [_shared_case(c) for c in todo]
        scheduler = _Scheduler(ray, runner, actors, cases, steps, ship_inputs)
        try:
            scheduler.run(cancel)
        finally:
            scheduler.stop()


def _shared_job(job: _Job) -> _Job:
    """The job with absolute paths, since the actors' working folders differ from the driver's."""
    options = job.options
    weights = options.weights
    if weights is not None and Path(weights).expanduser().exists():
        options = dataclasses.replace(options, weights=Path(weights).expanduser().absolute())
    return dataclasses.replace(job, output_dir=job.output_dir.absolute(), options=options)


def _shared_case(case: Case) -> Case:
    """The case with absolute input paths, for the same reason as :func:`_shared_job`."""
    return dataclasses.replace(case, inputs=tuple(p.absolute() for p in case.inputs))


class _Scheduler:
    """Hands out cases to idle actors, collects results, retries cases of actors that died, shows progress.

    Cases are handed out one per actor at a time (no queue per actor), so a slow case or a slow node takes
    fewer cases. An actor that dies mid-case is restarted by Ray (``max_restarts=-1``) and its case goes
    back to the front of the queue until it has had :data:`CASE_ATTEMPTS` tries (Ray refuses calls while an
    actor restarts, so it gets a case again only once it answers :meth:`CaseActor.ready`); the bound is per case, not
    per actor, so a long cohort with a few crashing cases keeps all its actors. An actor is given up when
    Ray cannot restart it, or when it lost :data:`CASE_ATTEMPTS` different cases in a row (a broken GPU or
    node that fails fast would otherwise take, and fail, a large share of the cohort).

    When shipping (``ship``), a reader thread reads up to one case per actor ahead while the actors segment,
    so that an actor that finishes finds its next case in the object store; the label maps that come back
    are written in this thread, one case at a time, as the summary is.
    """

    def __init__(self, ray: ModuleType, runner: Runner, actors: list[Any], todo: list[Case], steps: CaseSteps,
                 ship: bool = False) -> None:
        self.ray, self.runner, self.actors, self.steps, self.ship = ray, runner, actors, steps, ship
        self.queue: deque[Case] = deque(todo)
        # a path every actor must see, unless the cases are shipped
        self.probe = None if ship else todo[0].inputs[0] if todo[0].inputs else runner.job.output_dir
        self.starting = {actor.ready.remote(self.probe): i for i, actor in enumerate(actors)}
        self.restarting: dict[int, float] = {}  # actor -> when to ask it again whether it is ready
        self.down_since: dict[int, float] = {}
        self.idle: list[int] = []
        self.busy: dict[Any, tuple[int, Case]] = {}
        self.status: dict[int, Any] = {}
        self.attempts: dict[str, int] = {}
        self.losses: dict[int, set[str]] = {}
        self.unusable: dict[int, str] = {}
        self.failures = 0
        self.last_poll = 0.0
        self.reader = concurrent.futures.ThreadPoolExecutor(1, "segmamba-ship") if ship else None
        self.reading: deque[concurrent.futures.Future[_Shipment]] = deque()  # read ahead, in queue order
        self.shipped: dict[str, _Shipment] = {}  # cases in the actors, by id

    def run(self, cancel: CancelCallback | None) -> None:
        """Until every case has a result: hand out cases, wait for the next result, poll progress."""
        while self.queue or self.reading or self.busy:
            if cancel is not None and cancel():
                raise CancelledError("Batch cancelled.")
            self._ask_restarted()
            self._hand_out()
            waiting_for = [*self.busy, *self.starting]
            if not waiting_for:
                if not self.restarting and not self.idle:
                    self._give_up()
                if self.reading:  # idle actors wait for the reader
                    concurrent.futures.wait([self.reading[0]], timeout=_POLL_SECONDS)
                else:
                    time.sleep(_POLL_SECONDS)
                continue
            timeout = _POLL_SECONDS / 10 if self.idle and self.reading else _POLL_SECONDS
            ready, _ = self.ray.wait(waiting_for, num_returns=1, timeout=timeout)
            for ref in ready:
                if ref in self.starting:
                    self._started(ref)
                else:
                    self._ended(ref)
            self._poll_progress()

    def _hand_out(self) -> None:
        if not self.ship:
            while self.queue and self.idle:
                self._send(self.queue.popleft(), None)
            return
        self._read_ahead()
        while self.idle and self.reading and self.reading[0].done():
            shipment = self.reading.popleft().result()
            if shipment.failed is not None:  # unreadable: failed here, as the local engine fails it
                self._finish(shipment.failed)
            else:
                self._send(shipment.case, shipment)
            self._read_ahead()

    def _send(self, case: Case, shipment: _Shipment | None) -> None:
        """Give ``case`` to the first idle actor: its paths, or the images the driver read."""
        index = self.idle.pop(0)
        actor = self.actors[index]
        if shipment is None:
            ref = actor.segment.remote(case)
        else:
            ref = actor.segment_shipped.remote(case.case_id, shipment.inputs)
            self.shipped[case.case_id] = dataclasses.replace(shipment, start=time.perf_counter() - shipment.reading_s)
        self.busy[ref] = (index, case)
        self.runner.case_progress(case.case_id)(0.0, self._counts("started"))

    def _read_ahead(self) -> None:
        """Keep one case per actor being read or read, so that no actor waits for the disk."""
        ahead = max(1, len(self.actors) - len(self.unusable))
        while self.reader is not None and self.queue and len(self.reading) < ahead:
            self.reading.append(self.reader.submit(self._read, self.queue.popleft()))

    def _read(self, case: Case) -> _Shipment:
        """In the reader thread: check and read one case, put its images in the object store."""
        start = time.perf_counter()
        try:
            source = self.steps.prepare(self.runner.job, case)
            volumes = tuple(Volume.of(image, narrow=True) for image in read_case_images(case, self.runner.job.card))
        except Exception as exc:  # noqa: BLE001 - one unreadable case must not stop a cohort
            return _Shipment(case, 0.0, failed=self.steps.failure(case.case_id, start, exc))
        try:
            inputs = self.ray.put(volumes)
        except self.ray.exceptions.RayError as exc:
            megabytes = sum(v.voxels.nbytes for v in volumes) / 1e6
            return _Shipment(case, 0.0, failed=self.steps.failed(
                case.case_id, f"its images ({megabytes:.0f} MB) could not be sent through Ray's object store: "
                f"{_one_line(exc)}"))
        return _Shipment(case, time.perf_counter() - start, inputs, source)

    def _ask_restarted(self) -> None:
        """Ask the actors that are restarting, when their time has come, whether they are ready again."""
        now = time.monotonic()
        for index, when in list(self.restarting.items()):
            if when <= now:
                del self.restarting[index]
                self.starting[self.actors[index].ready.remote(self.probe)] = index

    def _started(self, ref: Any) -> None:
        """An actor answered :meth:`CaseActor.ready`: idle if usable; Ray missing our package is fatal."""
        index = self.starting.pop(ref)
        try:
            problem = self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:
            if _missing_package(exc):
                raise BatchError(
                    f"The Ray workers cannot import SegMambaSlicerLib or what it needs ({_missing_module(exc)}); "
                    "install the same segmamba-slicer version on every node: pip install "
                    "'segmamba-slicer[cluster]'.") from None
            if self._still_restarting(index, exc):
                return
            problem = _one_line(exc)
        if problem:
            log.error("Ray actor %d is not used: %s", index, problem)
            self.unusable[index] = problem
            self.ray.kill(self.actors[index], no_restart=True)
        else:
            self.down_since.pop(index, None)
            self.idle.append(index)

    def _still_restarting(self, index: int, exc: BaseException) -> bool:
        """Whether ``exc`` only says that the actor is coming back; if so, ask again shortly.

        An actor that does not come back within :data:`RESTART_TIMEOUT_S` is not waited for any longer.
        """
        if not isinstance(exc, self.ray.exceptions.RayActorError) or isinstance(exc, self.ray.exceptions.ActorDiedError):
            return False
        now = time.monotonic()
        if now - self.down_since.setdefault(index, now) > RESTART_TIMEOUT_S:
            return False
        self.restarting[index] = now + _POLL_SECONDS
        return True

    def _ended(self, ref: Any) -> None:
        """A case's call returned: record its result, or retry it when its actor died or raised."""
        index, case = self.busy.pop(ref)
        try:
            result = self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(exc.cause, BaseException) else exc
            if isinstance(cause, OutputError):  # the disk is full or the folder went away: no case can be written
                raise OutputError(str(cause)) from None
            self._lost(index, case, f"{type(cause).__name__}: {_one_line(cause)}", restarts=True)
            return
        except self.ray.exceptions.RayActorError as exc:
            restarts = not isinstance(exc, self.ray.exceptions.ActorDiedError)  # Died: dead for good
            self._lost(index, case, f"its Ray actor died ({_one_line(exc, 200)})", restarts)
            return
        self.losses.pop(index, None)
        self.idle.append(index)
        self._record(case, result)

    def _record(self, case: Case, result: CaseResult | Segmented) -> None:
        """Finish a case with the result its actor returned, its output path in the caller's form; a shipped
        case's label map is written here first."""
        shipment = self.shipped.pop(case.case_id, None)
        if isinstance(result, Segmented):
            assert shipment is not None
            job = self.runner.job
            result = self.steps.write(job, shipment.case, result.result(job.card), shipment.source, shipment.start)
        output = result.output and self.runner.job.output_dir / result.output.name
        self._finish(dataclasses.replace(result, output=output))

    def _lost(self, index: int, case: Case, cause: str, restarts: bool) -> None:
        """A case's actor died or raised: retry the case first, or fail it after :data:`CASE_ATTEMPTS` tries.

        ``restarts``: whether Ray restarts the actor (else it is given up with the case's cause). A shipped
        case is read again for its next try.
        """
        self.shipped.pop(case.case_id, None)
        tries = self.attempts[case.case_id] = self.attempts.get(case.case_id, 0) + 1
        lost = self.losses.setdefault(index, set())
        lost.add(case.case_id)
        log.warning("%s: try %d of %d lost: %s", case.case_id, tries, CASE_ATTEMPTS, cause)
        if tries >= CASE_ATTEMPTS:
            self._finish(self.steps.failed(case.case_id, f"not segmented after {tries} tries; last: {cause}"))
        else:
            self.queue.appendleft(case)
        self.status.pop(index, None)
        if not restarts or len(lost) >= CASE_ATTEMPTS:
            self.unusable[index] = cause if not restarts else f"lost {len(lost)} cases in a row; last: {cause}"
            self.ray.kill(self.actors[index], no_restart=True)
        else:  # Ray restarts it: ask it whether it is ready before it gets the next case
            self.down_since.setdefault(index, time.monotonic())
            self.restarting[index] = time.monotonic()

    def _finish(self, result: CaseResult) -> None:
        self.failures += result.status == "failed"
        self.runner.finish(result)

    def _give_up(self) -> None:
        """Every actor is unusable: the cases left are failed and the batch ends with the reasons."""
        reason = "; ".join(dict.fromkeys(self.unusable.values())) or "no Ray actor could start"
        read = [future.result() for future in self.reading]  # a case that failed to read keeps its reason
        left = [s.failed or self.steps.failed(s.case.case_id, f"not segmented: {reason}") for s in read]
        left += [self.steps.failed(case.case_id, f"not segmented: {reason}") for case in self.queue]
        self.reading.clear()
        self.queue.clear()
        for result in left:
            self._finish(result)
        raise BatchError(f"No Ray actor can segment: {reason}")

    def _poll_progress(self) -> None:
        """Ask each busy actor where its case is (one question at a time), and pass the answers on."""
        now = time.monotonic()
        if now - self.last_poll < _POLL_SECONDS:
            return
        self.last_poll = now
        answered: list[Any] = []
        if self.status:
            answered, _ = self.ray.wait(list(self.status.values()), num_returns=len(self.status), timeout=0)
        for index, ref in list(self.status.items()):
            if ref not in answered:
                continue
            del self.status[index]
            with contextlib.suppress(self.ray.exceptions.RayError):
                case_id, fraction, message = self.ray.get(ref)
                if case_id and any(case.case_id == case_id for i, case in self.busy.values() if i == index):
                    self.runner.case_progress(case_id)(fraction, self._counts(message))
        for index, _ in self.busy.values():
            if index not in self.status:
                self.status[index] = self.actors[index].status.remote()

    def _counts(self, message: str) -> str:
        waiting = len(self.queue) + len(self.reading)
        return f"{message} [{len(self.busy)} running, {self.failures} failed, {waiting} waiting]"

    def stop(self) -> None:
        """Stop the actors: running cases end at their next window (nothing half-written stays), then kill.

        Called on every exit, including Ctrl-C and cancel. A case that completes meanwhile is recorded (and
        a shipped one written) like any other; actors that do not stop within :data:`_STOP_GRACE_S` are
        killed (a temporary file they leave is removed by the next run). Cases read ahead are dropped; a read
        under way is let finish first (about a second), so that Ray is never shut down under it.
        """
        if self.reader is not None:
            self.reader.shutdown(wait=True, cancel_futures=True)
        self.reading.clear()
        pending = list(self.busy)
        for index, _ in self.busy.values():
            self.actors[index].stop.remote()
        with contextlib.suppress(Exception):
            ended, _ = self.ray.wait(pending, num_returns=len(pending), timeout=_STOP_GRACE_S) if pending else ([], [])
            for ref in ended:
                with contextlib.suppress(self.ray.exceptions.RayError):  # a stopped case raised CancelledError
                    self._record(self.busy[ref][1], self.ray.get(ref))
        for actor in self.actors:
            with contextlib.suppress(Exception):
                self.ray.kill(actor, no_restart=True)


def _missing_package(exc: BaseException) -> bool:
    """Whether a Ray error says that the worker could not import our code (package not installed there)."""
    text = str(exc)
    return "failed to import on the worker" in text or "No module named" in text


def _missing_module(exc: BaseException) -> str:
    found = re.search(r"No module named '[^']+'", str(exc))
    return found.group(0) if found else "the actor class failed to import"

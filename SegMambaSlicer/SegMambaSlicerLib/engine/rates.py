"""A rate measured on this computer, never assumed: seconds per window and the memory a window needs.

It is measured once per machine, device, model, window size, low-memory setting, threads (CPU) or batch
and precision (GPU), by :func:`calibrate` on two windows of random input (the second one counts: the
first pays for first-touch memory), and kept in ``<cache>/estimates.json``; every real run measures the
same quantities through :class:`MeasuredNetwork` and updates it (:func:`record_run`), so a rate taken
from calibration is replaced by one from real work (which includes the stitching between windows).
:mod:`.estimate` turns a rate into the prediction for one case.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..io.atomic import OutputError, write_text_atomic
from ..models.cache import cache_dir
from ..models.cards import ModelCard
from .inference import WindowSettings, autocast_context, kept_cpu_memory
from .memory import current_rss, peak_rss

if TYPE_CHECKING:
    from .pipeline import SegmentOptions

#: The rate cache, in the user cache folder (:func:`..models.cache.cache_dir`).
ESTIMATES_FILE = "estimates.json"
ESTIMATES_VERSION = 1
#: Network passes a calibration runs; the last one is timed (the first pays for first-touch memory).
CALIBRATION_WINDOWS = 2
#: Network passes whose memory :class:`MeasuredNetwork` measures (reading /proc costs ~0.1 ms; not more).
MEASURED_CALLS = 2
#: At most this many windows of earlier runs weigh against a new run's in the time per window, so the
#: rate follows a computer whose speed changed (another load, another power setting) within a few runs.
RATE_MEMORY_WINDOWS = 100


class MeasuredNetwork(nn.Module):
    """Wraps a network to time every pass and measure the memory of the first few, with no side effects.

    Memory: on the CPU the resident size before a pass and the process's high-water mark after it. When
    the pass raised the high-water mark, its peak above the resident size before it is known exactly
    ("exact"; memory it reused from what the process had freed but kept is not in it, see
    :func:`rate_after_run`); when it did not (an earlier phase peaked higher), the resident growth is
    used, a lower bound that is close while :func:`.devices.reuse_freed_cpu_memory` keeps freed memory
    resident. The high-water mark is never
    reset, so a benchmark reading this process's peak is not disturbed. On CUDA: torch's allocated bytes
    before and its peak after. Time: the rate is taken from the end of the first pass to the end of the
    last, so it includes the stitching between windows and excludes the first pass's warm-up.
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network
        #: (start, end, windows in the batch) of every pass, perf_counter seconds.
        self.calls: list[tuple[float, float, int]] = []
        self.window_bytes: int | None = None
        self.window_bytes_exact = False

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        if len(self.calls) >= MEASURED_CALLS:
            start = time.perf_counter()
            out = self.network(windows)
            self.calls.append((start, time.perf_counter(), int(windows.shape[0])))
            return out
        cuda = windows.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(windows.device)
            before, high_before = torch.cuda.memory_allocated(windows.device), None
        else:
            before, high_before = current_rss(), peak_rss()
        start = time.perf_counter()
        out = self.network(windows)
        if cuda:
            torch.cuda.synchronize(windows.device)
        end = time.perf_counter()
        self.calls.append((start, end, int(windows.shape[0])))
        if cuda:
            self._note(torch.cuda.max_memory_allocated(windows.device) - before, exact=True)
        elif before is not None:
            high_after, after = peak_rss(), current_rss()
            if high_before is not None and high_after is not None and high_after > high_before:
                self._note(high_after - before, exact=True)
            elif after is not None:
                self._note(after - before, exact=False)
        return out

    def _note(self, size: int, exact: bool) -> None:
        size = max(0, int(size))
        if exact and not self.window_bytes_exact:
            self.window_bytes, self.window_bytes_exact = size, True
        elif exact == self.window_bytes_exact:
            self.window_bytes = max(self.window_bytes or 0, size)

    @property
    def windows(self) -> int:
        return sum(batch for _, _, batch in self.calls)

    @property
    def seconds_per_window(self) -> float | None:
        """Wall seconds per window after the first pass (the first pass alone when there is one)."""
        if not self.calls:
            return None
        if len(self.calls) == 1:
            start, end, batch = self.calls[0]
            return (end - start) / max(batch, 1)
        later = sum(batch for _, _, batch in self.calls[1:])
        return (self.calls[-1][1] - self.calls[0][1]) / max(later, 1)

    @property
    def first_window_extra_seconds(self) -> float | None:
        """How much longer the first pass took than the later ones (first-touch memory, kernel set-up)."""
        rate = self.seconds_per_window
        if len(self.calls) < 2 or rate is None:
            return None
        start, end, batch = self.calls[0]
        return max(0.0, (end - start) - rate * batch)

    @property
    def network_seconds(self) -> float | None:
        """Wall seconds from the start of the first pass to the end of the last."""
        return self.calls[-1][1] - self.calls[0][0] if self.calls else None


def weights_bytes(network: nn.Module) -> int:
    """Bytes of the network's parameters and buffers."""
    tensors = [*network.parameters(), *network.buffers()]
    return int(sum(t.numel() * t.element_size() for t in tensors))


@torch.no_grad()
def calibrate(network: nn.Module, channels: int, settings: WindowSettings, device: torch.device,
              mixed_precision: bool = True, low_memory: bool = False) -> MeasuredNetwork:
    """Run :data:`CALIBRATION_WINDOWS` passes of random windows through ``network`` on ``device``, measured.

    The windows go through as the run sends them: one at a time on the CPU, ``sw_batch_size`` at a time
    elsewhere, in the run's precision, memory mode and allocator setting. Costs two windows' time.
    """
    from ..networks.lean_blocks import memory_mode

    batch = 1 if device.type == "cpu" else settings.sw_batch_size
    generator = torch.Generator().manual_seed(0)
    windows = torch.randn((batch, channels, *settings.roi_size), generator=generator).to(device)
    measured = MeasuredNetwork(network)
    with kept_cpu_memory(low_memory), autocast_context(device, mixed_precision), memory_mode(low_memory):
        for _ in range(CALIBRATION_WINDOWS):
            measured(windows)
    return measured


# ---------------------------------------------------------------- the rate and its cache


@dataclass(frozen=True)
class Rate:
    """What was measured on this computer for one :func:`rate_key`."""

    seconds_per_window: float
    #: Working set of one network pass on the device running it (None: not measured); a lower bound
    #: unless ``window_bytes_exact``.
    window_bytes: int | None
    window_bytes_exact: bool
    weights_bytes: int
    #: Resident size of the process with the network loaded, less the weights held on the CPU and the images.
    runtime_bytes: int | None
    #: Seconds the first window a process runs with the network takes beyond the others (kernels set up,
    #: memory touched for the first time); a process that already ran it (the module's warm worker, a run
    #: after a calibration) does not pay it again.
    warmup_seconds: float | None = None
    #: Seconds outside the network (reading, preparing, restoring) per million input voxels (all channels).
    overhead_seconds_per_megavoxel: float | None = None
    source: str = "calibration"
    #: Windows the time per window was taken from (the average over runs is weighted by them).
    windows_timed: int = 0
    updated: str = ""


def machine_id() -> str:
    """This computer: host name, processor architecture and model (what the rate depends on)."""
    model = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{platform.node()}|{platform.machine()}|{model}|{os.cpu_count()} cpus"


def device_id(device: torch.device) -> str:
    """The device by kind, index and (for CUDA) name, so another GPU in the same computer gets its own rate."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index}:{torch.cuda.get_device_name(index)}"
    return device.type


def rate_key(card: ModelCard, settings: WindowSettings, device: torch.device, *, low_memory: bool = False,
             threads: int | None = None, mixed_precision: bool = True, scan_backend: str | None = None,
             folds: Sequence[str | int] | None = None) -> str:
    """The cache key of a rate: everything the speed or the memory of one window depends on.

    CPU threads count on the CPU only; batch size and precision on GPUs only (the CPU sends windows one
    at a time and ignores autocast). ``threads`` None means torch's current setting.
    """
    cpu = device.type == "cpu"
    key = {
        "machine": machine_id(),
        "device": device_id(device),
        "torch": torch.__version__,
        "model": card.id,
        "architecture": card.architecture,
        "kwargs": hashlib.sha256(json.dumps(card.architecture_kwargs, sort_keys=True, default=str).encode()).hexdigest()[:16],
        "roi": list(settings.roi_size),
        "low_memory": bool(low_memory),
        "threads": (threads or torch.get_num_threads()) if cpu else None,
        "batch": None if cpu else settings.sw_batch_size,
        "mixed_precision": None if cpu else bool(mixed_precision and device.type == "cuda"),
        "scan_backend": scan_backend,
        "folds": [str(f) for f in folds] if folds else None,
    }
    return json.dumps(key, sort_keys=True)


def estimates_path(cache: str | os.PathLike[str] | None = None) -> Path:
    return cache_dir(cache) / ESTIMATES_FILE


def _read_rates(cache: str | os.PathLike[str] | None) -> dict[str, dict[str, Any]]:
    """The cached rates by key; a missing, unreadable, damaged or other-version file counts as empty."""
    try:
        data = json.loads(estimates_path(cache).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != ESTIMATES_VERSION or not isinstance(data.get("rates"), dict):
        return {}
    return {k: v for k, v in data["rates"].items() if isinstance(v, dict)}


def _rate_from(entry: Mapping[str, Any]) -> Rate | None:
    names = {f.name for f in fields(Rate)}
    try:
        rate = Rate(**{k: v for k, v in entry.items() if k in names})
    except TypeError:
        return None
    numbers = (rate.seconds_per_window, rate.weights_bytes)
    if not all(isinstance(v, (int, float)) and v >= 0 for v in numbers):
        return None
    return rate


def cached_rate(key: str, cache: str | os.PathLike[str] | None = None) -> Rate | None:
    """The rate measured for ``key`` on this computer, or None when there is none (or it is unreadable)."""
    entry = _read_rates(cache).get(key)
    return None if entry is None else _rate_from(entry)


def remember_rate(key: str, rate: Rate, cache: str | os.PathLike[str] | None = None) -> None:
    """Store ``rate`` under ``key`` (atomically). The cache is only a shortcut: a folder that cannot be
    written leaves it as it was, and the next run measures again."""
    stamped = replace(rate, updated=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    with contextlib.suppress(OSError, OutputError):
        rates = _read_rates(cache)
        rates[key] = asdict(stamped)
        text = json.dumps({"version": ESTIMATES_VERSION, "rates": rates}, indent=1, sort_keys=True)
        write_text_atomic(estimates_path(cache), text, what="estimate record")


def rate_from_calibration(measured: MeasuredNetwork, weights: int, runtime: int | None) -> Rate:
    """The rate of a :func:`calibrate` run."""
    assert measured.seconds_per_window is not None
    return Rate(seconds_per_window=measured.seconds_per_window, window_bytes=measured.window_bytes,
                window_bytes_exact=measured.window_bytes_exact, weights_bytes=weights, runtime_bytes=runtime,
                warmup_seconds=measured.first_window_extra_seconds, source="calibration",
                windows_timed=max(0, measured.windows - measured.calls[0][2]))


def rate_after_run(previous: Rate | None, measured: MeasuredNetwork, run_seconds: float, input_voxels: int,
                   weights: int, runtime: int | None, cold: bool = True) -> Rate | None:
    """The rate to keep after a real run measured through ``measured`` (None when it ran no window).

    The run's time per window (it includes the stitching a calibration leaves out) replaces a calibrated
    one and is averaged with earlier runs', weighted by the windows timed (earlier runs count for at most
    :data:`RATE_MEMORY_WINDOWS`). Its window memory only ever raises the earlier value: inside a run the first window
    reuses memory that earlier steps freed but the process kept, so its growth understates what the
    network needs (a calibration measures it with nothing to reuse). An unknown runtime keeps the
    earlier one. Only a ``cold`` run (the first of its process with this network) measures the warm-up.
    """
    seconds = measured.seconds_per_window
    if seconds is None or measured.network_seconds is None:
        return None
    timed = max(1, measured.windows - measured.calls[0][2]) if len(measured.calls) > 1 else 1
    if previous is not None and previous.source == "run" and previous.windows_timed > 0:
        earlier = min(previous.windows_timed, RATE_MEMORY_WINDOWS)
        seconds = (previous.seconds_per_window * earlier + seconds * timed) / (earlier + timed)
        timed += earlier
    window, exact = measured.window_bytes, measured.window_bytes_exact
    if previous is not None and previous.window_bytes is not None and previous.window_bytes >= (window or 0):
        window, exact = previous.window_bytes, previous.window_bytes_exact
    outside = max(0.0, run_seconds - measured.network_seconds)
    overhead = outside / (input_voxels / 1e6) if input_voxels > 0 else None
    return Rate(
        seconds_per_window=seconds, window_bytes=window, window_bytes_exact=exact, weights_bytes=weights,
        runtime_bytes=runtime if runtime is not None else (previous.runtime_bytes if previous else None),
        warmup_seconds=(measured.first_window_extra_seconds if cold and len(measured.calls) > 1
                        else previous.warmup_seconds if previous else None),
        overhead_seconds_per_megavoxel=overhead, source="run", windows_timed=timed,
    )


def runtime_bytes(resident: int | None, weights_on_cpu: int, images: int = 0) -> int | None:
    """The runtime part of a resident size measured with the network loaded (and ``images`` bytes read)."""
    return None if resident is None else max(0, resident - weights_on_cpu - images)


# ---------------------------------------------------------------- one run, as the front ends ask


def run_key(card: ModelCard, options: SegmentOptions, device: torch.device, threads: int | None = None) -> str:
    """:func:`rate_key` of a run with ``options`` (the same key for the CLI, the worker and the module)."""
    from .pipeline import window_settings

    return rate_key(card, window_settings(card, options), device, low_memory=options.low_memory,
                    threads=threads, mixed_precision=options.mixed_precision, scan_backend=options.scan_backend,
                    folds=options.folds)


def calibrate_run(network: nn.Module, card: ModelCard, options: SegmentOptions, device: torch.device,
                  runtime: int | None) -> Rate:
    """Measure a rate for a run with ``options`` on ``network`` (already on ``device``) by :func:`calibrate`."""
    from .pipeline import window_settings

    if options.scan_backend is not None:
        from ..networks.ops.mixers import set_scan_backend

        set_scan_backend(network, options.scan_backend)
    measured = calibrate(network, len(card.channels), window_settings(card, options), device, options.mixed_precision,
                         options.low_memory)
    return rate_from_calibration(measured, weights_bytes(network), runtime)


def record_run(key: str, measured: MeasuredNetwork, run_seconds: float, case_voxels: int, weights: int,
               runtime: int | None, cold: bool = True, cache: str | os.PathLike[str] | None = None) -> Rate | None:
    """Fold a real run's measurements into the cached rate of ``key`` (see :func:`rate_after_run`)."""
    rate = rate_after_run(cached_rate(key, cache), measured, run_seconds, case_voxels, weights, runtime, cold)
    if rate is not None:
        remember_rate(key, rate, cache)
    return rate

"""Helpers shared by the benchmark scripts: machine description, robust timing, memory, deterministic nets.

Benchmarks are not tests: they print numbers (and optionally write JSON) for docs/benchmarks.md. On a
shared machine single timings are noisy, so every script reports medians of repeats, alternates the
variants it compares inside one process, and records the load average next to its numbers.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on: CPU model, cores, memory, torch build and threads, load."""
    info: dict[str, Any] = {
        "cpu": _lscpu_field("Model name") or platform.processor() or platform.machine(),
        "logical_cpus": os.cpu_count(),
        "memory_gib": round(_meminfo_kib("MemTotal") / 2**20, 1) if _meminfo_kib("MemTotal") else None,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
    }
    info["load_average"] = load_average()
    return info


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def cpu_description() -> dict[str, Any]:
    """The CPU model and its AVX-512 extensions as ``lscpu`` reports them (empty list: no AVX-512)."""
    flags = (_lscpu_field("Flags") or "").split()
    return {"model": _lscpu_field("Model name"), "avx512": sorted(f for f in flags if f.startswith("avx512"))}


def _lscpu_field(name: str) -> str | None:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return None


def _meminfo_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mib() -> float:
    """Current resident set size of this process in MiB (Linux /proc; peak RSS elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text(encoding="utf-8").split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return peak_rss_mib()


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB.

    Linux: VmHWM from /proc, because ru_maxrss survives fork + exec and would report a large parent's
    peak for a benchmark's child process. Elsewhere ru_maxrss (KiB on Linux, bytes on macOS).
    """
    try:
        for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if platform.system() == "Darwin" else peak / 2**10


def timed(fn: Callable[[], object]) -> float:
    """Wall seconds of one call (CUDA work is synchronised before and after)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def summary(times: Sequence[float]) -> dict[str, float]:
    """Median, min, max and count of a list of timings (seconds)."""
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "n": len(times)}


def _best_rate(flops: float, fn: Callable[[], object], repeats: int) -> float:
    fn()
    return flops / min(timed(fn) for _ in range(repeats)) / 1e9


def matmul_peak_gflops(threads: int, repeats: int = 5) -> dict[str, float]:
    """Float32 matrix-product rate of this machine with the current thread count, measured now.

    Two numbers, because on this kind of CPU they differ: ``torch.mm`` (the BLAS the Mamba projections
    use) and a large channels-last 3x3x3 convolution through oneDNN (what the 3-D convolutions use);
    the best over sizes/repeats of each is reported.
    """
    del threads  # the caller has set it; kept in the signature so call sites state what was measured
    with torch.no_grad():
        pairs = [(torch.randn(n, n), torch.randn(n, n)) for n in (1024, 2048, 4096)]
        best_mm = max(_best_rate(2 * a.shape[0] ** 3, lambda a=a, b=b: torch.mm(a, b), repeats) for a, b in pairs)
        conv = nn.Conv3d(96, 96, 3, padding=1, bias=False).eval()
        x = torch.randn(1, 96, 48, 48, 48).contiguous(memory_format=torch.channels_last_3d)
        best_conv = _best_rate(2 * 96 * 96 * 27 * 48**3, lambda: conv(x), repeats)
    return {"mm_gflops": best_mm, "conv3d_gflops": best_conv}


def seeded_network(architecture: str, seed: int = 0, **kwargs: Any) -> nn.Module:
    """A network with deterministic (seeded default-init) weights in eval mode; speed does not depend on values."""
    from SegMambaSlicerLib.networks import build_network

    torch.manual_seed(seed)
    return build_network(architecture, **kwargs).eval()


def write_json(path: str | None, record: dict[str, Any]) -> None:
    """Append one JSON record (a line) to ``path`` when given; the plot script reads these files."""
    if not path:
        return
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, default=str) + "\n")

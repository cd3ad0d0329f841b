"""What this process and this computer have: resident and peak memory, memory still available, GPU memory.

The estimate (:mod:`.estimate`) compares a run's predicted peak with what is available, and the rates
(:mod:`.rates`) measure a window's working set as the growth of this process's resident size; both read
it here, with the standard library where the platform allows and psutil where it is installed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import sys
from pathlib import Path
from typing import Any

import torch


def current_rss() -> int | None:
    """Resident size of this process in bytes (Linux /proc, else psutil), or None where neither tells."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        pages = int(Path("/proc/self/statm").read_text(encoding="ascii").split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    psutil = _psutil()
    return int(psutil.Process().memory_info().rss) if psutil is not None else None


def peak_rss() -> int | None:
    """Highest resident size of this process so far in bytes (VmHWM, psutil's peak_wset, or ru_maxrss)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    psutil = _psutil()
    if psutil is not None and hasattr(psutil.Process().memory_info(), "peak_wset"):  # Windows
        return int(psutil.Process().memory_info().peak_wset)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # bytes on macOS, KiB elsewhere


def mem_available_from_meminfo(text: str) -> int | None:
    """``MemAvailable`` of a /proc/meminfo text in bytes: what the kernel can give without swapping."""
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            parts = line.split()
            with contextlib.suppress(IndexError, ValueError):
                return int(parts[1]) * 1024
    return None


def available_memory() -> int | None:
    """Memory the system can give a new allocation now, in bytes; None when it cannot be told.

    psutil when installed; else Linux's MemAvailable; else Windows' GlobalMemoryStatusEx through ctypes.
    macOS without psutil has no standard-library answer (free pages alone would undercount the cache it
    can reclaim), so it is reported as unknown rather than guessed.
    """
    psutil = _psutil()
    if psutil is not None:
        return int(psutil.virtual_memory().available)
    with contextlib.suppress(OSError):
        found = mem_available_from_meminfo(Path("/proc/meminfo").read_text(encoding="ascii"))
        if found is not None:
            return found
    if sys.platform == "win32":
        return _windows_available()
    return None


def _windows_available() -> int | None:
    class MemoryStatus(ctypes.Structure):
        _fields_ = [("dwLength", ctypes.c_ulong), ("dwMemoryLoad", ctypes.c_ulong),
                    ("ullTotalPhys", ctypes.c_ulonglong), ("ullAvailPhys", ctypes.c_ulonglong),
                    ("ullTotalPageFile", ctypes.c_ulonglong), ("ullAvailPageFile", ctypes.c_ulonglong),
                    ("ullTotalVirtual", ctypes.c_ulonglong), ("ullAvailVirtual", ctypes.c_ulonglong),
                    ("ullAvailExtendedVirtual", ctypes.c_ulonglong)]

    status = MemoryStatus()
    status.dwLength = ctypes.sizeof(MemoryStatus)
    try:
        ok = ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status))  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        return None
    return int(status.ullAvailPhys) if ok else None


def gpu_free_memory(device: torch.device) -> int | None:
    """Bytes a CUDA device can still give this process: free on the device plus what torch holds unused."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def _psutil() -> Any:
    try:
        import psutil
    except ImportError:
        return None
    return psutil


def process_rss(pid: int) -> int | None:
    """Resident size of another process (the module's warm worker) in bytes, or None where unknown."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        pages = int(Path(f"/proc/{pid}/statm").read_text(encoding="ascii").split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    psutil = _psutil()
    if psutil is None:
        return None
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except Exception:  # noqa: BLE001 - psutil's NoSuchProcess/AccessDenied: unknown, not an error
        return None

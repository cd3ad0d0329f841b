"""Choosing and describing the compute device (CUDA, Apple MPS, CPU), and the CPU allocator setting."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
import platform
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

from ..errors import DeviceError, SegMambaError

log = logging.getLogger(__name__)


def resolve_device(name: str = "auto") -> torch.device:
    """Map "auto" | "cpu" | "cuda[:N]" | "mps" to an available torch device, or explain why not."""
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"a CUDA {torch.version.cuda} build"
            raise DeviceError(
                f"CUDA was requested but no usable NVIDIA GPU was found (torch {torch.__version__} is {build}). "
                "Choose device 'cpu' or install a CUDA build of PyTorch that supports your GPU."
            )
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"GPU {device.index} does not exist; this machine has {torch.cuda.device_count()}.")
        return device
    if name == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise DeviceError("Apple MPS was requested but is not available; choose 'cpu'.")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise DeviceError(f"Unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps.")


T = TypeVar("T")


def run_with_cpu_fallback(run: Callable[[torch.device], T], device: torch.device) -> tuple[T, str | None]:
    """``run(device)``; on Apple's GPU (MPS), an operation it lacks makes ``run`` retry on the CPU.

    MPS misses some 3-D operations; ``PYTORCH_ENABLE_MPS_FALLBACK=1`` (set by the command line and the
    worker) covers most, and this covers the rest, so a Mac user gets a result instead of a crash. The
    second value says what happened, for the user; None when ``device`` did the work.
    """
    try:
        return run(device), None
    except (NotImplementedError, RuntimeError) as exc:
        if device.type != "mps" or isinstance(exc, SegMambaError):
            raise
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.warning("MPS failed (%s); running on the CPU", reason)
        message = (f"The Apple GPU (MPS) could not run this network ({reason}); it ran on the CPU instead, "
                   "which is slower.")
        return run(torch.device("cpu")), message


# ------------------------------------------------------------------ CPU memory reuse


# glibc mallopt parameters and their documented defaults (mallopt(3)).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 128 * 1024, 65536
_NEVER_TRIM = -1  # mallopt(3): "Setting M_TRIM_THRESHOLD to -1 disables trimming completely"


class _AllocatorState:
    """Nesting depth of :func:`reuse_freed_cpu_memory` across threads."""

    lock = threading.Lock()
    depth = 0
    bounded = False  # whether the outermost entry asked for a bounded heap (return_from)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (mallopt and malloc_trim exist and mean what we use them for)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes, libc.malloc_trim.argtypes = [ctypes.c_int, ctypes.c_int], [ctypes.c_size_t]
    except (OSError, AttributeError) as exc:  # an unusual libc: run with the default allocator
        log.debug("glibc allocator settings unavailable: %s", exc)
        return None
    return libc


@contextlib.contextmanager
def reuse_freed_cpu_memory(return_from: int | None = None) -> Iterator[None]:
    """Keep freed CPU memory in the process for reuse while inside; give it back to the system on exit.

    glibc returns every allocation above 32 MiB to the kernel when it is freed, and each new one is then
    mapped and zero-filled page by page. A 128^3 SegMamba window allocates tens of GB of such short-lived
    activations, so much of its CPU time went to page faults (docs/benchmarks.md). Inside this
    context malloc serves large blocks from its heap and never trims it, so the same pages are reused;
    on exit the defaults come back and ``malloc_trim`` releases the free pages, so the resident size
    drops again. Nested and concurrent uses restore only when the last one exits (the outermost
    entry's setting holds). A no-op off glibc.

    ``return_from`` bounds what the heap keeps (the low-memory setting): blocks of at least that many
    bytes are mapped on their own and given back when freed, so the heap's pages are only the smaller
    blocks', at the cost of faulting the large ones in again each time. Without it, the heap keeps every
    page it ever held, which holes between live blocks make larger than the live peak.
    Side effect: glibc's adaptive mmap threshold stays fixed afterwards (any mallopt call does that).
    """
    libc = _glibc()
    if libc is None:
        yield
        return
    with _AllocatorState.lock:
        if _AllocatorState.depth == 0:
            if return_from is None:
                libc.mallopt(_M_MMAP_MAX, 0)
            else:
                libc.mallopt(_M_MMAP_THRESHOLD, int(return_from))
            libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM)
            _AllocatorState.bounded = return_from is not None
        _AllocatorState.depth += 1
    try:
        yield
    finally:
        with _AllocatorState.lock:
            _AllocatorState.depth -= 1
            if _AllocatorState.depth == 0:
                if _AllocatorState.bounded:
                    libc.mallopt(_M_MMAP_THRESHOLD, _DEFAULT_MMAP_THRESHOLD)
                else:
                    libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
                libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
                libc.malloc_trim(0)

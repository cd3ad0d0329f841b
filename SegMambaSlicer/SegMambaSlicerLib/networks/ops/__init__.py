"""The Mamba machinery the networks share: selective-scan backends and the mixers built on them.

The backend names are defined here, without PyTorch, so that front ends can offer them (the command
line's ``--scan-backend``) before PyTorch is loaded. So is the low-memory setting (:func:`memory_mode`), which the mixers and the
UNETR blocks (``networks.lean_blocks``) read.
"""

import contextlib
import contextvars
from collections.abc import Iterator

#: Environment variable that chooses the selective-scan backend when no argument does.
BACKEND_ENV_VAR = "SEGMAMBA_SCAN_BACKEND"
#: ``auto`` (fused kernels when usable, else the blocked PyTorch scan), ``torch``, ``fused``, ``reference``.
SCAN_BACKENDS = ("auto", "torch", "fused", "reference")

_LOW_MEMORY: contextvars.ContextVar[bool] = contextvars.ContextVar("segmamba_low_memory", default=False)


@contextlib.contextmanager
def memory_mode(low_memory: bool) -> Iterator[None]:
    """Run the networks inside with (``True``) or without their low-memory setting; restores it on exit.

    A context variable (per thread), so that concurrent runs in one process do not see each other's choice.
    """
    token = _LOW_MEMORY.set(bool(low_memory))
    try:
        yield
    finally:
        _LOW_MEMORY.reset(token)


def low_memory_enabled() -> bool:
    """Whether the innermost :func:`memory_mode` asked for the low-memory setting."""
    return _LOW_MEMORY.get()

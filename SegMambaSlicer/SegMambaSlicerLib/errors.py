"""Exceptions with messages a clinician or researcher can act on.

Every error the pipeline raises on purpose derives from :class:`SegMambaError`, so the
GUI and the CLI can show its message as one line and keep tracebacks for real bugs.
Testing/test_error_contract.py holds every subclass to that: each reaches the CLI as exit 1
and one ``error:`` line, or is listed there with the reason the CLI cannot raise it.
"""

from __future__ import annotations

from collections.abc import Callable

#: Long work reports ``(fraction done in [0, 1], what it is doing)``; a fraction of 0 starts a new step.
ProgressCallback = Callable[[float, str], None]
#: Asked between steps of long work; True stops it with :class:`CancelledError`.
CancelCallback = Callable[[], bool]


class SegMambaError(RuntimeError):
    """Base class of all expected, user-facing errors."""


class InputImageError(SegMambaError):
    """An input image is missing, unreadable, or does not fit the model or the other inputs."""


class ModelCardError(SegMambaError):
    """A model card is missing, malformed, or refers to something that does not exist."""


class CheckpointError(SegMambaError):
    """A weights file cannot be read safely or does not fit the network."""


class DeviceError(SegMambaError):
    """The requested compute device is not available."""


class CancelledError(SegMambaError):
    """The user cancelled a running segmentation."""

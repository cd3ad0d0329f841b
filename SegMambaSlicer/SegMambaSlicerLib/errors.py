"""Exceptions with messages a clinician or researcher can act on.

Every error the pipeline raises on purpose derives from :class:`SegMambaError`, so the
GUI and the CLI can show its message as one line and keep tracebacks for real bugs.
"""

from __future__ import annotations


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

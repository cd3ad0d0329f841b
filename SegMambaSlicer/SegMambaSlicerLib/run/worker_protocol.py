"""What the Slicer module's worker parent (:mod:`.worker`) and its child (:mod:`.worker_child`) exchange.

Both sides import this module and nothing of each other, so the format lives in one place:

* the child is started once as ``python -m CHILD_MODULE`` and serves jobs until its stdin closes: the
  parent writes one job file path per line (:func:`format_job_line`, :func:`parse_job_line`), so one
  process, with PyTorch imported and the last network loaded, can run click after click;
* inputs: one uncompressed ``.npz`` per channel holding the voxels and the exact LPS geometry as
  float64 (no rounding through a file header, no slow compression), or plain image file paths;
* ``job.json`` (:func:`write_job`, :func:`read_job`): the model card (as its JSON dict), the
  :class:`~.pipeline.SegmentOptions`, the output path and the torch thread count;
* stdout of the child: one JSON object per line (:func:`format_event`, :func:`parse_event`) —
  ``started`` once per process, then per job ``progress`` (fraction, message), ``log``, ``network``
  (:data:`EVENT_NETWORK`: loaded anew or reused), ``result`` or ``error``, and last :data:`EVENT_JOB_DONE`;
* output: the label map as ``.npz`` on the first input's grid;
* exit code :data:`EXIT_ORPHANED` when the child stopped because its stdin closed (the parent went away).

All paths travel as UTF-8 JSON strings, never through a console code page, so folders with spaces
and non-ASCII names (common on Windows) are safe. This module imports neither torch nor Qt.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import SimpleITK as sitk

from ..errors import SegMambaError
from ..models.cards import ModelCard, card_to_dict

if TYPE_CHECKING:
    from ..engine.pipeline import SegmentOptions

#: The module the parent runs as ``python -m CHILD_MODULE`` (job file paths then follow on its stdin).
CHILD_MODULE = "SegMambaSlicerLib.run.worker_child"
JOB_VERSION = 2
#: Exit code of a child whose parent went away (its stdin reached end of file).
EXIT_ORPHANED = 3
#: The event that ends each job's events: the child is ready for the next job line.
EVENT_JOB_DONE = "done"
#: The event that says whether a job built its network (``reused`` false) or took the one already loaded.
EVENT_NETWORK = "network"
#: ``kind`` of an ``error`` event for running out of GPU or main memory.
KIND_OUT_OF_MEMORY = "OutOfMemory"
#: ``kind`` of an ``error`` event for an exception that is not a SegMambaError (a bug, not a user error).
KIND_INTERNAL_ERROR = "InternalError"


class WorkerError(SegMambaError):
    """The segmentation worker failed; ``details`` holds its traceback or last stderr lines."""

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.details = details


class WorkerCrashedError(WorkerError):
    """The worker process ended without reporting a result or an error (crash, kill, bad interpreter)."""


class WorkerOutOfMemoryError(WorkerError):
    """The network ran out of GPU or main memory in the worker."""


# ---------------------------------------------------------------- images


def save_image_npz(image: sitk.Image, path: str | os.PathLike[str]) -> Path:
    """Write a 3-D scalar image uncompressed with float64 geometry, so it reads back bit-identical."""
    path = Path(path)
    np.savez(
        path,
        voxels=sitk.GetArrayViewFromImage(image),
        spacing=np.asarray(image.GetSpacing(), dtype=np.float64),
        origin=np.asarray(image.GetOrigin(), dtype=np.float64),
        direction=np.asarray(image.GetDirection(), dtype=np.float64),
    )
    return path


def load_image_npz(path: str | os.PathLike[str]) -> sitk.Image:
    """Read an image written by :func:`save_image_npz`."""
    with np.load(path, allow_pickle=False) as data:
        image = sitk.GetImageFromArray(data["voxels"])
        image.SetSpacing(data["spacing"].tolist())
        image.SetOrigin(data["origin"].tolist())
        image.SetDirection(data["direction"].tolist())
    return image


# ---------------------------------------------------------------- the job file


def options_to_dict(options: SegmentOptions | None) -> dict[str, Any]:
    """SegmentOptions as JSON values (paths as strings); ``{}`` means the defaults."""
    if options is None:
        return {}
    values = dataclasses.asdict(options)
    return {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in values.items()}


def write_job(
    path: Path,
    inputs: Sequence[str],
    card: ModelCard,
    options: SegmentOptions | None,
    output: Path,
    threads: int,
) -> Path:
    """Write the job file the child reads; ``inputs`` are ``.npz`` hand-overs or image file paths."""
    job = {
        "version": JOB_VERSION,
        "inputs": list(inputs),
        "card": card_to_dict(card),
        "card_path": str(card.source_path) if card.source_path else None,
        "options": options_to_dict(options),
        "output": str(output),
        "threads": threads,
    }
    path.write_text(json.dumps(job, indent=1), encoding="utf-8")
    return path


def read_job(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The job written by :func:`write_job`; a WorkerError if another version of the library wrote it."""
    job = json.loads(Path(path).read_text(encoding="utf-8"))
    if job.get("version") != JOB_VERSION:
        raise WorkerError(
            f"Job version {job.get('version')} is not supported by this worker (expects {JOB_VERSION})."
        )
    return job


def format_job_line(job: Path) -> str:
    """A job file path as the parent writes it to the child's stdin: one JSON string per line (ASCII, so
    no console encoding and no space or newline in a folder name can split or garble it)."""
    return json.dumps(str(job)) + "\n"


def parse_job_line(line: str) -> Path:
    """The job file path of one stdin line written by :func:`format_job_line`."""
    return Path(json.loads(line))


# ---------------------------------------------------------------- event lines


@dataclass(frozen=True)
class WorkerEvent:
    """One thing the worker reported: ``started``, ``progress``, ``log``, ``stderr``, ``network``,
    ``result``, ``error``, or ``finished``, which the parent adds last once the job has ended (its message
    is the outcome)."""

    kind: str
    message: str = ""
    fraction: float | None = None
    data: Mapping[str, Any] = field(default_factory=dict)


def format_event(event: str, /, **data: Any) -> str:
    """One event as the child writes it: a single JSON line (ASCII, so no console encoding can garble it).

    ``event`` is positional-only because ``error`` events carry a ``kind`` field of their own.
    """
    return json.dumps({"event": event, **data}) + "\n"


def parse_event(line: str) -> WorkerEvent:
    """One stdout line of the child as an event; a line that is not an event object becomes a log line."""
    text = line.rstrip("\r\n")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("event"), str):
        return WorkerEvent("log", text)
    fraction = data.get("fraction")
    return WorkerEvent(data["event"], str(data.get("message", "")),
                       float(fraction) if fraction is not None else None, data)

"""The one way every output file is written: complete and checked, or not at all.

A write goes to a hidden temporary file beside the target (``.<name>.<random>.part``, same folder so
the rename stays on one file system), is flushed to disk, checked (size, and a read-back by the
caller's ``verify`` where the writer cannot report its own failures: SimpleITK's NIfTI writer says
nothing when the disk fills), and only then renamed onto the target. On any failure, including
Ctrl-C and SIGTERM, the temporary file is removed and the previous file under the target name, if
any, is left as it was. Temporary files of runs that were killed outright are removed by
:func:`remove_stale_temporaries` before the next write of the same target.
"""

from __future__ import annotations

import csv
import glob
import io
import os
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from ..errors import SegMambaError

PathLike = str | os.PathLike[str]
_TEMP_SUFFIX = ".part"


class OutputError(SegMambaError):
    """An output cannot be written: folder not writable, disk full, or it would replace an input."""


def temporary_path(path: Path, suffix: str = _TEMP_SUFFIX) -> Path:
    """A new hidden name beside ``path`` that :func:`remove_stale_temporaries` recognises.

    ``suffix`` ends the name: writers that choose the format by suffix (SimpleITK) need the real one.
    """
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}{suffix}")


def remove_stale_temporaries(path: PathLike) -> None:
    """Delete the hidden ``.<name>.*`` files that interrupted writes of ``path`` left behind."""
    path = Path(path).expanduser()
    if not path.parent.is_dir():
        return
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*"):
        try:
            stale.unlink()
        except OSError:  # another run's file, or one we may not delete: it does no harm where it is
            continue


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _flush_to_disk(path: Path) -> None:
    """fsync the written file: some file systems (network shares) report a full disk only here."""
    fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def write_atomic(
    path: PathLike,
    write: Callable[[Path], None],
    verify: Callable[[Path], None] | None = None,
    *,
    what: str = "output",
    suffix: str = _TEMP_SUFFIX,
) -> Path:
    """Write ``path`` through ``write(temporary)``; rename it into place only when complete and verified.

    ``verify(temporary)`` raises :class:`OutputError` with a short reason (or any ``OSError`` or
    ``RuntimeError``) when the file does not hold what was meant. Errors become one :class:`OutputError` line naming ``what``.
    ``suffix`` ends the temporary file's name (see :func:`temporary_path`).
    """
    target = Path(path).expanduser()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"Could not write the {what} {target}: cannot create its folder ({_reason(exc)}).") from None
    remove_stale_temporaries(target)
    tmp = temporary_path(target, suffix)
    try:
        write(tmp)
        if not tmp.is_file() or tmp.stat().st_size == 0:
            raise OutputError("nothing was written")
        _flush_to_disk(tmp)
        if verify is not None:
            verify(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # give the permissions of any new file (mkstemp-style 0600 is not)
        os.replace(tmp, target)
    except OutputError as exc:
        raise OutputError(
            f"Could not write the {what} {target}: {exc}; check the free space on that disk."
        ) from None
    except OSError as exc:
        raise OutputError(
            f"Could not write the {what} {target}: {_reason(exc)}. Check the free space and that you may "
            "write to that folder."
        ) from None
    except RuntimeError as exc:  # writers and readers of image libraries report failures this way
        detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise OutputError(
            f"Could not write the {what} {target} ({detail}); the disk may be full or the folder read-only."
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
    return target


def write_bytes_atomic(path: PathLike, data: bytes, *, what: str = "output") -> Path:
    """Write ``data`` to ``path`` atomically; the size on disk is checked against ``len(data)``."""

    def write(tmp: Path) -> None:
        with open(tmp, "xb") as handle:
            handle.write(data)

    def verify(tmp: Path) -> None:
        if tmp.stat().st_size != len(data):
            raise OutputError(f"only {tmp.stat().st_size} of {len(data)} bytes were written")

    if not data:
        raise OutputError(f"Refusing to write an empty {what} {path}.")
    return write_atomic(path, write, verify, what=what)


def write_text_atomic(path: PathLike, text: str, *, what: str = "output") -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically (see :func:`write_bytes_atomic`)."""
    return write_bytes_atomic(path, text.encode("utf-8"), what=what)


def write_csv_atomic(path: PathLike, columns: Sequence[str], rows: Iterable[Sequence[object]], *,
                     what: str = "table") -> Path:
    """Write a CSV (header ``columns``, then ``rows``; ``\\n`` line ends on every platform) atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    return write_text_atomic(path, buffer.getvalue(), what=what)


def same_file(a: Path, b: Path) -> bool:
    """True when both paths name one existing file (through links, hard links and ``..`` alike)."""
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def refuse_overwriting_inputs(outputs: Iterable[PathLike], inputs: Iterable[PathLike]) -> None:
    """Raise :class:`OutputError` when an output would replace an input file or land in an input folder.

    Outputs are compared after resolving links; an input folder (a DICOM series) is the input as a
    whole, so nothing may be written inside it.
    """
    sources = [Path(p).expanduser() for p in inputs]
    for output in (Path(p).expanduser() for p in outputs):
        resolved = output.resolve()
        for source in sources:
            real = source.resolve()
            if source.is_dir() and resolved.is_relative_to(real):
                raise OutputError(
                    f"The output {output} lies inside the input folder {source}; choose an output outside it "
                    "so that the input series is never changed."
                )
            if resolved == real or same_file(output, source):
                raise OutputError(
                    f"The output {output} is the input image {source}; writing it would destroy the input. "
                    "Choose another output name."
                )


def check_writable(path: PathLike, *, suffixes: tuple[str, ...] = (), what: str = "output") -> Path:
    """Check before any work that ``path`` can be written: not a folder, known suffix, folder writable.

    The folder is created if needed and a probe file is created and removed in it, which is the only
    test that also catches read-only mounts and network shares that ``os.access`` misjudges.
    """
    target = Path(path).expanduser()
    if target.is_dir():
        raise OutputError(f"The {what} {target} is a folder; give a file name such as {target / 'seg.nii.gz'}.")
    if suffixes and not target.name.lower().endswith(suffixes):
        raise OutputError(f"Unsupported format for the {what} {target}; use {', '.join(suffixes)}.")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        probe = temporary_path(target)
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as exc:
        raise OutputError(
            f"Cannot write the {what} into {target.parent}: {_reason(exc)}. Choose a folder you may write to."
        ) from None
    return target

"""Reading inputs and writing label maps (SimpleITK): files, DICOM series folders, checked atomic writes.

SimpleITK reads a NIfTI file whose voxel data is cut short as if the missing voxels were zero, and
writes one silently short when the disk fills; NRRD and MetaImage fail loudly on both. So NIfTI
inputs are checked against the size their header announces before they are read, and every image
written is read back and compared before it appears under its final name.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

from ..errors import InputImageError
from .atomic import OutputError, write_atomic
from .geometry import same_grid

if TYPE_CHECKING:  # files know cards by their fields only: io sits below the models layer
    from ..models.cards import ModelCard

ImageSource = str | os.PathLike | sitk.Image

#: File name endings of the image formats read and written (lower case; the one list every module uses).
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
#: Formats a label map can be written to (single files: a .nhdr/.mhd pair cannot be renamed atomically).
LABELMAP_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
_GZIP_MAGIC = b"\x1f\x8b"


def _read_dicom_series(folder: Path) -> sitk.Image:
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputImageError(f"No image file or DICOM series found in folder {folder}.")
    if len(series) > 1:
        raise InputImageError(
            f"Folder {folder} holds {len(series)} DICOM series; put each series in its own folder "
            "or load it in Slicer and pick the volume."
        )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0]))
    return reader.Execute()


def _sitk_reason(exc: RuntimeError) -> str:
    """The informative line of a SimpleITK exception (its first line is only a source location)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "ERROR:" in line:
            return line.split("ERROR:", 1)[1].strip()
    return lines[-1] if lines else type(exc).__name__


def _nifti_sizes(header: bytes) -> tuple[int, int] | None:
    """(data offset, data bytes) announced by a NIfTI-1 or NIfTI-2 header; None if it is not one."""
    for endian in ("<", ">"):
        (size,) = struct.unpack(endian + "i", header[:4])
        if size == 348 and len(header) >= 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            (bitpix,) = struct.unpack(endian + "h", header[72:74])
            (offset,) = struct.unpack(endian + "f", header[108:112])
        elif size == 540 and len(header) >= 540:
            (bitpix,) = struct.unpack(endian + "h", header[14:16])
            dims = struct.unpack(endian + "8q", header[16:80])
            (offset,) = struct.unpack(endian + "q", header[168:176])
        else:
            continue
        count = math.prod(max(int(d), 1) for d in dims[1 : min(max(int(dims[0]), 1), 7) + 1])
        return int(offset), count * max(int(bitpix), 0) // 8
    return None


def _stored_bytes(path: Path) -> tuple[bytes, int]:
    """The first 540 bytes and the total length of a NIfTI file, decompressed when it is gzipped.

    A gzip stream that ends early or fails its checksum raises ``EOFError``/``gzip.BadGzipFile``.
    """
    with open(path, "rb") as raw:
        if raw.read(2) != _GZIP_MAGIC:
            raw.seek(0)
            return raw.read(540), path.stat().st_size
    with gzip.open(path, "rb") as handle:
        head = handle.read(540)
        total = len(head)
        for block in iter(lambda: handle.read(1 << 20), b""):
            total += len(block)
    return head, total


def check_nifti_complete(path: Path, name: str = "input") -> None:
    """Refuse a NIfTI file that holds less voxel data than its header announces (or a broken gzip)."""
    try:
        head, total = _stored_bytes(path)
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise InputImageError(
            f"Cannot read the {name} image {path}: it is damaged or incomplete (its compressed data {exc}); "
            "copy or export it again."
        ) from None
    except OSError as exc:
        raise InputImageError(f"Cannot read the {name} image {path}: {exc.strerror or exc}.") from None
    sizes = _nifti_sizes(head)
    if sizes is None:
        raise InputImageError(f"Cannot read the {name} image {path}: it is not a NIfTI file (no NIfTI-1 or -2 header).")
    offset, needed = sizes
    if total < offset + needed:
        raise InputImageError(
            f"Cannot read the {name} image {path}: it is damaged or incomplete (its header announces {needed} "
            f"bytes of voxel data but the file holds {max(total - offset, 0)}); copy or export it again."
        )


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith((".nii", ".nii.gz"))


def read_image_file(path: Path, name: str = "input") -> sitk.Image:
    """Read an image file as stored, refusing NIfTI files whose data is cut short."""
    if _is_nifti(path):
        check_nifti_complete(path, name)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputImageError(f"Cannot read the {name} image {path}: {_sitk_reason(exc)}") from None


def read_image(source: ImageSource, name: str = "input") -> sitk.Image:
    """Read one 3-D scalar image as float32 (file or DICOM folder); pass images through."""
    if isinstance(source, sitk.Image):
        image = source
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise InputImageError(f"The {name} image {path} does not exist.")
        if path.is_dir():
            try:
                image = _read_dicom_series(path)
            except RuntimeError as exc:
                raise InputImageError(f"Cannot read the {name} image {path}: {_sitk_reason(exc)}") from None
        else:
            image = read_image_file(path, name)
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputImageError(
            f"The {name} image must be a 3-D scalar volume; it has {image.GetDimension()} dimensions and "
            f"{image.GetNumberOfComponentsPerPixel()} components per voxel. Split 4-D or colour images first."
        )
    if min(image.GetSize()) < 2:
        raise InputImageError(f"The {name} image has size {image.GetSize()}; a 3-D volume is needed.")
    return sitk.Cast(image, sitk.sitkFloat32)


def is_image_file(path: Path) -> bool:
    """A visible file with an image suffix (hidden files are temporaries of interrupted writes)."""
    return path.is_file() and not path.name.startswith(".") and path.name.lower().endswith(IMAGE_SUFFIXES)


def _stem(path: Path) -> str:
    name = path.name.lower()
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def find_case_channels(case_dir: Path, card: ModelCard) -> list[Path]:
    """Pick one file per card channel in a case folder (BraTS 2023: ``<case>-t2w.nii.gz`` ...).

    A file matches a channel when its name ends with ``-<key>``/``_<key>`` or equals the key;
    this is how BraTS and most nnU-Net-style folders name modalities.
    """
    files = [p for p in sorted(Path(case_dir).iterdir()) if is_image_file(p)]
    chosen: list[Path] = []
    for channel in card.channels:
        keys = (channel.key, *channel.synonyms)
        hits = [
            p for p in files
            if any(_stem(p) == k or _stem(p).endswith(("-" + k, "_" + k)) for k in keys)
        ]
        if len(hits) != 1:
            found = ", ".join(p.name for p in files) or "no image files"
            what = "no file" if not hits else f"{len(hits)} files ({', '.join(p.name for p in hits)})"
            raise InputImageError(
                f"Case folder {case_dir}: {what} for channel {channel.display_name} "
                f"(expected a name ending in -{channel.key}.nii.gz). Found: {found}."
            )
        chosen.append(hits[0])
    return chosen


def resolve_inputs(inputs: Sequence[ImageSource], card: ModelCard) -> list[ImageSource]:
    """Accept either one source per channel or a single case folder with named channel files."""
    if len(inputs) == 1 and not isinstance(inputs[0], sitk.Image):
        only = Path(inputs[0]).expanduser()
        if not only.exists():
            raise InputImageError(f"The input {only} does not exist.")
        if only.is_dir() and any(is_image_file(p) for p in only.iterdir()):
            return list(find_case_channels(only, card))
        if only.is_dir() and not any(only.iterdir()):
            raise InputImageError(f"The input folder {only} is empty; it should hold one case's images.")
    if len(inputs) != len(card.channels):
        names = ", ".join(c.display_name for c in card.channels)
        raise InputImageError(
            f"{card.display_name} needs {len(card.channels)} input images in this order: {names}; "
            f"got {len(inputs)}."
        )
    return list(inputs)


def _verify_image(tmp: Path, image: sitk.Image) -> None:
    """The written file reads back complete, with ``image``'s grid and voxels."""
    try:
        back = read_image_file(tmp, "written")
    except InputImageError:
        raise OutputError("the file reads back incomplete or damaged") from None
    if not same_grid(back, image):
        raise OutputError("the file reads back on another voxel grid than the one written")
    if not np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image)):
        raise OutputError("the file reads back with other voxel values than those written")


def write_image_atomic(image: sitk.Image, path: str | os.PathLike, compress: bool = True,
                       what: str = "label map") -> Path:
    """Write an image so that ``path`` is either absent/old or complete and verified, never half-written."""
    path = Path(path).expanduser()
    suffix = next((s for s in LABELMAP_SUFFIXES if path.name.lower().endswith(s)), None)
    if suffix is None:
        raise OutputError(f"Unsupported format for the {what} {path}; use {', '.join(LABELMAP_SUFFIXES)}.")
    return write_atomic(
        path,
        lambda tmp: sitk.WriteImage(image, str(tmp), compress),
        lambda tmp: _verify_image(tmp, image),
        what=what,
        suffix=suffix,
    )

"""Reading inputs and writing label maps (SimpleITK): files, DICOM series folders, atomic writes."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import SimpleITK as sitk

from .cards import ModelCard
from .errors import InputImageError

ImageSource = str | os.PathLike | sitk.Image

_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


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


def read_image(source: ImageSource, name: str = "input") -> sitk.Image:
    """Read one 3-D scalar image as float32 (file or DICOM folder); pass images through."""
    if isinstance(source, sitk.Image):
        image = source
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise InputImageError(f"The {name} image {path} does not exist.")
        try:
            image = _read_dicom_series(path) if path.is_dir() else sitk.ReadImage(str(path))
        except RuntimeError as exc:
            raise InputImageError(f"Cannot read the {name} image {path}: {_sitk_reason(exc)}") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputImageError(
            f"The {name} image must be a 3-D scalar volume; it has {image.GetDimension()} dimensions and "
            f"{image.GetNumberOfComponentsPerPixel()} components per voxel. Split 4-D or colour images first."
        )
    if min(image.GetSize()) < 2:
        raise InputImageError(f"The {name} image has size {image.GetSize()}; a 3-D volume is needed.")
    return sitk.Cast(image, sitk.sitkFloat32)


def _is_image_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(_IMAGE_SUFFIXES)


def _stem(path: Path) -> str:
    name = path.name.lower()
    for suffix in _IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def find_case_channels(case_dir: Path, card: ModelCard) -> list[Path]:
    """Pick one file per card channel in a case folder (BraTS 2023: ``<case>-t2w.nii.gz`` ...).

    A file matches a channel when its name ends with ``-<key>``/``_<key>`` or equals the key;
    this is how BraTS and most nnU-Net-style folders name modalities.
    """
    files = [p for p in sorted(Path(case_dir).iterdir()) if _is_image_file(p)]
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
        if only.is_dir() and any(_is_image_file(p) for p in only.iterdir()):
            return list(find_case_channels(only, card))
    if len(inputs) != len(card.channels):
        names = ", ".join(c.display_name for c in card.channels)
        raise InputImageError(
            f"{card.display_name} needs {len(card.channels)} input images in this order: {names}; "
            f"got {len(inputs)}."
        )
    return list(inputs)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_image_atomic(image: sitk.Image, path: str | os.PathLike, compress: bool = True) -> Path:
    """Write an image so that ``path`` is either absent/old or complete, never half-written."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = next((s for s in _IMAGE_SUFFIXES if path.name.lower().endswith(s)), None)
    if suffix is None:
        raise InputImageError(f"Unsupported output format for {path}; use .nii.gz, .nii, .nrrd or .mha.")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        sitk.WriteImage(image, tmp, compress)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions of a new file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path

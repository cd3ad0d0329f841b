"""3D Slicer segmentation files (.seg.nrrd) without Slicer: write and read.

A .seg.nrrd is a NRRD volume (LPS space) whose key/value fields describe the segments
(ID, name, colour, terminology, label value, layer). Label segments share one layer and
are told apart by their label value; derived regions (e.g. BraTS tumour core = labels 1
and 3) overlap the labels, so each gets its own layer with value 1, making the file 4-D
(list axis first). The layout mirrors what Slicer's own storage node writes, so Slicer,
slicerio and any NRRD reader open it. The CLI uses this module; it must not import slicer.
"""

from __future__ import annotations

import gzip
import os
import re
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import SimpleITK as sitk

from ..errors import SegMambaError
from .atomic import OutputError, write_atomic

if TYPE_CHECKING:  # segments are described by the card's label and region fields; io sits below models
    from ..models.cards import LabelSpec, RegionSpec

_BINARY_LABELMAP = "Binary labelmap"
_TERMINOLOGY_TAG = "TerminologyEntry"
_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])
_NRRD_TYPES = {
    np.dtype(np.uint8): "unsigned char",
    np.dtype(np.int8): "signed char",
    np.dtype(np.uint16): "unsigned short",
    np.dtype(np.int16): "short",
    np.dtype(np.uint32): "unsigned int",
    np.dtype(np.int32): "int",
}
# Other spellings of the NRRD types above that NRRD writers use.
_NRRD_TYPE_ALIASES = {
    **dict.fromkeys(("uchar", "uint8", "uint8_t"), "unsigned char"),
    **dict.fromkeys(("int8", "int8_t"), "signed char"),
    **dict.fromkeys(("ushort", "uint16", "uint16_t", "unsigned short int"), "unsigned short"),
    **dict.fromkeys(("short int", "signed short", "int16", "int16_t"), "short"),
    **dict.fromkeys(("uint", "uint32", "uint32_t"), "unsigned int"),
    **dict.fromkeys(("signed int", "int32", "int32_t"), "int"),
}


class SegmentationFileError(SegMambaError):
    """A segmentation file cannot be written, or read as a .seg.nrrd."""


class SegmentationDataError(SegmentationFileError, ValueError):
    """The label map or segment descriptions cannot be stored in a .seg.nrrd (nothing is written).

    Also a ValueError: callers of the Python API caught these as such before they were user-facing.
    """


def terminology_tag_value(terminology: str) -> str:
    """Terminology string as Slicer stores it in a segment tag.

    '|' separates tags in a .seg.nrrd, so a trailing '|' (as model cards may write it) is
    dropped; Slicer's own terminology strings have none either.
    """
    return terminology.rstrip("|")


def _unique(ids: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for base in ids:
        candidate, n = base, 2
        while candidate in seen:
            candidate, n = f"{base}_{n}", n + 1
        seen.add(candidate)
        out.append(candidate)
    return out


def segment_ids(labels: Sequence[LabelSpec], regions: Sequence[RegionSpec] = ()) -> list[str]:
    """Segment IDs: the label names, then the region names (made unique), as Slicer's importer names them."""
    return _unique([label.name for label in labels] + [region.name for region in regions])


def label_layer_array(array: np.ndarray, labels: Sequence[LabelSpec]) -> np.ndarray:
    """The label map as one segmentation layer: smallest unsigned type, unknown values cleared.

    Voxels whose value has no :class:`LabelSpec` belong to no segment; leaving them in the
    shared layer would make them reappear when Slicer edits or merges segments.
    """
    if not np.issubdtype(array.dtype, np.integer):
        raise SegmentationDataError(f"A label map must have an integer voxel type, got {array.dtype}.")
    values = np.array([label.value for label in labels], dtype=np.int64)
    top = int(values.max()) if values.size else 0
    if values.size and (values.min() < 1 or top > np.iinfo(np.uint16).max):
        raise SegmentationDataError("Label values must be integers between 1 and 65535 (0 is background).")
    dtype = np.uint8 if top <= np.iinfo(np.uint8).max else np.uint16
    return np.where(np.isin(array, values), array, 0).astype(dtype)


def _fmt(value: float) -> str:
    """Shortest text that reads back as the same double ("1", "0.85", "-0.123456789012")."""
    text = repr(float(value)) if value != 0 else "0"
    return text.removesuffix(".0")


def _vector(values: Sequence[float]) -> str:
    return "(" + ",".join(_fmt(v) for v in values) + ")"


def _lps_geometry(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Columns = LPS step of one voxel along i, j, k; and the LPS origin."""
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    return direction * np.asarray(image.GetSpacing(), dtype=float), np.asarray(image.GetOrigin(), dtype=float)


def _reference_geometry(steps_lps: np.ndarray, origin_lps: np.ndarray, size: Sequence[int]) -> str:
    """Slicer's serialised reference image geometry: IJK-to-RAS (row-major, 16 values) then extent."""
    ras = np.eye(4)
    ras[:3, :3] = _LPS_FROM_RAS @ steps_lps
    ras[:3, 3] = _LPS_FROM_RAS @ origin_lps
    extent = [v for s in size for v in (0, s - 1)]
    return "".join(f"{_fmt(v)};" for v in ras.ravel()) + "".join(f"{v};" for v in extent)


def _segment_fields(
    index: int,
    segment_id: str,
    name: str,
    color: Sequence[float],
    value: int,
    layer: int,
    extent: str,
    terminology: str | None,
) -> list[str]:
    tags = f"{_TERMINOLOGY_TAG}:{terminology_tag_value(terminology)}|" if terminology else ""
    fields = {
        "Color": " ".join(_fmt(c) for c in color),
        "ColorAutoGenerated": "0",
        "Extent": extent,
        "ID": segment_id,
        "LabelValue": str(value),
        "Layer": str(layer),
        "Name": name,
        "NameAutoGenerated": "0",
        "Tags": tags,
    }
    for key, text in fields.items():
        if "\n" in text:
            raise SegmentationDataError(f"Segment {name!r}: {key} must not contain a line break.")
    return [f"Segment{index}_{key}:={text}" for key, text in fields.items()]


def _header(
    labelmap: sitk.Image, dtype: np.dtype, labels: Sequence[LabelSpec], regions: Sequence[RegionSpec]
) -> str:
    steps, origin = _lps_geometry(labelmap)
    size = labelmap.GetSize()
    layers = 1 + len(regions)
    directions = " ".join(_vector(steps[:, axis]) for axis in range(3))
    lines = [
        "NRRD0004",
        "# Complete NRRD file format specification at:",
        "# http://teem.sourceforge.net/nrrd/format.html",
    ]
    lines.append(f"type: {_NRRD_TYPES[dtype]}")
    lines.append(f"dimension: {3 if layers == 1 else 4}")
    lines.append("space: left-posterior-superior")
    if layers == 1:
        lines += [f"sizes: {size[0]} {size[1]} {size[2]}", f"space directions: {directions}"]
        lines.append("kinds: domain domain domain")
    else:
        lines += [f"sizes: {layers} {size[0]} {size[1]} {size[2]}", f"space directions: none {directions}"]
        lines.append("kinds: list domain domain domain")
    if dtype.itemsize > 1:
        lines.append("endian: little")
    lines += ["encoding: gzip", f"space origin: {_vector(origin)}"]
    extent = " ".join(f"0 {s - 1}" for s in size)
    ids = segment_ids(labels, regions)
    for index, label in enumerate(labels):
        lines += _segment_fields(
            index, ids[index], label.name, label.color, label.value, 0, extent, label.terminology
        )
    for offset, region in enumerate(regions):
        index = len(labels) + offset
        lines += _segment_fields(
            index, ids[index], region.display_name, region.color, 1, 1 + offset, extent, None
        )
    lines.append(f"Segmentation_ContainedRepresentationNames:={_BINARY_LABELMAP}|")
    lines.append(
        "Segmentation_ConversionParameters:=Reference image geometry|"
        f"{_reference_geometry(steps, origin, size)}|&"
    )
    lines.append(f"Segmentation_MasterRepresentation:={_BINARY_LABELMAP}")
    lines.append("Segmentation_ReferenceImageExtentOffset:=0 0 0")
    return "\n".join(lines) + "\n\n"


def _layers(array: np.ndarray, labels: Sequence[LabelSpec], regions: Sequence[RegionSpec]) -> np.ndarray:
    """(z, y, x) for one layer, else (z, y, x, layer): NRRD's first (fastest) axis is the layer."""
    layer0 = label_layer_array(array, labels)
    if not regions:
        return layer0
    known = {label.value for label in labels}
    stack = [layer0]
    for region in regions:
        if not set(region.labels) <= known:
            raise SegmentationDataError(
                f"Region {region.name} uses label values {region.labels} that are not all labels."
            )
        stack.append(np.isin(layer0, region.labels).astype(layer0.dtype))
    return np.stack(stack, axis=-1)


def _write_file(path: Path, header: str, data: np.ndarray) -> None:
    with open(path, "xb") as handle:
        handle.write(header.encode("utf-8"))
        # Level 1: label maps compress almost as well as at level 9, several times faster. No name (the
        # temporary one) and no time in the gzip header: the same segmentation always gives the same bytes.
        with gzip.GzipFile(filename="", fileobj=handle, mode="wb", compresslevel=1, mtime=0) as stream:
            stream.write(np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("<")).tobytes())


def _verify_file(path: Path, layer0: np.ndarray) -> None:
    """The written file reads back with the label layer that was meant (a full disk truncates it)."""
    try:
        back, _ = read_seg_nrrd(path)
    except SegmentationFileError:
        raise OutputError("the file reads back incomplete or damaged") from None
    if not np.array_equal(sitk.GetArrayViewFromImage(back), layer0):
        raise OutputError("the file reads back with other labels than those written")


def write_seg_nrrd(
    labelmap: sitk.Image,
    labels: Sequence[LabelSpec],
    path: str | os.PathLike[str],
    extra_segments: Sequence[RegionSpec] | None = None,
) -> Path:
    """Write a label map as a Slicer segmentation file, on the label map's own grid.

    One segment per label (also when empty, so Slicer shows it with 0 mL), all in layer 0
    with their label value; each region in ``extra_segments`` becomes a binary segment in
    its own layer. The file appears atomically and is read back before it does: readers never see
    a partial file, and a full disk is an :class:`.atomic.OutputError`.
    """
    if labelmap.GetDimension() != 3 or labelmap.GetNumberOfComponentsPerPixel() != 1:
        raise SegmentationDataError("write_seg_nrrd needs a 3-D scalar label map.")
    regions = tuple(extra_segments or ())
    data = _layers(sitk.GetArrayViewFromImage(labelmap), labels, regions)
    header = _header(labelmap, data.dtype, labels, regions)
    layer0 = data if data.ndim == 3 else data[..., 0]
    return write_atomic(
        path, lambda tmp: _write_file(tmp, header, data), lambda tmp: _verify_file(tmp, layer0),
        what="segmentation",
    )


# ---------------------------------------------------------------- reading


def _parse_header(raw: bytes, path: Path) -> tuple[dict[str, str], dict[str, str], int]:
    if not raw.startswith(b"NRRD"):
        raise SegmentationFileError(f"{path} is not a NRRD file.")
    end = raw.find(b"\n\n")
    if end < 0:
        raise SegmentationFileError(f"{path} has no complete NRRD header; the file may be truncated.")
    fields: dict[str, str] = {}
    keyvalues: dict[str, str] = {}
    for line in raw[:end].decode("utf-8", errors="replace").splitlines()[1:]:
        if not line or line.startswith("#"):
            continue
        if ":=" in line:
            key, value = line.split(":=", 1)
            keyvalues[key] = value
        elif ": " in line:
            key, value = line.split(": ", 1)
            fields[key.strip().lower()] = value.strip()
    return fields, keyvalues, end + 2


def _parse_vectors(text: str) -> list[list[float] | None]:
    out: list[list[float] | None] = []
    for token in re.findall(r"\([^)]*\)|none", text):
        out.append(None if token == "none" else [float(v) for v in token.strip("()").split(",")])
    return out


def _voxels(fields: dict[str, str], payload: bytes, path: Path) -> np.ndarray:
    type_name = _NRRD_TYPE_ALIASES.get(fields.get("type", ""), fields.get("type", ""))
    dtypes = {name: dtype for dtype, name in _NRRD_TYPES.items()}
    if type_name not in dtypes or fields.get("encoding") not in ("raw", "gzip", "gz"):
        raise SegmentationFileError(
            f"{path}: voxel type {fields.get('type')!r} with encoding {fields.get('encoding')!r} "
            "is not supported; re-save the segmentation from 3D Slicer."
        )
    dtype = dtypes[type_name].newbyteorder(">" if fields.get("endian") == "big" else "<")
    data = gzip.decompress(payload) if fields["encoding"] != "raw" else payload
    sizes = [int(v) for v in fields["sizes"].split()]
    count = int(np.prod(sizes))
    if len(data) < count * dtype.itemsize:
        raise SegmentationFileError(f"{path} holds fewer voxels than its header says; the file is truncated.")
    return np.frombuffer(data, dtype=dtype, count=count).astype(dtype.newbyteorder("="))


def _segments(keyvalues: dict[str, str]) -> list[dict[str, Any]]:
    segments = []
    index = 0
    while f"Segment{index}_ID" in keyvalues:
        meta = {
            key.split("_", 1)[1]: value
            for key, value in keyvalues.items()
            if key.startswith(f"Segment{index}_")
        }
        tags = dict(pair.split(":", 1) for pair in meta.get("Tags", "").split("|") if ":" in pair)
        segments.append(
            {
                "id": meta["ID"],
                "name": meta.get("Name", meta["ID"]),
                "value": int(meta.get("LabelValue", 1)),
                "layer": int(meta.get("Layer", 0)),
                "color": tuple(float(c) for c in meta.get("Color", "0.5 0.5 0.5").split()),
                "terminology": tags.get(_TERMINOLOGY_TAG),
            }
        )
        index += 1
    return segments


def read_seg_nrrd(path: str | os.PathLike[str], layer: int = 0) -> tuple[sitk.Image, list[dict[str, Any]]]:
    """Read one layer of a .seg.nrrd as a label map with geometry, and that layer's segments.

    Segments are dicts with id, name, value (label value in the layer), layer, color (0-1
    RGB) and terminology (or None). Files that Slicer cropped to their content keep their
    cropped grid (the space origin says where it lies).
    """
    path = Path(path).expanduser()
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SegmentationFileError(f"Could not read {path}: {exc.strerror or exc}.") from exc
    fields, keyvalues, start = _parse_header(raw, path)
    try:
        flat = _voxels(fields, raw[start:], path)
        sizes = [int(v) for v in fields["sizes"].split()]
        vectors = _parse_vectors(fields["space directions"])
        origin = np.array(_parse_vectors(fields["space origin"])[0], dtype=float)
    except (KeyError, ValueError, TypeError, OSError, EOFError, zlib.error) as exc:
        raise SegmentationFileError(f"{path} is not a valid segmentation file ({exc}).") from exc
    if len(sizes) == 4:
        array = flat.reshape(sizes[3], sizes[2], sizes[1], sizes[0])
        if not 0 <= layer < sizes[0]:
            raise SegmentationFileError(f"{path} has {sizes[0]} layers; layer {layer} does not exist.")
        array, vectors = array[..., layer], vectors[1:]
    elif len(sizes) == 3:
        if layer != 0:
            raise SegmentationFileError(f"{path} has one layer; layer {layer} does not exist.")
        array = flat.reshape(sizes[2], sizes[1], sizes[0])
    else:
        raise SegmentationFileError(f"{path} is {len(sizes)}-D; a segmentation is 3-D or 4-D.")
    steps = np.array(vectors, dtype=float).T
    if fields.get("space", "").lower() in ("right-anterior-superior", "ras"):
        steps, origin = _LPS_FROM_RAS @ steps, _LPS_FROM_RAS @ origin
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    spacing = np.linalg.norm(steps, axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((steps / spacing).ravel().tolist())
    image.SetOrigin(origin.tolist())
    return image, [s for s in _segments(keyvalues) if s["layer"] == layer]

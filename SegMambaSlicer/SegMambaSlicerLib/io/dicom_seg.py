"""DICOM Segmentation objects (highdicom): a label map as a DICOM SEG that references its source series.

A PACS or viewer shows a DICOM SEG over the series it references, so the SEG must name that series'
study, series, instances and frame of reference, and place its frames in the series' own patient
coordinates. The label map of a case lies on the grid of its first input (the pipeline maps results
back onto it), so when that input is a DICOM series folder the SEG references it: its files are the
ones SimpleITK's GDCM series reader chose for the pipeline, read again with pydicom for their headers.

One BINARY segment per card label, numbered 1..N in the card's order, with the card's name, colour
(0-1 RGB, stored as DICOM's CIELab) and coded terminology. Labels absent from a case stay in the
segment list with no frames: segment numbers then mean the same in every case of a model, and "no
enhancing tumour" reads as an empty segment (0 mL) rather than as a segment nobody looked for, as in
the .seg.nrrd. highdicom and pydicom are optional (``pip install 'segmamba-slicer[dicom]'``): this
module imports them only when a SEG is made, so the rest of the package works without them.
"""

from __future__ import annotations

import importlib.util
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import SimpleITK as sitk

from ..errors import ModelCardError, SegMambaError
from .atomic import OutputError, write_atomic
from .report import software_version

if TYPE_CHECKING:  # segments are described by the card's label fields; io sits below models
    from pydicom import Dataset

    from ..models.cards import LabelSpec

#: File name endings accepted for a DICOM Segmentation output.
DICOM_SEG_SUFFIXES = (".dcm",)
#: What a SEG copies or references from every source instance; without them it cannot be placed or found.
REQUIRED_SOURCE_ATTRIBUTES = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID",
    "Rows", "Columns", "PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient",
)
#: High, so that viewers list the SEG after the acquired series of the study.
SERIES_NUMBER = 900
_CONTENT_LABEL = "SEGMAMBA"
_INSTALL_HINT = "pip install 'segmamba-slicer[dicom]'"


class DicomSegError(SegMambaError):
    """A DICOM Segmentation cannot be made: highdicom is missing, or the first input is no usable DICOM series."""


class Coded(NamedTuple):
    """One code of a coded concept: scheme designator (e.g. SCT), code value, code meaning."""

    scheme: str
    value: str
    meaning: str


class Terminology(NamedTuple):
    """What a segment is, in codes: property category and type (with modifier), anatomic region (with modifier)."""

    category: Coded
    type: Coded
    type_modifier: Coded | None = None
    region: Coded | None = None
    region_modifier: Coded | None = None


#: Slicer's default terminology for a segment it knows nothing about: category and type "Tissue".
TISSUE = Terminology(Coded("SCT", "85756007", "Tissue"), Coded("SCT", "85756007", "Tissue"))


def _code(text: str) -> Coded | None:
    """``scheme^value^meaning`` as a code; the empty ``^^`` of Slicer's strings is no code."""
    parts = text.split("^", 2)
    if len(parts) != 3:
        raise ValueError(f"{text!r} is not scheme^value^meaning")
    if not any(parts):
        return None
    if not all(parts):
        raise ValueError(f"{text!r} lacks its scheme, value or meaning")
    return Coded(*parts)


def parse_terminology(text: str) -> Terminology:
    """Read a Slicer terminology string (as model cards hold it) into codes; ``ValueError`` if malformed.

    Slicer writes seven ``~``-separated fields: category context, category, type, type modifier,
    anatomic context, anatomic region, region modifier. The context fields name Slicer's lookup tables,
    not concepts, so they are dropped; a trailing ``|`` (a card may copy it from a .seg.nrrd tag) is too.
    """
    fields = text.rstrip("|").split("~")
    if len(fields) != 7:
        raise ValueError(f"it has {len(fields)} '~'-separated fields instead of 7")
    category, kind, kind_modifier = (_code(f) for f in fields[1:4])
    region, region_modifier = (_code(f) for f in fields[5:7])
    if category is None or kind is None:
        raise ValueError("it has no category or no type code")
    return Terminology(category, kind, kind_modifier, region, region_modifier)


def label_terminology(label: LabelSpec) -> Terminology:
    """The codes of a card label: its terminology string, or Slicer's default "Tissue" when it has none."""
    if label.terminology is None:
        return TISSUE
    try:
        return parse_terminology(label.terminology)
    except ValueError as exc:
        raise ModelCardError(
            f"Label {label.name!r} of the model card has a terminology that is not a Slicer terminology string "
            f"({exc}); correct it in the card: seven '~'-separated fields with codes as scheme^value^meaning, "
            "as Slicer writes them."
        ) from None


def check_labels(labels: Sequence[LabelSpec]) -> None:
    """Refuse, before any work, card labels whose terminology cannot be coded in a SEG."""
    for label in labels:
        label_terminology(label)


def check_highdicom() -> None:
    """Refuse, before any work, to promise a SEG that cannot be written for want of highdicom."""
    if importlib.util.find_spec("highdicom") is None:  # it brings pydicom
        raise DicomSegError(f"Writing a DICOM segmentation needs the highdicom package; install it: {_INSTALL_HINT}")


def check_dicom_source(first_input: Path) -> None:
    """Refuse, before any work, a SEG whose first input is not a DICOM series folder.

    The SEG references the series its label map lies on, the first input's; an image file (NIfTI,
    NRRD, ...) or a case folder of image files has no DICOM identity to reference.
    """
    from .images import is_image_file

    path = Path(first_input).expanduser()
    if not path.is_dir() or any(is_image_file(p) for p in path.iterdir()):
        raise DicomSegError(
            f"A DICOM segmentation references the DICOM series of the first input, but {path} is not a DICOM "
            "series folder; give the first input as the folder of its DICOM files, or write no DICOM segmentation."
        )


def _series_files(folder: Path) -> list[str]:
    """The files of the folder's one series, as the pipeline's reader (SimpleITK with GDCM) chooses them."""
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if len(series) != 1:
        what = "no DICOM series" if not series else f"{len(series)} DICOM series"
        raise DicomSegError(
            f"The first input {folder} holds {what}; a DICOM segmentation references exactly one, so give "
            "the folder of that one series."
        )
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0]))


def read_source_series(folder: Path) -> tuple[Dataset, ...]:
    """The headers (no pixels) of the series in ``folder`` that the SEG will reference, checked.

    Fast (pydicom, headers only), so it runs before the model loads: a series the SEG cannot reference
    is refused before any work.
    """
    folder = Path(folder).expanduser()
    return read_source_files(_series_files(folder), str(folder))


def read_source_files(files: Sequence[str | Path], where: str) -> tuple[Dataset, ...]:
    """The headers of the given DICOM files (one series, e.g. Slicer's DICOM database files), checked.

    ``where`` names the series in messages (a folder, or the volume the files were loaded as).
    """
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    try:
        datasets = tuple(dcmread(f, stop_before_pixels=True) for f in files)
    except (OSError, InvalidDicomError, EOFError) as exc:
        raise DicomSegError(f"Cannot read the DICOM files of {where}: {exc}.") from None
    if not datasets:
        raise DicomSegError(f"{where} has no DICOM files to reference.")
    missing = sorted({name for ds in datasets for name in REQUIRED_SOURCE_ATTRIBUTES if not ds.get(name)})
    if missing:
        raise DicomSegError(
            f"The DICOM series in {where} lacks {', '.join(missing)}, which a DICOM segmentation must "
            "reference; use the series as the scanner or PACS exported it, with its full headers."
        )
    return datasets


def _affine(image: sitk.Image) -> np.ndarray:
    """Voxel index (slice, row, column), the (z, y, x) order of SimpleITK's arrays, to patient LPS in mm."""
    steps = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3) * np.asarray(image.GetSpacing())
    affine = np.eye(4)
    affine[:3, :3] = steps[:, ::-1]
    affine[:3, 3] = image.GetOrigin()
    return affine


def segment_numbers(array: np.ndarray, labels: Sequence[LabelSpec]) -> np.ndarray:
    """Each voxel's segment number: its label's 1-based place in the card; values of no label become 0.

    DICOM numbers segments 1, 2, 3... without gaps, while card label values may skip (BraTS 2021: 1, 2, 4).
    """
    numbers = np.zeros(array.shape, dtype=np.uint8 if len(labels) < 256 else np.uint16)
    for number, label in enumerate(labels, start=1):
        numbers[array == label.value] = number
    return numbers


def _concept(code: Coded) -> Any:
    from highdicom.sr import CodedConcept

    return CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def _description(number: int, label: LabelSpec, algorithm: Any) -> Any:
    """The SEG's description of one label: name, codes, CIELab colour, the algorithm that made it."""
    from highdicom.color import CIELabColor
    from highdicom.seg import SegmentAlgorithmTypeValues, SegmentDescription

    terms = label_terminology(label)
    description = SegmentDescription(
        segment_number=number,
        segment_label=label.name,
        segmented_property_category=_concept(terms.category),
        segmented_property_type=_concept(terms.type),
        algorithm_type=SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        anatomic_regions=[_concept(terms.region)] if terms.region else None,
        display_color=CIELabColor.from_rgb(*(255.0 * min(max(c, 0.0), 1.0) for c in label.color)),
    )
    if terms.type_modifier is not None:  # DICOM nests modifiers in the item they modify
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            _concept(terms.type_modifier)
        ]
    if terms.region is not None and terms.region_modifier is not None:
        description.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = [_concept(terms.region_modifier)]
    return description


def make_dicom_seg(
    labelmap: sitk.Image,
    labels: Sequence[LabelSpec],
    source: Sequence[Dataset],
    *,
    algorithm_name: str,
    algorithm_version: str,
) -> Any:
    """The label map as a highdicom ``Segmentation`` (BINARY) referencing the ``source`` series.

    The frames are placed by the label map's own geometry; highdicom matches them to the source
    instances (and takes their exact positions) where they coincide, which they do for a label map on
    the first input's grid.
    """
    from highdicom import UID, AlgorithmIdentificationSequence, Volume
    from highdicom.seg import Segmentation, SegmentationTypeValues
    from pydicom.sr.codedict import codes

    name = algorithm_name[:64]  # DICOM's long strings (LO) hold 64 characters
    numbers = segment_numbers(sitk.GetArrayViewFromImage(labelmap), labels)
    try:
        algorithm = AlgorithmIdentificationSequence(
            name=name, family=codes.DCM.ArtificialIntelligence, version=algorithm_version[:64]
        )
        return Segmentation(
            source_images=list(source),
            pixel_array=Volume(numbers, _affine(labelmap), coordinate_system="PATIENT",
                               frame_of_reference_uid=source[0].FrameOfReferenceUID),
            segmentation_type=SegmentationTypeValues.BINARY,
            segment_descriptions=[_description(n, label, algorithm) for n, label in enumerate(labels, start=1)],
            series_instance_uid=UID(),
            series_number=SERIES_NUMBER,
            sop_instance_uid=UID(),
            instance_number=1,
            manufacturer="SegMambaSlicer",
            manufacturer_model_name=name,
            software_versions=software_version(),
            device_serial_number="0",  # software has none, yet the attribute is mandatory
            content_label=_CONTENT_LABEL,
            content_description=f"{name} segmentation"[:64],
            series_description=f"{name} segmentation"[:64],
            omit_empty_frames=bool(numbers.any()),  # an empty SEG keeps all frames (highdicom would warn)
        )
    except ValueError as exc:  # highdicom's refusals: inconsistent source series, values DICOM cannot hold
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DicomSegError(f"Cannot make a DICOM segmentation of series {source[0].SeriesInstanceUID}: {reason}") from None


def _verify(tmp: Path, seg: Any) -> None:
    """The written file reads back as the SEG that was meant, every frame intact (a full disk cuts it)."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    try:
        back = dcmread(tmp)
    except (InvalidDicomError, EOFError, ValueError, struct.error):
        raise OutputError("the file reads back incomplete or damaged") from None
    if back.get("SOPInstanceUID") != seg.SOPInstanceUID or back.get("PixelData") != seg.PixelData:
        raise OutputError("the file reads back with other frames than those written")


def write_dicom_seg(
    labelmap: sitk.Image,
    labels: Sequence[LabelSpec],
    source: Sequence[Dataset],
    path: str | os.PathLike[str],
    *,
    algorithm_name: str,
    algorithm_version: str,
) -> Path:
    """Write the label map as a DICOM SEG of the ``source`` series (see :func:`make_dicom_seg`), atomically.

    The file appears only complete and read back; a full disk is an :class:`.atomic.OutputError`.
    """
    seg = make_dicom_seg(labelmap, labels, source, algorithm_name=algorithm_name,
                         algorithm_version=algorithm_version)
    return write_atomic(path, lambda tmp: seg.save_as(tmp, enforce_file_format=True),
                        lambda tmp: _verify(tmp, seg), what="DICOM segmentation")

"""Human-readable outputs of a segmentation: a CSV of volumes and a PNG preview through the tumour.

Both are for a quick look outside Slicer (the demo, batch runs): the CSV opens in a spreadsheet, the
PNG shows axial, coronal and sagittal slices through the centre of mass of the segmented voxels with
the card's label colours over the first input channel. Files appear atomically, so a reader never
sees half a file.
"""

from __future__ import annotations

import importlib.metadata
import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

from ..errors import SegMambaError
from .atomic import write_bytes_atomic, write_csv_atomic
from .geometry import direction_matrix, reorder_to

if TYPE_CHECKING:  # files know cards by their fields only: io sits below the models layer
    from ..models.cards import ModelCard

#: Opacity of the label colours over the grey-scale image.
OVERLAY_ALPHA = 0.45
CSV_COLUMNS = ("segment", "description", "label_values", "volume_ml")


def software_version() -> str:
    """The installed segmamba-slicer version; "development" when run from a checkout that is not installed."""
    try:
        return importlib.metadata.version("segmamba-slicer")
    except importlib.metadata.PackageNotFoundError:
        return "development"


class ReportError(SegMambaError):
    """A report file cannot be made (missing plotting library, mismatched images, unwritable folder)."""


def write_volumes_csv(volumes: Mapping[str, float], card: ModelCard, path: str | os.PathLike[str]) -> Path:
    """Write one row per card label, then per region: name, description, label values ("1+3"), volume in mL.

    ``volumes`` is keyed by label and region name, as :func:`.measure.volumes_ml` returns it. Volumes
    are written with six decimals (a thousandth of a cubic millimetre).
    """
    rows = [(label.name, label.abbreviation, str(label.value)) for label in card.labels]
    rows += [(region.name, region.display_name, "+".join(map(str, region.labels))) for region in card.regions]
    missing = [name for name, _, _ in rows if name not in volumes]
    if missing:
        raise ReportError(f"No volume was measured for {', '.join(missing)} of model {card.id}.")
    return write_csv_atomic(path, CSV_COLUMNS, ((name, description, values, f"{volumes[name]:.6f}")
                                                for name, description, values in rows), what="volumes table")


@dataclass(frozen=True)
class PreviewPanel:
    """One slice as displayed: rows top to bottom, columns left to right.

    ``aspect`` is the physical height / width of one pixel; ``left`` and ``right`` name the anatomical
    direction at the panel's left and right edges; ``index`` is the slice number along the view's
    axis counted from the right / anterior / inferior side.
    """

    view: str
    image: np.ndarray
    labels: np.ndarray
    aspect: float
    left: str
    right: str
    index: int


def preview_panels(image: sitk.Image, labelmap: sitk.Image) -> list[PreviewPanel]:
    """Axial, coronal and sagittal slices through the centre of mass of the label map's foreground.

    Radiological convention throughout, whatever the voxel order on disk: the patient's right is on
    the viewer's left in axial and coronal views (seen from the feet / from the front), anterior is at
    the top of axial views, superior at the top of coronal and sagittal views, and sagittal views have
    anterior on the left. Oblique grids are shown on their closest anatomical axes. An empty label map
    gives the middle slices.
    """
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ReportError("The preview needs a 3-D scalar image (one input channel).")
    if labelmap.GetSize() != image.GetSize():
        raise ReportError(
            f"The label map ({labelmap.GetSize()}) is not on the image's grid ({image.GetSize()}); "
            "preview the first input channel that the segmentation was made from."
        )
    # (S, P, L) numpy axes: rows of an axial slice run anterior → posterior, columns right → left.
    reorder = reorder_to(direction_matrix(image), "LPS")
    volume = reorder.forward(sitk.GetArrayViewFromImage(image))
    labels = reorder.forward(sitk.GetArrayViewFromImage(labelmap))
    sx, sy, sz = (image.GetSpacing()[axis] for axis in reorder.source_axis)
    z, y, x = _centre(labels)
    views = (
        ("axial", np.s_[z], sy / sx, "R", "L", z),
        ("coronal", np.s_[::-1, y, :], sz / sx, "R", "L", y),
        ("sagittal", np.s_[::-1, :, x], sz / sy, "A", "P", x),
    )
    # Copies: the arrays must outlive the SimpleITK images they were viewed from.
    return [
        PreviewPanel(view, np.array(volume[cut]), np.array(labels[cut], dtype=np.int64), aspect, left, right, index)
        for view, cut, aspect, left, right, index in views
    ]


def _centre(labels: np.ndarray) -> tuple[int, int, int]:
    """Rounded centre of mass of the non-zero voxels, or the middle of the volume when there are none."""
    points = np.nonzero(labels)
    if points[0].size == 0:
        return tuple(s // 2 for s in labels.shape)  # type: ignore[return-value]
    return tuple(int(round(float(p.mean()))) for p in points)  # type: ignore[return-value]


def write_preview_png(
    images: Sequence[sitk.Image] | sitk.Image,
    labelmap: sitk.Image,
    card: ModelCard,
    path: str | os.PathLike[str],
) -> Path:
    """Write a PNG with the three :func:`preview_panels` of the first image, label colours overlaid.

    Radiological convention (patient's right on the viewer's left), with the directions written at the
    panel edges. The grey scale spans the 0.5th to 99.5th percentile of the image's non-zero voxels.
    """
    first = images if isinstance(images, sitk.Image) else images[0]
    panels = preview_panels(first, labelmap)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError as exc:
        raise ReportError(f"The PNG preview needs matplotlib (pip install matplotlib): {exc}.") from None
    low, high = grey_window(sitk.GetArrayViewFromImage(first))
    colours = _colour_table(card)
    figure = Figure(figsize=(13.5, 5.0), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    for axes, panel in zip(figure.subplots(1, 3), panels):
        axes.imshow(panel.image, cmap="gray", vmin=low, vmax=high, aspect=panel.aspect, interpolation="nearest")
        axes.imshow(_overlay(colours, panel.labels), aspect=panel.aspect, interpolation="nearest")
        axes.set_title(f"{panel.view} (slice {panel.index})")
        axes.set_xticks([])
        axes.set_yticks([])
        for x, text, align in ((0.01, panel.left, "left"), (0.99, panel.right, "right")):
            axes.text(x, 0.5, text, transform=axes.transAxes, ha=align, va="center", color="white",
                      fontsize=14, fontweight="bold")
    figure.suptitle(card.display_name)
    handles = [Patch(color=label.color, label=f"{label.value}: {label.name}") for label in card.labels]
    figure.legend(handles=handles, loc="outside lower center", ncol=len(handles), frameon=False)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return write_bytes_atomic(path, buffer.getvalue(), what="preview")


def grey_window(array: np.ndarray) -> tuple[float, float]:
    """Grey-scale limits from the non-zero voxels (skull-stripped inputs have a zero background)."""
    values = array[array != 0]
    if values.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(values, [0.5, 99.5])
    return float(low), float(max(high, low + 1e-6))


def _colour_table(card: ModelCard) -> np.ndarray:
    """RGBA per label value 0..255: the card's colours with :data:`OVERLAY_ALPHA`, others transparent."""
    table = np.zeros((256, 4), dtype=np.float32)
    for label in card.labels:
        table[label.value] = (*label.color, OVERLAY_ALPHA)
    return table


def _overlay(colours: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """RGBA image of a label slice; values outside 0..255 stay transparent."""
    inside = (labels >= 0) & (labels < len(colours))
    return colours[np.where(inside, labels, 0)]

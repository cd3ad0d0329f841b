"""A one-page PDF report of one segmented case, for the reader who reviews it outside Slicer.

PDF rather than HTML: one self-contained file of fixed page size that every viewer and browser opens the
same way, that prints as it looks (an HTML page with embedded images reflows with the window and the
printer) and that attaches to a record or an e-mail as it is; matplotlib, already a dependency for the PNG
preview, writes it with the text kept as text and the outlines as vectors, so nothing new is installed.

The page holds what produced the result (model and card, software version, run settings, date, input
file names), three orthogonal views through the largest lesion with the label boundaries outlined in the
card's colours, the region and lesion tables of :mod:`.lesions` (the numbers ``segmamba-slicer measure``
writes), the confidence summary per region when a confidence map is given, the run's warnings, and the
research-use disclaimer. Everything is laid out in inches from the top of an A4 page: the warnings are cut
to a few lines, and the lesion table gets the rows that are left and says how many lesions it leaves out
(``segmamba-slicer measure`` lists them all), so that the page does not spill over.
"""

from __future__ import annotations

import io
import math
import os
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import SimpleITK as sitk

from ..io.atomic import write_bytes_atomic
from ..io.images import ImageSource
from ..io.report import (
    PreviewPanel,
    ReportError,
    grey_window,  # the preview PNG's grey levels, so both show the same
    preview_panels,
    software_version,
)
from .lesions import Lesion, Measurement, measure, measured_regions

if TYPE_CHECKING:  # types only: the report must not pull in PyTorch (the Slicer process may not have it)
    from matplotlib.figure import Figure

    from ..engine.pipeline import SegmentationResult, SegmentOptions
    from ..models.cards import ModelCard

DISCLAIMER = "Research use only. Not a medical device. Results must be reviewed by a qualified reader."
#: Voxels whose confidence is below this are counted per region as "uncertain volume".
CONFIDENCE_THRESHOLD = 0.5

_PAGE = (8.27, 11.69)  # A4 portrait, inches
_MARGIN = 0.55
_BODY = 8.0  # points
_SMALL = 7.0
_LINE = 1.45 / 72  # inches of line height per point of font size
_GREY = "0.35"
_VIEWS_HEIGHT = 2.55  # inches: a title and a square panel of a third of the width
_TINT = 0.25  # opacity of the label colours under the outlines
_WARNING_LINES = 8
#: Whatever the user's matplotlibrc says: the font the layout's widths were measured with (it ships with
#: matplotlib), embedded as TrueType (Type 42) so that viewers draw it sharply and text can be searched.
_STYLE = {"font.family": "DejaVu Sans", "pdf.fonttype": 42}
_HEADING = 10.0  # points
_HEADING_HEIGHT = 0.16 + _HEADING * _LINE  # inches, space included


@dataclass(frozen=True)
class RegionConfidence:
    """Confidence inside one region: its mean (None when the region is empty), the volume below threshold."""

    region: str
    mean: float | None
    below_ml: float


@dataclass(frozen=True)
class _Column:
    title: str
    width: float  # inches
    align: str = "right"


def region_confidence(
    labelmap: sitk.Image, confidence: sitk.Image, card: ModelCard, threshold: float = CONFIDENCE_THRESHOLD
) -> tuple[RegionConfidence, ...]:
    """Per region of :func:`.lesions.measured_regions`: mean confidence and volume (mL) below ``threshold``.

    The volume below threshold says how much of a region the model was unsure about, in the unit of the
    region's volume, so that the two can be compared directly.
    """
    if confidence.GetSize() != labelmap.GetSize():
        raise ReportError(
            f"The confidence map ({confidence.GetSize()}) is not on the label map's grid "
            f"({labelmap.GetSize()}); give the confidence map of the same segmentation."
        )
    labels = sitk.GetArrayViewFromImage(labelmap)
    values = sitk.GetArrayViewFromImage(confidence)
    voxel_ml = math.prod(labelmap.GetSpacing()) / 1000.0
    summary = []
    for region in measured_regions(card):
        inside = values[np.isin(labels, region.values)]
        mean = float(inside.mean()) if inside.size else None
        below_ml = int(np.count_nonzero(inside < threshold)) * voxel_ml
        summary.append(RegionConfidence(region.name, mean, below_ml))
    return tuple(summary)


def largest_lesion(measurement: Measurement, card: ModelCard) -> Lesion | None:
    """The largest lesion of the region that holds every label (BraTS: WT), else the largest of any region.

    The whole-tumour region is preferred because its largest lesion is what a reader looks at first.
    """
    everything = set(card.label_values)
    whole = next((g.name for g in measured_regions(card) if set(g.values) == everything), None)
    pool = [lesion for lesion in measurement.lesions if lesion.region == whole] or list(measurement.lesions)
    return max(pool, key=lambda lesion: lesion.volume_ml, default=None)


def write_case_report(
    path: str | os.PathLike[str],
    result: SegmentationResult,
    image: sitk.Image,
    options: SegmentOptions,
    inputs: Sequence[ImageSource],
) -> Path:
    """Write the one-page PDF report of ``result`` atomically and return its path.

    ``image`` is the first input channel on the label map's grid (the background of the views);
    ``options`` are the run's options (shown with the card's values where they left one unset); ``inputs``
    are the sources in the card's channel order, shown by file or folder name. The confidence summary
    appears when ``result.confidence`` is set (``SegmentOptions(confidence=True)``).
    """
    try:
        import matplotlib
        from matplotlib.backends.backend_pdf import FigureCanvasPdf
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ReportError(f"The PDF report needs matplotlib (pip install matplotlib): {exc}.") from None
    buffer = io.BytesIO()
    with matplotlib.rc_context(_STYLE):
        figure = Figure(figsize=_PAGE)
        FigureCanvasPdf(figure)
        _draw(_Page(figure), result, image, options, inputs)
        metadata = {"Title": "Segmentation report", "Creator": f"segmamba-slicer {software_version()}"}
        figure.savefig(buffer, format="pdf", metadata=metadata)
    return write_bytes_atomic(path, buffer.getvalue(), what="report")


# ---------------------------------------------------------------- layout


class _Page:
    """A figure addressed in inches from its top-left corner and filled top to bottom by a cursor ``y``."""

    def __init__(self, figure: Figure) -> None:
        self.figure = figure
        self.width, self.height = (float(v) for v in figure.get_size_inches())
        self.y = _MARGIN
        self.right = self.width - _MARGIN

    def text(self, x: float, y: float, text: str, size: float = _BODY, **style: Any) -> None:
        """Text with its baseline ``y`` inches from the top; never mathtext (file names may hold ``$``)."""
        self.figure.text(x / self.width, 1.0 - y / self.height, text, fontsize=size, va="baseline",
                         parse_math=False, **style)

    def line(self, text: str, size: float = _BODY, x: float = _MARGIN, **style: Any) -> None:
        self.y += size * _LINE
        self.text(x, self.y, text, size, **style)

    def lines(self, texts: Sequence[str], size: float = _SMALL, **style: Any) -> None:
        for text in texts:
            self.line(text, size, **style)

    def heading(self, text: str) -> None:
        self.y += 0.12
        self.line(text, _HEADING, fontweight="bold")
        self.y += 0.04

    def rule(self, y: float, width: float = 0.6) -> None:
        from matplotlib.lines import Line2D

        height = 1.0 - y / self.height
        self.figure.add_artist(Line2D([_MARGIN / self.width, self.right / self.width], [height, height],
                                      color=_GREY, linewidth=width))

    def table(self, columns: Sequence[_Column], rows: Sequence[Sequence[str]]) -> None:
        """A header row in bold, a rule, then one line per row; cells longer than their column are cut."""
        for cells, weight in [([c.title for c in columns], "bold"), *((row, "normal") for row in rows)]:
            self.y += _BODY * _LINE
            x = _MARGIN
            for column, cell in zip(columns, cells):
                at = x + column.width - 0.08 if column.align == "right" else x
                cut = _fit(cell, column.width - 0.08, _BODY)
                self.text(at, self.y, cut, ha=column.align, fontweight=weight)
                x += column.width
            if weight == "bold":
                self.rule(self.y + 0.05)
                self.y += 0.04

    def axes(self, left: float, top: float, width: float, height: float) -> Any:
        """Axes placed in inches from the top-left corner."""
        return self.figure.add_axes((left / self.width, 1.0 - (top + height) / self.height,
                                     width / self.width, height / self.height))


def _chars(width: float, size: float) -> int:
    """How many characters of a ``size``-point sans-serif line fit in ``width`` inches (generous average)."""
    return max(8, int(width * 72.0 / (0.56 * size)))


def _fit(text: str, width: float, size: float) -> str:
    limit = _chars(width, size)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _wrap(text: str, width: float, size: float) -> list[str]:
    return textwrap.wrap(text, _chars(width, size), break_on_hyphens=False) or [""]


# ---------------------------------------------------------------- content


def _draw(page: _Page, result: SegmentationResult, image: sitk.Image, options: SegmentOptions,
          inputs: Sequence[ImageSource]) -> None:
    """The page top to bottom; the lesion table is sized last, from what the sections below it need."""
    card = result.card
    measurement = measure(result.labelmap, card, name="The segmentation")
    confidence = None
    if result.confidence is not None:
        confidence = region_confidence(result.labelmap, result.confidence, card)
    _draw_header(page, result, options, inputs)
    _draw_views(page, result.labelmap, image, card, largest_lesion(measurement, card))
    page.heading("Regions")
    page.table(*_region_table(measurement, card, confidence))
    page.heading("Lesions")
    notes = _notes(page, confidence is not None)
    warnings = _warning_lines(result.warnings, page.right - _MARGIN)
    # Below the lesion rows: the rule under their header, notes, warnings, a little air above the footer.
    trailing = 0.04 + 0.06 + _HEADING_HEIGHT + (len(notes) + max(1, len(warnings))) * _SMALL * _LINE + 0.1
    rows_left = (_footer_top(page) - page.y - trailing) / (_BODY * _LINE) - 1  # minus the header row
    columns, rows, hidden = _lesion_table(measurement, max(2, int(rows_left)))
    page.table(columns, rows)
    if hidden:
        page.line(f"… and {hidden} smaller lesions not shown here; segmamba-slicer measure lists them all.")
    page.y += 0.06
    page.lines(notes, color=_GREY)
    page.heading("Warnings")
    page.lines(warnings or ["None."])
    _draw_footer(page)


def _draw_header(page: _Page, result: SegmentationResult, options: SegmentOptions,
                 inputs: Sequence[ImageSource]) -> None:
    card, now = result.card, datetime.now().astimezone()
    page.line("Segmentation report", 16.0, fontweight="bold")
    page.text(page.right, page.y, f"{now:%Y-%m-%d %H:%M} {now:%Z}".strip(), 9.0, ha="right")
    page.y += 0.1
    rows = [
        ("Model", card.display_name),
        ("Model card", card.id),
        ("Software", f"segmamba-slicer {software_version()}"),
        ("Settings", _settings(result, options)),
        ("Run", f"{result.windows} sliding windows in {result.seconds:.1f} s"),
        *(("" if i else "Inputs", f"{channel.display_name}: {_source_name(source)}")
          for i, (channel, source) in enumerate(zip(card.channels, inputs))),
    ]
    indent = _MARGIN + 0.95
    for label, value in rows:
        page.line(label, fontweight="bold")
        first, *more = _wrap(value, page.right - indent, _BODY)
        page.text(indent, page.y, first)
        for line in more:
            page.line(line, x=indent)


def _settings(result: SegmentationResult, options: SegmentOptions) -> str:
    """The run settings as used: the card's value where the run left one unset, marked "(card)"."""
    inference = result.card.inference
    overlap = f"{inference.overlap:g} (card)" if options.overlap is None else f"{options.overlap:g}"
    batch = f"{inference.sw_batch_size} (card)" if not options.sw_batch_size else str(options.sw_batch_size)
    precision = "on" if options.mixed_precision and result.device.startswith("cuda") else "off"  # CUDA only
    return (f"device {result.device} · overlap {overlap} · windows per batch {batch} · "
            f"TTA {'on' if options.tta else 'off'} · mixed precision {precision}")


def _source_name(source: ImageSource) -> str:
    return "(image given in memory)" if isinstance(source, sitk.Image) else Path(source).name


def _draw_views(page: _Page, labelmap: sitk.Image, image: sitk.Image, card: ModelCard,
                lesion: Lesion | None) -> None:
    """Axial, coronal and sagittal slices of ``image`` through the lesion's centroid, label boundaries drawn.

    :func:`.preview_panels` cuts and orients the slices; cutting the label map with it too (as the image,
    through the same point) gives label slices in exactly the same orientation.
    """
    page.heading("Views through the largest lesion")
    seed = _point_mask(labelmap, lesion)
    pictures, label_slices = preview_panels(image, seed), preview_panels(labelmap, seed)
    low, high = grey_window(sitk.GetArrayViewFromImage(image))
    top, gap = page.y + 0.05, 0.15
    width = (page.right - _MARGIN - 2 * gap) / 3
    for i, (picture, labels) in enumerate(zip(pictures, label_slices)):
        axes = page.axes(_MARGIN + i * (width + gap), top + 0.2, width, _VIEWS_HEIGHT - 0.2)
        _draw_panel(axes, picture, labels.image, (low, high), card)
    page.y = top + _VIEWS_HEIGHT
    _draw_legend(page, card)
    where = (f"through the centroid of the largest {lesion.region} lesion ({lesion.volume_ml:.2f} mL)"
             if lesion is not None else "no lesion: middle slices")
    page.line(f"Grey: {card.channels[0].display_name}; {where}; radiological convention (patient's right on "
              "the left); physical aspect.", _SMALL, color=_GREY)


def _point_mask(labelmap: sitk.Image, lesion: Lesion | None) -> sitk.Image:
    """A mask of one voxel at the lesion's centroid (empty without a lesion): where the views cross."""
    mask = sitk.Image(labelmap.GetSize(), sitk.sitkUInt8)
    mask.CopyInformation(labelmap)
    if lesion is not None:
        r, a, s = lesion.centroid_ras
        index = labelmap.TransformPhysicalPointToContinuousIndex((-r, -a, s))
        mask[tuple(int(round(v)) for v in index)] = 1
    return mask


def _draw_panel(axes: Any, picture: PreviewPanel, labels: np.ndarray, window: tuple[float, float],
                card: ModelCard) -> None:
    """The grey slice, each label outlined in its colour over a light tint of it.

    Neighbouring labels share their boundary, where one outline covers the other; the tint keeps a label
    that is enclosed by another (BraTS: necrosis inside the enhancing rim) visible.
    """
    axes.imshow(picture.image, cmap="gray", vmin=window[0], vmax=window[1], aspect=picture.aspect,
                interpolation="nearest")
    tint = np.zeros((*labels.shape, 4))
    for label in card.labels:
        inside = labels == label.value
        if inside.any():
            tint[inside] = (*label.color, _TINT)
            axes.contour(inside.astype(np.float32), levels=[0.5], colors=[label.color], linewidths=1.0)
    axes.imshow(tint, aspect=picture.aspect, interpolation="nearest")
    axes.set_anchor("N")  # panels of different physical heights hang from one line, titles aligned
    axes.set_title(f"{picture.view} · slice {picture.index}", fontsize=_BODY)
    axes.set_xticks([])
    axes.set_yticks([])
    for x, text, align in ((0.02, picture.left, "left"), (0.98, picture.right, "right")):
        axes.text(x, 0.5, text, transform=axes.transAxes, ha=align, va="center", color="white", fontsize=9,
                  fontweight="bold")


def _draw_legend(page: _Page, card: ModelCard) -> None:
    """One row under the views: the outline colour of each label."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=label.color, linewidth=1.5) for label in card.labels]
    names = [f"{lab.abbreviation}: {lab.name}" if lab.abbreviation else lab.name for lab in card.labels]
    page.figure.legend(handles, names, loc="upper center", ncol=len(names), frameon=False, fontsize=_SMALL,
                       bbox_to_anchor=(0.5, 1.0 - page.y / page.height))
    page.y += 0.22


def _region_descriptions(card: ModelCard) -> dict[str, str]:
    """Names as :func:`.lesions.measured_regions` gives them → what they are, for the region table."""
    described = {label.abbreviation or label.name: label.name for label in card.labels}
    described.update({region.name: region.display_name for region in card.regions})
    return described


def _region_table(measurement: Measurement, card: ModelCard,
                  confidence: Sequence[RegionConfidence] | None) -> tuple[list[_Column], list[list[str]]]:
    columns = [_Column("Region", 0.6, "left"), _Column("Description", 2.0, "left"),
               _Column("Volume (mL)", 0.85), _Column("Lesions", 0.6), _Column("Measurable", 0.8),
               _Column("SPD (mm²)", 0.85)]
    described = _region_descriptions(card)
    rows = [[region.name, described.get(region.name, ""), f"{region.volume_ml:.2f}", str(len(region.lesions)),
             str(sum(lesion.measurable for lesion in region.lesions)), f"{region.sum_of_products_mm2:.1f}"]
            for region in measurement.regions]
    if confidence is not None:
        columns += [_Column("Mean conf.", 0.75), _Column(f"< {CONFIDENCE_THRESHOLD:g} (mL)", 0.75)]
        for row, summary in zip(rows, confidence):
            row += ["—" if summary.mean is None else f"{summary.mean:.3f}", f"{summary.below_ml:.2f}"]
    return columns, rows


def _lesion_table(measurement: Measurement, budget: int) -> tuple[list[_Column], list[list[str]], int]:
    """At most ``budget`` rows of lesions, each region's largest first, and how many lesions were left out.

    When not all fit, one row is kept for the line that counts the others (see :func:`_shares`).
    """
    columns = [_Column("Lesion", 0.7, "left"), _Column("Volume (mL)", 0.9),
               _Column("Axial diameters (mm)", 1.55), _Column("Product (mm²)", 1.05),
               _Column("Measurable", 0.85), _Column("Centroid RAS (mm)", 2.1)]
    counts = [len(region.lesions) for region in measurement.regions]
    shares = _shares(counts, budget if sum(counts) <= budget else budget - 1)
    rows = [_lesion_row(f"{region.name} {number}", lesion)
            for region, share in zip(measurement.regions, shares)
            for number, lesion in enumerate(region.lesions[:share], start=1)]
    if not measurement.lesions:
        rows = [["none", "", "", "", "", ""]]
    return columns, rows, sum(counts) - sum(shares)


def _shares(counts: Sequence[int], rows: int) -> list[int]:
    """Rows per region, given one at a time in turn to each region with lesions left.

    Taking turns keeps every region in the table: one region's many small lesions cannot push out
    another region's (e.g. the enhancing lesions that RANO measures).
    """
    shares = [0] * len(counts)
    while rows > 0 and shares != list(counts):
        for i, count in enumerate(counts):
            if rows > 0 and shares[i] < count:
                shares[i] += 1
                rows -= 1
    return shares


def _lesion_row(name: str, lesion: Lesion) -> list[str]:
    longest, perpendicular = lesion.axial_diameters_mm
    centroid = "(" + ", ".join(f"{v:.1f}" for v in lesion.centroid_ras) + ")"
    return [name, f"{lesion.volume_ml:.3f}", f"{longest:.1f} × {perpendicular:.1f}",
            f"{lesion.product_mm2:.1f}", "yes" if lesion.measurable else "no", centroid]


def _notes(page: _Page, with_confidence: bool) -> list[str]:
    """How to read the tables, under the lesion table (wrapped to the page)."""
    texts = [
        "Lesions are the 26-connected parts of each region. Axial diameters: the longest diameter on the "
        "axial slice where it is longest and the longest diameter perpendicular to it, between voxel "
        "centres (up to one voxel shorter than the outer extent). Measurable when both are at least 10 mm "
        "(RANO); SPD is the sum of the products of the measurable lesions. Details: docs/review.md.",
        (f"Confidence: 1 − normalised entropy of the prediction per voxel (1 = certain), a relative measure "
         f"and not a calibrated probability; '< {CONFIDENCE_THRESHOLD:g}' is the volume of the region whose "
         f"confidence is below {CONFIDENCE_THRESHOLD:g}.")
        if with_confidence else "Confidence: not computed for this run.",
    ]
    return [line for text in texts for line in _wrap(text, page.right - _MARGIN, _SMALL)]


def _warning_lines(warnings: Sequence[str], width: float) -> list[str]:
    """The warnings wrapped to ``width``, at most :data:`_WARNING_LINES` lines (the run prints them all)."""
    lines = [line for warning in warnings for line in _wrap(f"• {warning}", width, _SMALL)]
    if len(lines) <= _WARNING_LINES:
        return lines
    return [*lines[: _WARNING_LINES - 1], "… more warnings: see the messages of the run."]


def _footer_top(page: _Page) -> float:
    return page.height - _MARGIN - 0.3


def _draw_footer(page: _Page) -> None:
    """The disclaimer at the foot of the page, whatever the content above it."""
    top = _footer_top(page)
    page.rule(top)
    page.text(page.width / 2, top + 0.22, DISCLAIMER, 9.0, ha="center", fontweight="bold")

"""The one-page PDF report: what it says against independent computations, its page count, its output checks.

The PDF is read with a few lines of standard PDF (ISO 32000) rather than a PDF library, which the project
does not depend on: each ``BT … ET`` text object of the page's zlib-compressed content stream is decoded
through the ``/ToUnicode`` map of the font it selects (``Tf``), the map every font must carry for text to
be searched and copied in viewers. It does not rely on how matplotlib numbers its glyphs.
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from SegMambaSlicerLib.cli import main
from SegMambaSlicerLib.engine.pipeline import SegmentationResult, SegmentOptions, segment
from SegMambaSlicerLib.evaluation.case_report import region_confidence, write_case_report
from SegMambaSlicerLib.evaluation.lesions import measure
from SegMambaSlicerLib.evaluation.phantom import MODALITIES, make_phantom, write_brats_case
from SegMambaSlicerLib.io import atomic
from SegMambaSlicerLib.io.atomic import OutputError
from SegMambaSlicerLib.io.report import ReportError
from SegMambaSlicerLib.models.cards import builtin_cards, load_card
from toy_models import write_tiny_brats_card

DISCLAIMER = "Research use only. Not a medical device. Results must be reviewed by a qualified reader."
SHAPE = (48, 48, 32)


# ---------------------------------------------------------------- reading the PDF

_OBJECT = re.compile(rb"(?:^|[\r\n])(\d+) 0 obj\b")
_STREAM = re.compile(rb"stream\r?\n")
_HEX = rb"<([0-9A-Fa-f]+)>"
_TOKEN = re.compile(rb"\((?:\\.|[^\\()])*\)|/[^\s/\[\]()<>]+|\b(?:BT|ET|Tf)\b", flags=re.S)


def _objects(data: bytes) -> dict[int, tuple[bytes, bytes | None]]:
    """Object number → (its dictionary, its stream inflated, or None).

    Objects are cut at the next object's header, and a compressed stream is inflated until zlib itself
    says it ended: searching for "endstream"/"endobj" would cut streams whose bytes happen to hold them.
    """
    starts = [(m.start(1), int(m.group(1))) for m in _OBJECT.finditer(data)]
    objects = {}
    for (start, number), (end, _) in zip(starts, [*starts[1:], (len(data), 0)]):
        body = data[start:end]
        stream = _STREAM.search(body)
        if stream is None or b"/Length" not in body[: stream.start()]:
            objects[number] = (body, None)
            continue
        dictionary, content = body[: stream.start()], body[stream.end():]
        inflated = zlib.decompressobj().decompress(content) if b"/FlateDecode" in dictionary else content
        objects[number] = (dictionary, inflated)
    return objects


def _reference(dictionary: bytes, key: bytes) -> int:
    found = re.search(rb"/" + key + rb"\s+(\d+) 0 R", dictionary)
    assert found is not None, f"no /{key.decode()} in {dictionary[:200]!r}"
    return int(found.group(1))


def _to_unicode(cmap: bytes) -> tuple[int, dict[bytes, str]]:
    """A ToUnicode CMap's code width in bytes and its map code → text (bfchar and both forms of bfrange)."""
    width = len(re.search(rb"begincodespacerange\s*" + _HEX, cmap).group(1)) // 2
    table: dict[bytes, str] = {}
    for block in re.findall(rb"beginbfchar(.*?)endbfchar", cmap, flags=re.S):
        for code, text in re.findall(_HEX + rb"\s*" + _HEX, block):
            table[bytes.fromhex(code.decode())] = bytes.fromhex(text.decode()).decode("utf-16-be")
    for block in re.findall(rb"beginbfrange(.*?)endbfrange", cmap, flags=re.S):
        for low, high, target in re.findall(_HEX + rb"\s*" + _HEX + rb"\s*(\[.*?\]|<[0-9A-Fa-f]+>)", block):
            first, last = int(low, 16), int(high, 16)
            targets = [bytes.fromhex(t.decode()) for t in re.findall(_HEX, target)]
            for offset in range(last - first + 1):
                if target.startswith(b"["):
                    text = targets[offset].decode("utf-16-be")
                else:
                    start = int.from_bytes(targets[0], "big") + offset
                    text = start.to_bytes(len(targets[0]), "big").decode("utf-16-be")
                table[(first + offset).to_bytes(width, "big")] = text
    return width, table


def _unescape(literal: bytes) -> bytes:
    """A PDF literal string's bytes without its parentheses (\\n \\r \\t \\b \\f, octal \\ddd, \\x → x)."""
    named = {b"n": b"\n", b"r": b"\r", b"t": b"\t", b"b": b"\b", b"f": b"\f"}

    def one(match: re.Match[bytes]) -> bytes:
        escaped = match.group(1)
        return bytes([int(escaped, 8)]) if escaped[:1].isdigit() else named.get(escaped, escaped)

    return re.sub(rb"\\([0-7]{1,3}|.)", one, literal[1:-1], flags=re.S)


def read_pdf(path: Path) -> tuple[int, list[str]]:
    """The number of pages and the text of every text object on them, in drawing order."""
    data = path.read_bytes()
    assert data.startswith(b"%PDF-") and data.rstrip().endswith(b"%%EOF")
    objects = _objects(data)
    pages = [n for n, (dictionary, _) in objects.items() if re.search(rb"/Type\s*/Page\b", dictionary)]
    texts: list[str] = []
    for page in pages:
        resources = objects[_reference(objects[page][0], b"Resources")][0]
        font_names = objects[_reference(resources, b"Font")][0]
        fonts = {name: _to_unicode(objects[_reference(objects[int(number)][0], b"ToUnicode")][1])
                 for name, number in re.findall(rb"/(\S+?)\s+(\d+) 0 R", font_names)}
        font, name, parts = fonts[next(iter(fonts))], b"", []
        for token in _TOKEN.finditer(objects[_reference(objects[page][0], b"Contents")][1]):
            value = token.group()
            if value == b"BT":
                parts = []
            elif value == b"ET":
                texts.append("".join(parts))
            elif value == b"Tf":
                font = fonts[name]
            elif value.startswith(b"/"):
                name = value[1:]
            else:
                width, table = font
                raw = _unescape(value)
                parts += [table.get(raw[i:i + width], "?") for i in range(0, len(raw), width)]
    return len(pages), texts


# ---------------------------------------------------------------- one case through the command line


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A phantom through ``predict --report`` with the tiny model (random weights: many small lesions)."""
    root = tmp_path_factory.mktemp("report")
    card = write_tiny_brats_card(root)
    inputs = write_brats_case(make_phantom(shape=SHAPE, seed=1), root / "in", "Case")
    out = root / "out"
    argv = ["predict", "-m", str(card), "-i", *(str(inputs[k]) for k in MODALITIES),
            "-o", str(out / "seg.nii.gz"), "--device", "cpu", "--quiet", "--report", str(out / "report.pdf")]
    assert main(argv) == 0
    return {"card": card, "out": out, **{key: inputs[key] for key in MODALITIES}}


def test_report_is_one_page_with_model_settings_inputs_and_disclaimer(case: dict[str, Path]) -> None:
    pages, texts = read_pdf(case["out"] / "report.pdf")
    card = load_card(case["card"])
    assert pages == 1
    for expected in (card.display_name, card.id, DISCLAIMER, "segmamba-slicer ", "device cpu",
                     "overlap 0.5 (card)", "windows per batch 1 (card)", "TTA off",
                     "T2-weighted: Case-t2w.nii.gz", "T1 post-contrast: Case-t1c.nii.gz",
                     "axial · slice", "coronal · slice", "sagittal · slice"):
        assert any(expected in text for text in texts), expected


def test_report_holds_the_regions_and_lesions_that_measure_computes(case: dict[str, Path]) -> None:
    """Independent of the report's code: evaluation.lesions on the label map the command wrote."""
    _, texts = read_pdf(case["out"] / "report.pdf")
    card = load_card(case["card"])
    measurement = measure(sitk.ReadImage(str(case["out"] / "seg.nii.gz")), card)
    cells = set(texts)
    for region in measurement.regions:
        row = {region.name, f"{region.volume_ml:.2f}", str(len(region.lesions)),
               f"{region.sum_of_products_mm2:.1f}"}
        assert row <= cells, (region.name, row - cells)
        largest = region.lesions[0]  # every region keeps at least its largest lesion on the page
        longest, perpendicular = largest.axial_diameters_mm
        row = {f"{region.name} 1", f"{largest.volume_ml:.3f}", f"{longest:.1f} × {perpendicular:.1f}",
               f"{largest.product_mm2:.1f}", "yes" if largest.measurable else "no"}
        assert row <= cells, (region.name, row - cells)
    shown = sum(bool(re.fullmatch(r"(TC|WT|ET) \d+", text)) for text in texts)
    hidden = len(measurement.lesions) - shown
    assert hidden > 0  # the random model's speckle: more lesions than the page holds
    assert f"… and {hidden} smaller lesions not shown here; segmamba-slicer measure lists them all." in cells


def test_report_computes_and_summarises_the_confidence(case: dict[str, Path]) -> None:
    """``--report`` alone turns the confidence on; its means and volumes below 0.5 match a direct count."""
    _, texts = read_pdf(case["out"] / "report.pdf")
    inputs = [str(case[key]) for key in MODALITIES]
    result = segment(inputs, load_card(case["card"]), SegmentOptions(device="cpu", confidence=True))
    labels = sitk.GetArrayFromImage(result.labelmap)
    written = sitk.ReadImage(str(case["out"] / "seg.nii.gz"))
    np.testing.assert_array_equal(labels, sitk.GetArrayFromImage(written))
    confidence = sitk.GetArrayFromImage(result.confidence)
    voxel_ml = float(np.prod(result.labelmap.GetSpacing())) / 1000.0
    assert "Mean conf." in texts and "< 0.5 (mL)" in texts
    for values in ((1, 3), (1, 2, 3), (3,)):  # TC, WT, ET
        inside = confidence[np.isin(labels, values)]
        assert f"{inside.mean():.3f}" in texts
        assert f"{np.count_nonzero(inside < 0.5) * voxel_ml:.2f}" in texts


def test_report_leaves_no_temporary_file(case: dict[str, Path]) -> None:
    assert sorted(p.name for p in case["out"].iterdir()) == ["report.pdf", "seg.nii.gz"]


# ---------------------------------------------------------------- output checks


def test_report_that_names_an_input_is_refused_before_any_work(case: dict[str, Path], tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    inputs = [str(case[key]) for key in MODALITIES]
    before = Path(inputs[0]).read_bytes()
    link = tmp_path / "report.pdf"
    link.symlink_to(inputs[0])  # a report name that passes the suffix check but is the T2w image
    refusals = ((inputs[0], "Unsupported format for the report"), (str(link), "would destroy the input"))
    for report, message in refusals:
        argv = ["predict", "-m", str(case["card"]), "-i", *inputs, "-o", str(tmp_path / "seg.nii.gz"),
                "--device", "cpu", "--quiet", "--report", report]
        assert main(argv) == 1
        assert message in capsys.readouterr().err
    assert Path(inputs[0]).read_bytes() == before
    assert not (tmp_path / "seg.nii.gz").exists()


def test_failed_write_keeps_the_previous_report_and_no_temporary_file(
    case: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inputs = [str(case[key]) for key in MODALITIES]
    result = segment(inputs, load_card(case["card"]), SegmentOptions(device="cpu"))
    target = tmp_path / "report.pdf"
    target.write_bytes(b"previous report")

    def no_rename(source: object, destination: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", no_rename)
    with pytest.raises(OutputError, match="report"):
        write_case_report(target, result, sitk.ReadImage(inputs[0]), SegmentOptions(device="cpu"), inputs)
    assert target.read_bytes() == b"previous report"
    assert [p.name for p in tmp_path.iterdir()] == ["report.pdf"]


# ---------------------------------------------------------------- the parts, on hand-made images


def _image(array: np.ndarray, spacing: tuple[float, float, float] = (1.0, 1.0, 2.0)) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    return image


def test_region_confidence_by_hand() -> None:
    card = builtin_cards()["segmamba-brats2023"]
    labels = np.zeros((4, 5, 6), np.uint8)
    labels[0, 0, :3] = (1, 2, 3)
    confidence = np.ones(labels.shape, np.float32)
    confidence[0, 0, :3] = (0.2, 0.9, 0.4)
    summary = {s.region: s for s in region_confidence(_image(labels), _image(confidence), card)}
    voxel_ml = 2.0 / 1000
    assert summary["TC"].mean == pytest.approx(0.3) and summary["TC"].below_ml == pytest.approx(2 * voxel_ml)
    assert summary["WT"].mean == pytest.approx(0.5) and summary["WT"].below_ml == pytest.approx(2 * voxel_ml)
    assert summary["ET"].mean == pytest.approx(0.4) and summary["ET"].below_ml == pytest.approx(voxel_ml)
    empty = region_confidence(_image(np.zeros_like(labels)), _image(confidence), card)
    assert all(s.mean is None and s.below_ml == 0.0 for s in empty)


def test_empty_segmentation_gives_a_one_page_report_without_lesions(tmp_path: Path) -> None:
    card = builtin_cards()["segmamba-brats2023"]
    image = _image(np.random.default_rng(0).uniform(1, 2, (16, 20, 24)).astype(np.float32))
    labelmap = _image(np.zeros((16, 20, 24), np.uint8))
    warnings = ("The T1 native image has no contrast.",)
    result = SegmentationResult(labelmap, card, "cpu", 1.0, 1, warnings=warnings)
    path = write_case_report(tmp_path / "empty.pdf", result, image, SegmentOptions(tta=True, overlap=0.25),
                             [tmp_path / f"{key}.nii.gz" for key in MODALITIES])
    pages, texts = read_pdf(path)
    assert pages == 1
    for expected in ("none", "no lesion: middle slices", "Confidence: not computed for this run.", "TTA on",
                     "overlap 0.25", "• The T1 native image has no contrast.", DISCLAIMER):
        assert any(expected in text for text in texts), expected


def test_confidence_on_another_grid_is_refused(tmp_path: Path) -> None:
    card = builtin_cards()["segmamba-brats2023"]
    labelmap = _image(np.zeros((16, 20, 24), np.uint8))
    result = SegmentationResult(labelmap, card, "cpu", 1.0, 1,
                                confidence=_image(np.ones((8, 20, 24), np.float32)))
    with pytest.raises(ReportError, match="not on the label map's grid"):
        write_case_report(tmp_path / "r.pdf", result, labelmap, SegmentOptions(), ["a", "b", "c", "d"])
    assert not list(tmp_path.iterdir())

"""Command line: ``models list|show|import|download``, ``demo``, the run options, exit codes and one-line errors."""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from local_http import serve_folder
from PIL import Image
from SegMambaSlicerLib.cli import EXIT_USER_ERROR, build_parser, demo, main
from SegMambaSlicerLib.cli.common import segment_options
from SegMambaSlicerLib.engine.volumes import volumes_ml
from SegMambaSlicerLib.evaluation.metrics import dice
from SegMambaSlicerLib.io.seg_nrrd import read_seg_nrrd
from SegMambaSlicerLib.models import downloads, registry
from SegMambaSlicerLib.models.cache import downloaded_weights_path
from SegMambaSlicerLib.models.cards import builtin_cards, load_card
from SegMambaSlicerLib.models.resources import models_dir

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "segmamba_v1_tiny.pt"
BRATS = "segmamba-brats2023"
PAYLOAD = bytes(range(256)) * 400


def _one_line_error(text: str) -> str:
    assert text.startswith("error: ") and text.count("\n") == 1, text
    return text


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# ---------------------------------------------------------------- models list / show / import


def test_models_list_shows_every_model_and_the_cache(home, capsys) -> None:
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines()[1:-1]}
    assert set(rows) == set(builtin_cards())
    assert "segmamba_v1" in rows[BRATS] and "manual download" in rows[BRATS]
    assert out.splitlines()[-1].startswith(f"user models and downloads: {home}")


def test_unknown_model_is_a_one_line_error(home, capsys) -> None:
    assert main(["models", "show", "no-such-model"]) == EXIT_USER_ERROR
    err = _one_line_error(capsys.readouterr().err)
    assert "No model 'no-such-model'" in err and BRATS in err


def test_import_then_list_and_show(home, tmp_path, capsys) -> None:
    if not FIXTURE.is_file():
        pytest.skip(f"{FIXTURE} not available (needs ../shared/fixtures)")
    checkpoint = tmp_path / "tiny.pt"
    torch.save(torch.load(FIXTURE, map_location="cpu", weights_only=True)["state_dict"], checkpoint)
    assert main(["models", "import", str(checkpoint), "--id", "tiny", "--name", "Tiny V1", "--like", BRATS]) == 0
    assert "imported tiny: segmamba_v1" in capsys.readouterr().out
    assert main(["models", "list"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("tiny "))
    assert row.split()[1:3] == ["segmamba_v1", "ready"] and row.endswith("Tiny V1")
    assert main(["models", "show", "tiny"]) == 0
    out = capsys.readouterr().out
    assert f"sha256 {hashlib.sha256(checkpoint.read_bytes()).hexdigest()}" in out
    assert f"card: {home / 'models' / 'tiny' / 'card.json'}" in out


def test_import_of_a_file_that_is_not_a_checkpoint_leaves_nothing(home, tmp_path, capsys) -> None:
    bad = tmp_path / "weights.pt"
    bad.write_bytes(b"this is not a torch file")
    assert main(["models", "import", str(bad)]) == EXIT_USER_ERROR
    assert "weights.pt is not a readable PyTorch checkpoint" in _one_line_error(capsys.readouterr().err)
    assert _files(home) == []


# ---------------------------------------------------------------- run options of predict and batch


def test_predict_and_batch_take_the_same_run_options() -> None:
    run_options = ["--weights", "w.pt", "--device", "cpu", "--overlap", "0.25", "--sw-batch-size", "3", "--tta",
                   "--no-amp", "--scan-backend", "torch", "--folds", "0", "all", "--quiet"]
    parser = build_parser()
    predict = parser.parse_args(["predict", "-m", "x", "-i", "a.nii.gz", "-o", "b.nii.gz", *run_options])
    batch = parser.parse_args(["batch", "in", "out", "-m", "x", *run_options])
    assert segment_options(predict) == segment_options(batch)
    assert segment_options(batch).folds == ["0", "all"] and not segment_options(batch).mixed_precision


# ---------------------------------------------------------------- models download


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Base URL of a 127.0.0.1 server whose /w.pt holds PAYLOAD; no proxy, no retry pauses."""
    monkeypatch.setattr(downloads, "RETRY_BACKOFF_S", 0.0)
    root = tmp_path / "www"
    root.mkdir()
    (root / "w.pt").write_bytes(PAYLOAD)
    with serve_folder(root, monkeypatch) as url:
        yield url


def _url_card(home: Path, model_id: str, url: str, sha256: str) -> None:
    data = json.loads((models_dir() / f"{BRATS}.json").read_text(encoding="utf-8"))
    data.update(id=model_id, weights={"kind": "url", "url": url, "sha256": sha256})
    path = home / "models" / model_id / "card.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(data))


def test_download_with_the_right_checksum_registers_the_file(home, served, capsys) -> None:
    sha = hashlib.sha256(PAYLOAD).hexdigest()
    _url_card(home, "remote", f"{served}/w.pt", sha)
    assert main(["models", "download", "remote"]) == 0
    captured = capsys.readouterr()
    target = downloaded_weights_path(sha)
    assert target.read_bytes() == PAYLOAD
    assert f"weights of remote: {target}" in captured.out
    assert "100.0% downloading remote (0.1 MB)" in captured.err  # the progress bar
    assert main(["models", "list"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("remote "))
    assert row.split()[2] == "ready"


def test_download_with_a_wrong_checksum_leaves_nothing(home, served, capsys) -> None:
    _url_card(home, "remote", f"{served}/w.pt", hashlib.sha256(b"other bytes").hexdigest())
    assert main(["models", "download", "remote", "--quiet"]) == EXIT_USER_ERROR
    err = _one_line_error(capsys.readouterr().err)
    assert f"has SHA-256 {hashlib.sha256(PAYLOAD).hexdigest()}" in err
    assert not (home / "weights").exists() or _files(home / "weights") == []


def test_download_of_a_manual_card_prints_its_instructions(home, capsys) -> None:
    card = builtin_cards()[BRATS]
    assert main(["models", "download", BRATS]) == EXIT_USER_ERROR
    err = _one_line_error(capsys.readouterr().err)
    assert card.weights.instructions in err and card.weights.url in err
    assert f"models import FILE --like {BRATS}" in err


# ---------------------------------------------------------------- demo


def test_demo_without_the_demo_card_says_so(home, monkeypatch, capsys) -> None:
    cards = {k: v for k, v in builtin_cards().items() if k != "segmamba-demo"}
    monkeypatch.setattr(registry, "builtin_cards", lambda: cards)
    assert main(["demo", "--out", str(home / "out")]) == EXIT_USER_ERROR
    assert "the demo model is not installed in this checkout" in _one_line_error(capsys.readouterr().err)


def test_demo_with_missing_weights_says_so(home, capsys) -> None:
    _url_card(home, "remote", "http://127.0.0.1:9/w.pt", hashlib.sha256(b"x").hexdigest())
    assert main(["demo", "--model", "remote", "--out", str(home / "out")]) == EXIT_USER_ERROR
    err = _one_line_error(capsys.readouterr().err)
    assert "the weights of remote are not installed" in err and "models download remote" in err
    assert not (home / "out").exists()  # nothing generated before the check


def test_demo_dice_is_the_metrics_dice_and_says_when_a_label_is_absent_in_both() -> None:
    card = load_card(models_dir() / f"{BRATS}.json")
    reference = np.zeros((4, 5, 6), dtype=np.uint8)
    predicted = reference.copy()
    reference[0, :3] = 2
    predicted[0, 1:4] = 2
    reference[3, 0, 0] = predicted[3, 0, 1] = 1
    scores = demo._dice_scores(sitk.GetImageFromArray(predicted), sitk.GetImageFromArray(reference), card)
    assert scores["ED Peritumoral edema"] == dice(predicted == 2, reference == 2) == pytest.approx(2 / 3)
    assert scores["NCR Necrotic tumor core"] == 0.0
    assert scores["ET Enhancing tumor"] is None and scores["TC Tumor core (NCR + ET)"] == 0.0


@pytest.fixture
def tiny_card(tmp_path: Path) -> Path:
    """A BraTS-like card for a small random SegMamba V1 (roi 32) with its weights beside it."""
    segmamba_v1 = pytest.importorskip("SegMambaSlicerLib.networks.segmamba_v1")
    kwargs = {"in_chans": 4, "out_chans": 4, "feat_size": [48, 16, 16, 16], "hidden_size": 32}
    torch.manual_seed(0)
    torch.save(segmamba_v1.SegMambaV1(**kwargs).state_dict(), tmp_path / "tiny.pt")
    data = json.loads((models_dir() / f"{BRATS}.json").read_text(encoding="utf-8"))
    data.update(id="tiny-demo", architecture={"name": "segmamba_v1", "kwargs": kwargs},
                weights={"kind": "file", "file": "tiny.pt"})
    data["inference"].update(roi_size=[32, 32, 32], sw_batch_size=1)
    path = tmp_path / "tiny-demo.json"
    path.write_text(json.dumps(data))
    return path


def test_demo_writes_every_output_and_true_dice(tmp_path, tiny_card, capsys) -> None:
    torch.set_num_threads(2)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--shape", "40", "36", "32", "--seed", "5", "--device", "cpu",
                 "--model", str(tiny_card)]) == 0
    printed = capsys.readouterr().out
    case = out / "case" / "Phantom-00005"
    result = out / "segmentation"
    for what, name in (("label map", "seg.nii.gz"), ("segmentation", "seg.seg.nrrd"), ("preview", "preview.png"),
                       ("volumes", "volumes.csv")):
        assert f"{what}: {result / name}" in printed
    assert f"case: {case}" in printed

    seg = sitk.ReadImage(str(result / "seg.nii.gz"))
    truth = sitk.ReadImage(str(case / "Phantom-00005-seg.nii.gz"))
    assert seg.GetSize() == (40, 36, 32) and seg.GetOrigin() == truth.GetOrigin()
    pred, ref = sitk.GetArrayFromImage(seg), sitk.GetArrayFromImage(truth)
    card = load_card(tiny_card)
    for label in card.labels:  # Dice recomputed from the written files
        p, r = pred == label.value, ref == label.value
        total = p.sum() + r.sum()
        expected = "n/a (absent in both)" if total == 0 else f"{2 * (p & r).sum() / total:.3f}"
        assert f"  {label.abbreviation} {label.name}: {expected}" in printed

    with open(result / "volumes.csv", newline="") as fh:
        rows = {row["segment"]: float(row["volume_ml"]) for row in csv.DictReader(fh)}
    assert rows == pytest.approx(volumes_ml(seg, card), abs=1e-6)
    nrrd_labels, segments = read_seg_nrrd(result / "seg.seg.nrrd")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(nrrd_labels), pred)
    assert [s["name"] for s in segments] == [label.name for label in card.labels]
    tumour_core, segments = read_seg_nrrd(result / "seg.seg.nrrd", layer=1)  # regions follow, one per layer
    assert [s["name"] for s in segments] == ["Tumor core (NCR + ET)"]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(tumour_core) > 0, np.isin(pred, (1, 3)))
    with Image.open(result / "preview.png") as png:
        assert png.format == "PNG"


def _predict_argv(card: Path, case: dict[str, Path], out: Path, *options: str) -> list[str]:
    inputs = [str(case[key]) for key in ("t2w", "t2f", "t1n", "t1c")]
    return ["predict", "-m", str(card), "-i", *inputs, "-o", str(out), "--device", "cpu", "-q", *options]


def test_predict_prints_the_estimate_and_measures_this_computer_once(home, tmp_path, card_path, case,
                                                                     one_thread, capsys) -> None:
    """The first run measures (two windows) and says so; the next one reads the rate the first run left."""
    assert main(_predict_argv(card_path, case, tmp_path / "a.nii.gz")) == 0
    first = capsys.readouterr().out
    assert main(_predict_argv(card_path, case, tmp_path / "b.nii.gz")) == 0
    second = capsys.readouterr().out
    ran = [int(line.split(", ")[1].split()[0]) for line in first.splitlines() if line.startswith("device cpu")]
    estimated = [line for line in first.splitlines() if line.startswith("estimate: ")]
    assert "measuring how fast this computer runs this model" in first and len(estimated) == 1
    assert estimated[0].startswith(f"estimate: {ran[0]} window") and " s, peak ~" in estimated[0]
    assert "measuring" not in second and f"estimate: {ran[0]} window" in second
    assert first.index("estimate: ") < first.index("label map: ")  # before the run, not after


def test_predict_stops_before_a_run_the_free_memory_cannot_hold_unless_forced(home, tmp_path, card_path, case,
                                                                              one_thread, capsys) -> None:
    from SegMambaSlicerLib.engine import rates
    from SegMambaSlicerLib.engine.pipeline import SegmentOptions

    key = rates.run_key(load_card(card_path), SegmentOptions(device="cpu"), torch.device("cpu"))
    rates.remember_rate(key, rates.Rate(seconds_per_window=0.1, window_bytes=2**50, window_bytes_exact=True,
                                        weights_bytes=2**20, runtime_bytes=2**28))
    out = tmp_path / "seg.nii.gz"
    assert main(_predict_argv(card_path, case, out)) == EXIT_USER_ERROR
    refused = capsys.readouterr()
    assert "estimate: " in refused.out and "--low-memory" in refused.err and not out.exists()
    assert main(_predict_argv(card_path, case, out, "--force")) == 0
    forced = capsys.readouterr()
    assert "warning: this run needs about" in forced.err and "Running anyway (--force)" in forced.err
    assert out.is_file()

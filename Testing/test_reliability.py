"""Nothing lost, nothing silently wrong: hostile-but-fair inputs, outputs, full disks and signals.

Each test goes through the real path: the ``segmamba-slicer`` command (in process, or as a child process
for signals), real files, a real full or read-only file system (a small tmpfs, mounted where the tests
run as root on Linux; skipped with the reason elsewhere) and real signals.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from dicom_files import write_dicom_series
from filesystems import fill_up, mounted_tmpfs
from interrupted_runs import signal_while_writing
from SegMambaSlicerLib.cli import EXIT_TERMINATED, EXIT_USER_ERROR, handle_sigterm, main
from SegMambaSlicerLib.engine.crop import CropBox
from SegMambaSlicerLib.engine.pipeline import SegmentOptions, segment
from SegMambaSlicerLib.engine.recipes.nnunet import preprocess_nnunet
from SegMambaSlicerLib.engine.recipes.segmamba import preprocess
from SegMambaSlicerLib.errors import InputImageError
from SegMambaSlicerLib.evaluation.phantom import MODALITIES, make_phantom, write_brats_case
from SegMambaSlicerLib.io.atomic import OutputError, write_atomic
from SegMambaSlicerLib.io.images import read_image
from SegMambaSlicerLib.models.cards import Preprocessing
from toy_models import PointwiseNet, case_inputs, pointwise_expected, toy_card

SHAPE = (40, 36, 24)


# ---------------------------------------------------------------- fixtures


def _predict(card: Path, inputs: list[str], output: Path, *extra: str) -> list[str]:
    return ["predict", "--model", str(card), "-i", *inputs, "-o", str(output), "--device", "cpu", *extra]


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------- 1. inputs are never overwritten


def test_output_naming_an_input_is_refused_and_the_input_kept(card_path, case, capsys) -> None:
    t1c = case["t1c"]
    before = t1c.read_bytes()
    assert main(_predict(card_path, case_inputs(case), t1c)) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "would destroy the input" in _one_line_error(err) and str(t1c) in err
    assert "reading images" not in err  # refused before any work
    link = t1c.parent / "link.nii.gz"
    link.symlink_to(t1c)
    assert main(_predict(card_path, case_inputs(case), link)) == EXIT_USER_ERROR
    assert "would destroy the input" in _one_line_error(capsys.readouterr().err)
    assert main(_predict(card_path, case_inputs(case), case["seg"].with_name("out.nii.gz"),
                         "--seg-nrrd", str(t1c))) == EXIT_USER_ERROR  # not a .seg.nrrd name either
    assert t1c.read_bytes() == before


def test_output_inside_an_input_dicom_folder_is_refused(card_path, case, tmp_path, capsys) -> None:
    dicom = tmp_path / "t1c-dicom"
    write_dicom_series(sitk.Cast(sitk.ReadImage(str(case["t1c"])), sitk.sitkInt16), dicom)
    before = sorted(p.name for p in dicom.iterdir())
    inputs = [*case_inputs(case)[:3], str(dicom)]
    assert main(_predict(card_path, inputs, dicom / "seg.nii.gz")) == EXIT_USER_ERROR
    assert "inside the input folder" in _one_line_error(capsys.readouterr().err)
    assert sorted(p.name for p in dicom.iterdir()) == before


# ---------------------------------------------------------------- 2. incomplete writes


@pytest.mark.parametrize(("name", "leave"), [("seg.nii", 8192), ("seg.nii.gz", 0)])
def test_full_disk_leaves_no_label_map_and_exits_1(card_path, case, tmp_path, capsys, name, leave) -> None:
    """SimpleITK's NIfTI writer reports nothing on a full disk; the read-back must catch it."""
    with mounted_tmpfs(tmp_path / "disk", 256) as disk:
        fill_up(disk, leave)
        code = main(_predict(card_path, case_inputs(case), disk / name, "--quiet"))
        err = capsys.readouterr().err
        assert code == EXIT_USER_ERROR
        assert "Could not write the label map" in _one_line_error(err)
        assert sorted(p.name for p in disk.iterdir()) == ["filler"]  # no output, no temporary file


def test_a_write_that_fails_verification_removes_its_temporary_file(tmp_path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("previous result", encoding="utf-8")

    def short(tmp: Path) -> None:
        tmp.write_bytes(b"half")

    def verify(tmp: Path) -> None:
        raise OutputError("only 4 of 8 bytes were written")

    with pytest.raises(OutputError, match=f"Could not write the report {target}: only 4 of 8"):
        write_atomic(target, short, verify, what="report")
    assert target.read_text(encoding="utf-8") == "previous result" and _hidden(tmp_path) == []


# ---------------------------------------------------------------- 3. damaged inputs


@pytest.mark.parametrize("name", ["t1c.nii", "t1c.nii.gz"])
def test_truncated_nifti_is_refused_naming_the_file(card_path, case, tmp_path, capsys, name) -> None:
    image = sitk.ReadImage(str(case["t1c"]))
    whole = tmp_path / ("whole-" + name)
    sitk.WriteImage(image, str(whole), name.endswith(".gz"))
    data = whole.read_bytes()
    damaged = tmp_path / name
    damaged.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(InputImageError, match="damaged or incomplete"):
        read_image(damaged, "T1c")
    assert main(_predict(card_path, [*case_inputs(case)[:3], str(damaged)], tmp_path / "seg.nii.gz")) == 1
    line = _one_line_error(capsys.readouterr().err)
    assert str(damaged) in line and "damaged or incomplete" in line
    assert not (tmp_path / "seg.nii.gz").exists()


# ---------------------------------------------------------------- 4. non-finite voxels


def _expected_preprocess(data: np.ndarray) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Crop to the finite non-zero voxels, z-score over the finite voxels; bad voxels count as 0."""
    clean = np.where(np.isfinite(data), data, 0.0)
    where = np.nonzero(np.any(clean != 0, axis=0))
    box = tuple(slice(int(w.min()), int(w.max()) + 1) for w in where)
    crop = data[(slice(None), *box)].astype(np.float64)
    finite = np.where(np.isfinite(crop), crop, np.nan)
    mean = np.nanmean(finite, axis=(1, 2, 3), keepdims=True)
    std = np.nanstd(finite, axis=(1, 2, 3), keepdims=True)
    return (np.where(np.isfinite(crop), crop, 0.0) - mean) / std, box


def test_nan_and_inf_are_left_out_of_the_crop_and_the_statistics() -> None:
    rng = np.random.default_rng(0)
    data = np.zeros((2, 12, 14, 16), np.float32)
    data[:, 2:10, 3:11, 4:12] = rng.normal(50, 10, size=(2, 8, 8, 8))
    data[0, 5, 6, 7] = np.nan
    data[1, 3, 4, 5] = np.inf
    data[1, 0, 0, 0] = -np.inf  # outside the tissue: must not widen the crop
    out, box = preprocess(data.copy(), Preprocessing())
    expected, expected_box = _expected_preprocess(data)
    assert box == CropBox(tuple(s.start for s in expected_box), tuple(s.stop for s in expected_box), data.shape[1:])
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_nnunet_preprocessing_also_ignores_non_finite_voxels() -> None:
    from SegMambaSlicerLib.models.nnunet import NnunetChannel, NnunetSettings

    rng = np.random.default_rng(1)
    data = np.zeros((1, 10, 12, 12), np.float32)
    data[0, 1:9, 2:10, 2:10] = rng.normal(100, 20, size=(8, 8, 8))
    data[0, 4, 4, 4] = np.nan
    settings = NnunetSettings((0, 1, 2), (1.0, 1.0, 1.0), (NnunetChannel("ZScoreNormalization"),))
    out, _ = preprocess_nnunet(data, (1.0, 1.0, 1.0), settings)
    expected, _ = _expected_preprocess(data)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


class _FiniteInputs(PointwiseNet):
    """A pointwise network that records whether it ever saw a non-finite input."""

    saw_non_finite = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.saw_non_finite |= not bool(torch.isfinite(x).all())
        return super().forward(x)


def test_non_finite_voxels_never_reach_the_network_and_are_reported() -> None:
    rng = np.random.default_rng(2)
    arrays = [np.zeros((14, 16, 18), np.float32) for _ in range(2)]
    for a in arrays:
        a[2:12, 3:13, 4:14] = rng.normal(10, 3, size=(10, 10, 10))
    arrays[1][6, 7, 8] = np.nan
    arrays[1][6, 7, 9] = np.inf
    images = [sitk.GetImageFromArray(a) for a in arrays]
    weight, bias = rng.normal(size=(3, 2)), rng.normal(size=3)
    network = _FiniteInputs(weight, bias)
    result = segment(images, toy_card(channels=2, labels=2), SegmentOptions(device="cpu"), network=network)
    assert not network.saw_non_finite
    data = np.stack(arrays)
    z, box = _expected_preprocess(data)
    expected = np.zeros(arrays[0].shape, np.uint8)
    expected[box] = pointwise_expected(z, weight, bias)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(result.labelmap), expected)
    assert len(result.warnings) == 1
    assert "2 voxels of the Channel 1 image" in result.warnings[0] and "(8, 7, 6) and (9, 7, 6)" in result.warnings[0]


# ---------------------------------------------------------------- 5. degenerate inputs


def _with_channel(case: dict[str, Path], key: str, value: float, folder: Path) -> list[str]:
    image = sitk.ReadImage(str(case[key]))
    constant = sitk.GetImageFromArray(np.full(sitk.GetArrayViewFromImage(image).shape, value, np.float32))
    constant.CopyInformation(image)
    path = folder / f"{key}-constant.nii.gz"
    sitk.WriteImage(constant, str(path))
    return [str(path) if k == key else str(case[k]) for k in MODALITIES]


@pytest.mark.parametrize(("value", "said"), [(0.0, "zero everywhere"), (7.0, "the same value (7) everywhere")])
def test_a_channel_without_contrast_is_told_by_name(card_path, case, tmp_path, capsys, value, said) -> None:
    inputs = _with_channel(case, "t1c", value, tmp_path)
    assert main(_predict(card_path, inputs, tmp_path / "seg.nii.gz", "--quiet")) == 0
    err = capsys.readouterr().err
    assert f"The T1 post-contrast image is {said}" in err and "unreliable" in err


def test_a_case_without_any_contrast_is_refused(card_path, tmp_path, capsys) -> None:
    grid = sitk.Image(*SHAPE, sitk.sitkFloat32) + 5.0
    paths = []
    for key in MODALITIES:
        paths.append(str(tmp_path / f"{key}.nii.gz"))
        sitk.WriteImage(grid, paths[-1])
    assert main(_predict(card_path, paths, tmp_path / "seg.nii.gz")) == EXIT_USER_ERROR
    assert "no contrast" in _one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "seg.nii.gz").exists()


# ---------------------------------------------------------------- 8. output problems before inference


def test_output_problems_are_found_before_reading_the_images(card_path, case, tmp_path, capsys) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x", encoding="utf-8")
    (tmp_path / "folder.nii.gz").mkdir()
    for output, said in (
        (tmp_path / "folder.nii.gz", "is a folder"),
        (tmp_path / "seg.png", "Unsupported format"),
        (blocker / "seg.nii.gz", "Cannot write the label map into"),
    ):
        assert main(_predict(card_path, case_inputs(case), output)) == EXIT_USER_ERROR
        err = capsys.readouterr().err
        assert said in _one_line_error(err) and "reading images" not in err
    assert main(_predict(card_path, case_inputs(case), tmp_path / "seg.nii.gz", "--seg-nrrd",
                         str(tmp_path / "seg.nrrd"))) == EXIT_USER_ERROR
    assert "Unsupported format for the segmentation" in _one_line_error(capsys.readouterr().err)


def test_output_problems_are_found_before_pytorch_is_even_imported(card_path, case, tmp_path) -> None:
    """'In the first second': the checks need no model, so they run before the slow imports."""
    code = ("import sys\nfrom SegMambaSlicerLib.cli import main\nstatus = main(sys.argv[1:])\n"
            "sys.exit(status if 'torch' not in sys.modules else 99)\n")
    for argv in (_predict(card_path, case_inputs(case), case["t2w"]),
                 ["batch", str(tmp_path), str(case["t2w"]), "-m", str(card_path)]):
        done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
        assert done.returncode == EXIT_USER_ERROR, done.stderr
        _one_line_error(done.stderr)


def test_a_read_only_file_system_is_refused_before_any_work(card_path, case, tmp_path, capsys) -> None:
    with mounted_tmpfs(tmp_path / "ro", 64, read_only=True) as ro:
        start = time.perf_counter()
        assert main(_predict(card_path, case_inputs(case), ro / "seg.nii.gz")) == EXIT_USER_ERROR
        seconds = time.perf_counter() - start
        err = capsys.readouterr().err
        assert "Read-only file system" in _one_line_error(err) and "reading images" not in err
        print(f"refused after {seconds:.2f} s")


# ---------------------------------------------------------------- 9. signals and stale temporaries


def test_predict_removes_stale_temporaries_beside_its_outputs(card_path, case, tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    stale = [out / ".seg.nii.gz.0123456789ab.nii.gz", out / ".seg.seg.nrrd.0123456789ab.part"]
    for path in stale:
        path.write_bytes(b"left by a killed run")
    assert main(_predict(card_path, case_inputs(case), out / "seg.nii.gz", "--seg-nrrd", "--quiet")) == 0
    assert sorted(p.name for p in out.iterdir()) == ["seg.nii.gz", "seg.seg.nrrd"]


def test_sigterm_during_a_write_removes_the_temporary_file_and_exits_143(card_path, case, tmp_path) -> None:
    """A real SIGTERM from another process while the label map is being written."""
    out, marker = tmp_path / "out", tmp_path / "writing"
    argv = _predict(card_path, case_inputs(case), out / "seg.nii.gz", "--quiet")
    body = "from SegMambaSlicerLib.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    code, err = signal_while_writing(tmp_path / "slow_predict.py", body, argv, marker)
    assert code == EXIT_TERMINATED, err
    temporary = Path(marker.read_text(encoding="utf-8"))
    assert temporary.parent == out and not temporary.exists()
    assert list(out.iterdir()) == [] and "terminated" in err


def test_sigterm_unwinds_like_ctrl_c_in_process(tmp_path) -> None:
    """The handler turns SIGTERM into an exception, so ``write_atomic`` removes its temporary file."""
    previous = signal.getsignal(signal.SIGTERM)
    handle_sigterm()
    try:
        def write_then_get_killed(tmp: Path) -> None:
            tmp.write_bytes(b"partial")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)

        with pytest.raises(KeyboardInterrupt):
            write_atomic(tmp_path / "out.bin", write_then_get_killed)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- 11. messages that point to the cause


def test_a_missing_or_empty_folder_as_the_only_input_says_so(card_path, tmp_path, capsys) -> None:
    assert main(_predict(card_path, [str(tmp_path / "no-such-case")], tmp_path / "seg.nii.gz")) == 1
    assert "no-such-case does not exist" in _one_line_error(capsys.readouterr().err)
    (tmp_path / "empty").mkdir()
    assert main(_predict(card_path, [str(tmp_path / "empty")], tmp_path / "seg.nii.gz")) == 1
    line = _one_line_error(capsys.readouterr().err)
    assert "is empty" in line and "needs 4 input images" not in line



# ---------------------------------------------------------------- 10. every user error is one line, exit 1


def test_user_errors_outside_cards_are_one_line_not_unexpected(card_path, case, tmp_path, capsys) -> None:
    fused = _predict(card_path, case_inputs(case), tmp_path / "seg.nii.gz", "--scan-backend", "fused", "--quiet")
    if torch.cuda.is_available():
        pytest.skip("the fused backend may run here")
    assert main(fused) == EXIT_USER_ERROR
    assert "'fused' selective-scan backend cannot be used" in _one_line_error(capsys.readouterr().err)
    assert main(["phantom", str(tmp_path / "p"), "--shape", "4", "4", "4"]) == EXIT_USER_ERROR
    assert "at least 16 voxels" in _one_line_error(capsys.readouterr().err)


# ---------------------------------------------------------------- 6. weights are verified before loading


def test_predict_refuses_weights_that_differ_from_the_card_but_not_weights_given_by_hand(
        card_path, case, tmp_path, capsys) -> None:
    """The card names a SHA-256 its weights file does not have (changed, corrupted or swapped)."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "tiny.pt").write_bytes((card_path.parent / "tiny.pt").read_bytes())
    card = json.loads(card_path.read_text(encoding="utf-8"))
    card["weights"] = {"kind": "file", "file": "tiny.pt", "sha256": "0" * 64}
    changed = folder / "changed.json"
    changed.write_text(json.dumps(card), encoding="utf-8")
    assert main(_predict(changed, case_inputs(case), tmp_path / "seg.nii.gz", "--quiet")) == EXIT_USER_ERROR
    line = _one_line_error(capsys.readouterr().err)
    assert "has SHA-256" in line and "0" * 64 in line and not (tmp_path / "seg.nii.gz").exists()
    assert main(_predict(changed, case_inputs(case), tmp_path / "seg.nii.gz", "--quiet",
                         "--weights", str(folder / "tiny.pt"))) == 0


# ---------------------------------------------------------------- paths users have (Windows, macOS)


def test_paths_with_spaces_and_non_ascii_characters_work_end_to_end(card_path, tmp_path, monkeypatch) -> None:
    """Inputs, outputs, the model's folder and the cache under 'Ünïcode … with spaces' (common on Windows)."""
    root = tmp_path / "Ünïcode folder with spaces — 検査"
    monkeypatch.setenv("SEGMAMBA_SLICER_HOME", str(root / "cache dir"))
    case = write_brats_case(make_phantom(shape=SHAPE, seed=2), root / "in put", "Case 1")
    model = root / "my model"
    model.mkdir()
    (model / "tiny.pt").write_bytes((card_path.parent / "tiny.pt").read_bytes())
    (model / "card é.json").write_text(card_path.read_text(encoding="utf-8"), encoding="utf-8")
    out = root / "out put" / "séance.nii.gz"
    assert main(_predict(model / "card é.json", case_inputs(case), out, "--seg-nrrd", "--quiet")) == 0
    assert sitk.ReadImage(str(out)).GetSize() == SHAPE
    assert (root / "out put" / "séance.seg.nrrd").is_file()

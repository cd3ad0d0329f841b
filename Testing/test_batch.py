"""Batch segmentation over case folders with a small real SegMamba through the real pipeline.

The network is SegMamba V1 at a tiny width with seeded random weights: its outputs mean nothing
clinically, but they depend on every input channel, so a mixed-up channel order or a wrong case shows.
"""

from __future__ import annotations

import csv
import os
import queue
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from allocator_fakes import KEEP, KEEP_BOUNDED, RESTORE, RESTORE_BOUNDED
from interrupted_runs import signal_while_writing
from SegMambaSlicerLib.cli import build_parser
from SegMambaSlicerLib.engine.pipeline import SegmentOptions, segment
from SegMambaSlicerLib.errors import CancelledError, DeviceError
from SegMambaSlicerLib.evaluation.phantom import MODALITIES, make_phantom, write_brats_case
from SegMambaSlicerLib.models.cards import load_card
from SegMambaSlicerLib.run import batch
from SegMambaSlicerLib.run.batch import DONE, FAILED, SKIPPED, segment_folder
from SegMambaSlicerLib.run.cases import BatchError, Case, discover_cases
from toy_models import PointwiseNet, write_cohort

CPU = SegmentOptions(device="cpu")
GOOD = ("Case-A", "Case-B")
CORRUPT = "Case-C"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two phantom cases in the BraTS 2023 layout and one whose T1c file is not an image."""
    return write_cohort(tmp_path_factory.mktemp("cohort"), GOOD, CORRUPT)


@pytest.fixture(scope="module")
def first_run(cohort: Path, card_path: Path, tmp_path_factory: pytest.TempPathFactory):
    """One in-process batch over the cohort with previews, recording progress and per-case callbacks."""
    out = tmp_path_factory.mktemp("out")
    progress: list[tuple[float, str]] = []
    finished: list[str] = []
    result = segment_folder(cohort, out, card_path, CPU, preview=True,
                            progress=lambda f, m: progress.append((f, m)),
                            on_case=lambda r: finished.append(r.case_id))
    return result, out, progress, finished


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _pointwise() -> PointwiseNet:
    """A 4-in, 4-out 1×1×1 convolution: a network that costs nothing, for tests of the batch mechanics."""
    rng = np.random.default_rng(0)
    return PointwiseNet(rng.normal(size=(4, 4)), rng.normal(size=4)).eval()


def _visible_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def test_good_cases_are_segmented_and_the_corrupt_case_fails_clearly(first_run, cohort, card_path) -> None:
    result, out, _, finished = first_run
    by_case = {c.case_id: c for c in result.cases}
    assert [c.case_id for c in result.cases] == [*GOOD, CORRUPT]
    assert sorted(finished) == [*GOOD, CORRUPT]
    assert [by_case[c].status for c in GOOD] == [DONE, DONE]
    failed = by_case[CORRUPT]
    assert failed.status == FAILED and not result.ok and result.failed == (failed,)
    assert f"{CORRUPT}-t1c.nii.gz" in failed.error and "Cannot read" in failed.error
    assert _visible_files(out) == sorted([*(f"{c}.nii.gz" for c in GOOD), *(f"{c}.png" for c in GOOD), "summary.csv"])
    for case_id in GOOD:
        reference = sitk.ReadImage(str(cohort / case_id / f"{case_id}-t2w.nii.gz"))
        labelmap = sitk.ReadImage(str(out / f"{case_id}.nii.gz"))
        assert labelmap.GetSize() == reference.GetSize()
        assert np.allclose(labelmap.GetSpacing(), reference.GetSpacing())
        assert np.allclose(labelmap.GetOrigin(), reference.GetOrigin())
        assert set(np.unique(sitk.GetArrayViewFromImage(labelmap))) <= {0, 1, 2, 3}
        assert (out / f"{case_id}.png").read_bytes().startswith(b"\x89PNG")


def test_batch_output_equals_a_direct_run_on_the_channels_in_card_order(first_run, cohort, card_path) -> None:
    """Together with the discovery tests (file → channel order) this pins which data reached the network."""
    _, out, _, _ = first_run
    files = [cohort / GOOD[0] / f"{GOOD[0]}-{key}.nii.gz" for key in MODALITIES]
    direct = sitk.GetArrayFromImage(segment(files, load_card(card_path), CPU).labelmap)
    assert len(np.unique(direct)) > 1  # not a constant map, so the equality is informative
    assert np.array_equal(_array(out / f"{GOOD[0]}.nii.gz"), direct)


def test_summary_lists_every_case_with_independently_measured_volumes(first_run, cohort) -> None:
    result, out, _, _ = first_run
    with open(out / "summary.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["case", "status", "seconds", "device", "windows", "Necrotic tumor core (mL)",
                             "Peritumoral edema (mL)", "Enhancing tumor (mL)", "TC (mL)", "WT (mL)", "ET (mL)",
                             "output", "error", "warnings"]
    assert [(r["case"], r["status"]) for r in rows] == [(GOOD[0], DONE), (GOOD[1], DONE), (CORRUPT, FAILED)]
    for row in rows[:2]:
        image = sitk.ReadImage(str(out / f"{row['case']}.nii.gz"))
        labels, voxel_ml = sitk.GetArrayFromImage(image), np.prod(image.GetSpacing()) / 1000.0
        expected = {name: np.isin(labels, values).sum() * voxel_ml for name, values in (
            ("Necrotic tumor core", [1]), ("Peritumoral edema", [2]), ("Enhancing tumor", [3]),
            ("TC", [1, 3]), ("WT", [1, 2, 3]), ("ET", [3]))}
        for name, ml in expected.items():
            assert float(row[f"{name} (mL)"]) == pytest.approx(ml, abs=1e-6)
        assert row["device"] == "cpu" and int(row["windows"]) >= 1 and float(row["seconds"]) > 0
        assert row["output"] == str(out / f"{row['case']}.nii.gz") and row["error"] == ""
    assert rows[2]["output"] == "" and "Cannot read" in rows[2]["error"]
    assert [c.case_id for c in result.cases] == [r["case"] for r in rows]


def test_progress_covers_cases_and_windows(first_run) -> None:
    _, _, progress, _ = first_run
    fractions = [f for f, _ in progress]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert any("window 1/" in m and m.startswith(f"0/3 cases, {GOOD[0]}") for _, m in progress)
    assert any(m.startswith(f"2/3 cases, {GOOD[1]}: done") for _, m in progress)


def test_rerun_skips_finished_cases_and_exits_non_zero_for_the_failed_one(first_run, cohort, card_path,
                                                                          tmp_path, capsys) -> None:
    _, first_out, _, _ = first_run
    out = tmp_path / "out"
    shutil.copytree(first_out, out)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.suffix in (".gz", ".png")}
    args = build_parser().parse_args(["batch", str(cohort), str(out), "-m", str(card_path), "--device", "cpu",
                                      "--preview", "--quiet"])
    assert args.func(args) == 1
    text = capsys.readouterr().out
    assert "3 cases: 0 segmented, 2 skipped (already done), 1 failed" in text
    assert f"FAILED {CORRUPT}: " in text
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.suffix in (".gz", ".png")} == stamps
    with open(out / "summary.csv", newline="", encoding="utf-8") as fh:
        rows = {r["case"]: r for r in csv.DictReader(fh)}
    with open(first_out / "summary.csv", newline="", encoding="utf-8") as fh:
        before = {r["case"]: r for r in csv.DictReader(fh)}
    for case_id in GOOD:
        assert rows[case_id]["status"] == SKIPPED
        assert rows[case_id]["WT (mL)"] == before[case_id]["WT (mL)"]


def test_resume_redoes_outputs_that_are_incomplete_or_on_another_grid(first_run, cohort, card_path,
                                                                      tmp_path) -> None:
    """A label map cut short (SimpleITK reads the missing voxels as 0) or on another grid is not 'done'."""
    _, first_out, _, _ = first_run
    out = tmp_path / "out"
    shutil.copytree(first_out, out)
    truncated = out / f"{GOOD[0]}.nii.gz"
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    other_grid = out / f"{GOOD[1]}.nii.gz"
    sitk.WriteImage(sitk.Image(8, 8, 8, sitk.sitkUInt8), str(other_grid))
    result = segment_folder(cohort, out, card_path, CPU, network=_pointwise())
    statuses = {c.case_id: c.status for c in result.cases}
    assert statuses == {GOOD[0]: DONE, GOOD[1]: DONE, CORRUPT: FAILED}
    for case_id in GOOD:
        written = sitk.ReadImage(str(out / f"{case_id}.nii.gz"))
        assert written.GetSize() == sitk.ReadImage(str(cohort / case_id / f"{case_id}-t2w.nii.gz")).GetSize()


def test_a_full_disk_ends_the_batch_with_one_line_and_no_empty_outputs(cohort, card_path, tmp_path,
                                                                       capsys) -> None:
    from filesystems import fill_up, mounted_tmpfs
    from SegMambaSlicerLib.cli import main

    with mounted_tmpfs(tmp_path / "disk", 256) as disk:
        (disk / "out").mkdir()
        fill_up(disk, leave=6000)  # room for the summary, not for a label map
        code = main(["batch", str(cohort), str(disk / "out"), "-m", str(card_path), "--device", "cpu",
                     "--quiet"])
        err = capsys.readouterr().err
        assert code == 1
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "Could not write the label map" in errors[0] and "Traceback" not in err
        leftovers = [p for p in (disk / "out").iterdir() if p.name != "summary.csv"]
        assert leftovers == []  # no 0-byte or partial label map, no temporary file


def test_a_read_only_output_folder_is_refused_before_any_case(cohort, card_path, tmp_path, capsys) -> None:
    from filesystems import mounted_tmpfs
    from SegMambaSlicerLib.cli import main

    with mounted_tmpfs(tmp_path / "ro", 64, read_only=True) as ro:
        code = main(["batch", str(cohort), str(ro), "-m", str(card_path), "--device", "cpu"])
        err = capsys.readouterr().err
    assert code == 1 and err.count("error: ") == 1 and "Read-only file system" in err
    assert "case" not in err.split("error: ")[0]  # nothing was segmented first


def test_an_existing_output_that_is_an_input_is_never_replaced(card_path, tmp_path) -> None:
    """--overwrite with an output name that is (a hard link of) an input: the case fails, the input stays."""
    source = tmp_path / "in"
    write_brats_case(make_phantom(shape=(24, 24, 16), seed=4), source, "Case-H")
    out = tmp_path / "out"
    out.mkdir()
    t1c = source / "Case-H" / "Case-H-t1c.nii.gz"
    os.link(t1c, out / "Case-H.nii.gz")
    before = t1c.read_bytes()
    result = segment_folder(source, out, card_path, CPU, overwrite=True, network=_pointwise())
    assert [c.status for c in result.cases] == [FAILED]
    assert "would destroy the input" in result.cases[0].error
    assert t1c.read_bytes() == before


def test_cpu_workers_give_the_in_process_results(first_run, cohort, card_path, tmp_path) -> None:
    _, first_out, _, _ = first_run
    out = tmp_path / "out"
    progress: list[str] = []
    result = segment_folder(cohort, out, card_path, CPU, devices=["cpu", "cpu"],
                            progress=lambda f, m: progress.append(m))
    assert [(c.case_id, c.status, c.device) for c in result.cases] == [
        (GOOD[0], DONE, "cpu"), (GOOD[1], DONE, "cpu"), (CORRUPT, FAILED, "cpu")]
    assert "Cannot read" in result.failed[0].error
    for case_id in GOOD:
        assert np.array_equal(_array(out / f"{case_id}.nii.gz"), _array(first_out / f"{case_id}.nii.gz"))
    assert any("window" in m for m in progress)


def test_a_killed_batch_leaves_no_partial_output_and_the_rerun_cleans_up(cohort, card_path, tmp_path) -> None:
    """SIGKILL while the label map is being written: no file under the output name; the rerun finishes."""
    source = tmp_path / "in"
    shutil.copytree(cohort / GOOD[0], source / GOOD[0])
    out, marker = tmp_path / "out", tmp_path / "writing"
    body = ("import torch\n"
            "from SegMambaSlicerLib.run.batch import segment_folder\n"
            "from SegMambaSlicerLib.engine.pipeline import SegmentOptions\n"
            "segment_folder(sys.argv[1], sys.argv[2], sys.argv[3], SegmentOptions(device='cpu'),\n"
            "               network=torch.nn.Conv3d(4, 4, 1).eval())\n")
    code, _ = signal_while_writing(tmp_path / "slow_batch.py", body, [str(source), str(out), str(card_path)],
                                   marker, signal.SIGKILL)
    assert code == -signal.SIGKILL
    temporary = Path(marker.read_text(encoding="utf-8"))
    assert temporary.parent == out and temporary.name.startswith(f".{GOOD[0]}.nii.gz.") and temporary.exists()
    assert _visible_files(out) == []

    result = segment_folder(source, out, card_path, CPU, network=_pointwise())
    assert [c.status for c in result.cases] == [DONE]
    assert not temporary.exists()
    assert _visible_files(out) == [f"{GOOD[0]}.nii.gz", "summary.csv"]


@pytest.mark.parametrize("low_memory", [False, True])
def test_freed_memory_is_kept_for_the_whole_cohort_and_released_once(cohort, card_path, tmp_path, fake_libc,
                                                                     low_memory: bool) -> None:
    """Each case's windows ask for memory reuse; giving memory back between cases made every next case
    fault ~5 GB in again (docs/benchmarks.md), so it is given back only when the batch ends. With low
    memory the cohort-long setting is the bounded one: the outer setting holds inside, so an unbounded
    one would lift the bound each case's windows ask for."""
    options = SegmentOptions(device="cpu", low_memory=low_memory)
    result = segment_folder(cohort, tmp_path, card_path, options, network=_pointwise())
    assert [r.case_id for r in result.cases if r.status == DONE] == list(GOOD)
    assert fake_libc.calls == (KEEP_BOUNDED + RESTORE_BOUNDED if low_memory else KEEP + RESTORE)


def test_cancel_stops_between_cases_and_keeps_the_summary(cohort, card_path, tmp_path) -> None:
    out = tmp_path / "out"
    finished: list[str] = []
    with pytest.raises(CancelledError):
        segment_folder(cohort, out, card_path, CPU, on_case=lambda r: finished.append(r.case_id),
                       cancel=lambda: bool(finished), network=_pointwise())
    assert finished == [GOOD[0]]
    assert _visible_files(out) == [f"{GOOD[0]}.nii.gz", "summary.csv"]
    with open(out / "summary.csv", newline="", encoding="utf-8") as fh:
        assert [r["case"] for r in csv.DictReader(fh)] == [GOOD[0]]


# ---------------------------------------------------------------- discovery (no network)


def _touch(root: Path, *names: str) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")


def test_brats_layout_discovery_reports_a_missing_channel(card_path, tmp_path) -> None:
    card = load_card(card_path)
    _touch(tmp_path, *(f"P1/P1-{k}.nii.gz" for k in MODALITIES), *(f"P2/P2-{k}.nii.gz" for k in MODALITIES[:3]),
           "P1/P1-seg.nii.gz", "notes/readme.txt", ".hidden/x-t2w.nii.gz")
    cases = discover_cases(tmp_path, card)
    assert [c.case_id for c in cases] == ["P1", "P2"]
    assert [p.name for p in cases[0].inputs] == [f"P1-{k}.nii.gz" for k in MODALITIES] and not cases[0].problem
    assert cases[1].inputs == () and "T1 post-contrast" in cases[1].problem
    _touch(tmp_path, "out/P1.nii.gz")  # an output folder inside the input folder is not a case
    assert [c.case_id for c in discover_cases(tmp_path, card)] == ["P1", "P2", "out"]
    assert [c.case_id for c in discover_cases(tmp_path, card, skip=tmp_path / "out")] == ["P1", "P2"]


def test_patterns_find_nnunet_and_brats2021_layouts(card_path, tmp_path) -> None:
    card = load_card(card_path)
    nnunet = tmp_path / "nnunet"
    _touch(nnunet, *(f"imagesTs/BRATS_{n:03d}_{i:04d}.nii.gz" for n in (1, 2) for i in range(4)),
           "labelsTs/BRATS_001.nii.gz", "imagesTs/BRATS_003_0000.nii.gz")
    cases = discover_cases(nnunet, card, "imagesTs/{case}_{index}.nii.gz")
    assert [c.case_id for c in cases] == ["BRATS_001", "BRATS_002", "BRATS_003"]
    assert [p.name for p in cases[1].inputs] == [f"BRATS_002_{i:04d}.nii.gz" for i in range(4)]
    assert "no file for channel T2-FLAIR" in cases[2].problem

    brats21 = tmp_path / "brats21"
    names = {"t2": "t2w", "flair": "t2f", "t1": "t1n", "t1ce": "t1c"}  # BraTS 2021 file names → card keys
    _touch(brats21, *(f"BraTS2021_00000/BraTS2021_00000_{n.upper() if n == 'flair' else n}.nii.gz" for n in names),
           "BraTS2021_00000/BraTS2021_00000_seg.nii.gz")
    (case,) = discover_cases(brats21, card, "{case}/{case}_{channel}.nii.gz")
    assert case.case_id == "BraTS2021_00000" and not case.problem
    assert [p.name for p in case.inputs] == [
        "BraTS2021_00000_t2.nii.gz", "BraTS2021_00000_FLAIR.nii.gz", "BraTS2021_00000_t1.nii.gz",
        "BraTS2021_00000_t1ce.nii.gz"]
    deep = discover_cases(brats21, card, "**/{case}_{channel}.nii.gz")
    assert [c.inputs for c in deep] == [case.inputs]


def test_bad_patterns_folders_and_devices_are_refused(card_path, tmp_path) -> None:
    card = load_card(card_path)
    with pytest.raises(BatchError, match=r"\{case\}"):
        discover_cases(tmp_path, card, "{subject}_{channel}.nii.gz")
    with pytest.raises(BatchError, match=r"\{channel\} or \{index\}"):
        discover_cases(tmp_path, card, "{case}.nii.gz")
    with pytest.raises(BatchError, match="No cases found"):
        discover_cases(tmp_path, card)
    with pytest.raises(BatchError, match="does not exist"):
        discover_cases(tmp_path / "missing", card)
    with pytest.raises(DeviceError, match="Unknown device"):
        segment_folder(tmp_path, tmp_path / "out", card_path, devices=["cpu", "gpu7"])



class _DeadWorker:
    """Stands in for a worker process that was killed (e.g. by the out-of-memory killer)."""

    exitcode = -9

    def is_alive(self) -> bool:
        return False


def test_cases_of_a_dead_worker_fail_and_the_batch_ends(card_path, tmp_path) -> None:
    """The worker died after starting Case-A: Case-A fails with its exit code, the never-started case too."""
    card = load_card(card_path)
    cases = [Case("Case-A"), Case("Case-B")]
    runner = batch._Runner(cases, batch._Job(card, CPU, tmp_path, False), tmp_path / "summary.csv", None, None)
    messages: queue.Queue = queue.Queue()
    messages.put(("start", 0, "Case-A"))
    messages.put(("progress", 0, "Case-A", 0.5, "window 1/2"))
    batch._collect(runner, cases, ["cuda:1"], [_DeadWorker()], messages, None)
    a, b = runner.ordered()
    assert (a.status, a.device) == (FAILED, "cuda:1") and "exit code -9" in a.error
    assert b.status == FAILED and "every worker process stopped" in b.error
    with open(tmp_path / "summary.csv", newline="", encoding="utf-8") as fh:
        assert [r["status"] for r in csv.DictReader(fh)] == [FAILED, FAILED]


def test_batch_writes_confidence_maps_and_dicom_segs_per_case_and_redoes_cases_missing_them(
        card_path, tmp_path) -> None:
    """DICOM study folders ({case}/{channel} series folders): one SEG and one confidence map per case."""
    pydicom = pytest.importorskip("pydicom")
    pytest.importorskip("highdicom")
    from dicom_files import write_dicom_series
    from SegMambaSlicerLib.cli import main

    source = tmp_path / "studies"
    series_uids = {}
    for seed, case_id in enumerate(("Study-1", "Study-2")):
        phantom = make_phantom(shape=(32, 32, 16), seed=seed)
        for key in MODALITIES:
            image = sitk.Cast(sitk.RescaleIntensity(phantom.images[key], 0, 1000), sitk.sitkInt16)
            (source / case_id).mkdir(parents=True, exist_ok=True)
            tags = write_dicom_series(image, source / case_id / key)
            if key == MODALITIES[0]:
                series_uids[case_id] = tags["0020|000e"]
    out = tmp_path / "out"
    argv = ["batch", str(source), str(out), "-m", str(card_path), "--pattern", "{case}/{channel}",
            "--device", "cpu", "--quiet", "--confidence", "--dicom-seg"]
    assert main(argv) == 0
    for case_id in ("Study-1", "Study-2"):
        labels = sitk.ReadImage(str(out / f"{case_id}.nii.gz"))
        confidence = sitk.ReadImage(str(out / f"{case_id}_confidence.nii.gz"))
        assert confidence.GetSize() == labels.GetSize() and confidence.GetOrigin() == labels.GetOrigin()
        values = sitk.GetArrayFromImage(confidence)
        assert 0.0 <= values.min() and values.max() <= 1.0
        seg = pydicom.dcmread(out / f"{case_id}.dcm")
        assert seg.Modality == "SEG" and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uids[case_id]
    (out / "Study-2_confidence.nii.gz").unlink()  # an asked-for output is missing: that case is redone
    stamp = (out / "Study-1.nii.gz").stat().st_mtime_ns
    assert main(argv) == 0
    assert (out / "Study-2_confidence.nii.gz").is_file() and (out / "Study-1.nii.gz").stat().st_mtime_ns == stamp
    with open(out / "summary.csv", newline="", encoding="utf-8") as fh:
        assert {r["case"]: r["status"] for r in csv.DictReader(fh)} == {"Study-1": SKIPPED, "Study-2": DONE}


# ------------------------------------------------------------------ the estimate before a batch


def _summary_rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return {r["case"]: r for r in csv.DictReader(fh)}


def test_the_batch_command_estimates_its_first_case_and_runs_on_the_network_it_loaded(
        cohort, card_path, tmp_path, home, capsys, monkeypatch) -> None:
    """As predict does before its case: the estimate (measuring this computer once) for the first case to
    segment, the cohort's time, and one network loaded for the estimate and the whole batch."""
    from SegMambaSlicerLib.cli import main
    from SegMambaSlicerLib.engine import pipeline

    real_load, loads = pipeline.load_network, []
    monkeypatch.setattr(pipeline, "load_network", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    out = tmp_path / "out"
    argv = ["batch", str(cohort), str(out), "-m", str(card_path), "--device", "cpu", "--quiet"]
    assert main(argv) == 1  # Case-C's T1c is not an image
    text = capsys.readouterr().out
    assert f"3 cases to segment; the estimate is for {GOOD[0]}" in text
    assert text.count("measuring how fast this computer runs this model") == 1 and len(loads) == 1
    estimated = re.search(r"^estimate: (\d+) windows?, ~", text, re.MULTILINE)
    assert estimated is not None and "all 3 cases: ~" in text
    assert text.index("estimate: ") < text.index(f"{GOOD[0]}: done")
    assert int(_summary_rows(out / "summary.csv")[GOOD[0]]["windows"]) == int(estimated.group(1))

    assert main(argv) == 1  # left: only the unreadable case, so no estimate
    text = capsys.readouterr().out
    assert "estimate: " not in text and "to segment" not in text and "2 skipped (already done), 1 failed" in text


def test_the_batch_command_stops_before_any_case_when_memory_is_clearly_short_unless_forced(
        cohort, card_path, tmp_path, home, capsys) -> None:
    import torch
    from SegMambaSlicerLib.cli import main
    from SegMambaSlicerLib.engine import rates

    key = rates.run_key(load_card(card_path), CPU, torch.device("cpu"))
    rates.remember_rate(key, rates.Rate(seconds_per_window=0.1, window_bytes=2**50, window_bytes_exact=True,
                                        weights_bytes=2**20, runtime_bytes=2**28))
    out = tmp_path / "out"
    argv = ["batch", str(cohort), str(out), "-m", str(card_path), "--device", "cpu", "--quiet"]
    assert main(argv) == 1
    refused = capsys.readouterr()
    errors = [line for line in refused.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "--low-memory" in errors[0] and "--force" in errors[0]
    assert not out.exists() or not list(out.iterdir())  # nothing segmented, no summary
    assert main([*argv, "--force"]) == 1  # runs; Case-C fails as it would
    forced = capsys.readouterr()
    assert "Running anyway (--force)" in forced.err
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [f"{case_id}.nii.gz" for case_id in GOOD]

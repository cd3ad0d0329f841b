"""The Ray engine of ``segment_folder`` / ``batch --engine ray`` on a real local Ray instance.

One Ray instance on 127.0.0.1 (2 CPUs, a small object store) serves most of the module; each batch starts
its own actors on it (one CPU each), with the tiny SegMamba of ``toy_models`` on small phantom cases. Faults
are real: an actor process is killed with SIGKILL mid-case, and a case makes its actor's process exit
every time it is tried. A second cluster, started with ``ray start --head`` as a user would
(``ray_head.py``), is joined by ``batch`` processes: one is interrupted with SIGINT mid-cohort, the next
joins by ``auto`` and ships the cases it reads to the actors.
"""

from __future__ import annotations

import csv
import fcntl
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import ray_head as heads
import SimpleITK as sitk
from SegMambaSlicerLib.cli import main
from SegMambaSlicerLib.engine.pipeline import SegmentOptions
from SegMambaSlicerLib.errors import CancelledError
from SegMambaSlicerLib.evaluation.phantom import make_phantom, write_brats_case
from SegMambaSlicerLib.io.images import read_image
from SegMambaSlicerLib.run import batch, ray_engine
from SegMambaSlicerLib.run.batch import DONE, FAILED, SKIPPED, segment_folder
from SegMambaSlicerLib.run.cases import BatchError, Case
from SegMambaSlicerLib.run.ray_engine import ActorPlan, Volume, plan_actors
from toy_models import write_cohort

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="Ray is the optional 'cluster' extra (part of the test extras)")
CPU = SegmentOptions(device="cpu")
GOOD = ("Case-A", "Case-B", "Case-C")
CORRUPT = "Case-D"
VICTIM, CRASHER = "Case-B", "Case-C"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three phantom cases in the BraTS 2023 layout and one whose T1c file is not an image."""
    return write_cohort(tmp_path_factory.mktemp("cohort"), GOOD, CORRUPT)


@pytest.fixture(scope="module")
def local_out(cohort: Path, card_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The local engine's outputs (label and confidence maps): what the Ray engine must reproduce voxel for voxel."""
    out = tmp_path_factory.mktemp("local")
    segment_folder(cohort, out, card_path, CPU, confidence=True)
    return out


@pytest.fixture(scope="module")
def ray_instance() -> Iterator[str]:
    """One Ray instance for the module, on 127.0.0.1 only, 2 CPUs, one CPU (and torch thread) per actor."""
    ray = pytest.importorskip("ray")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ray_engine.CPUS_PER_ACTOR_ENV, "1")
        address = ray_engine.start_local_ray(num_cpus=2, object_store_bytes=100 * 1024**2)
        try:
            yield address
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def fault_run(ray_instance: str, cohort: Path, card_path: Path, tmp_path_factory: pytest.TempPathFactory):
    """A Ray batch in which VICTIM's actor is killed mid-case once and CRASHER kills its actor every time.

    Two tries per case instead of three keep the module fast (each try of CRASHER restarts an actor).
    """
    out, marks = tmp_path_factory.mktemp("faults"), tmp_path_factory.mktemp("marks")
    victim_pid = marks / "victim.pid"

    def fault_hook(case_id: str, cancelled: object) -> None:  # runs in the actor; nested, so Ray ships it by value
        if case_id == VICTIM and not victim_pid.exists():
            (marks / "victim.pid.tmp").write_text(str(os.getpid()))
            os.replace(marks / "victim.pid.tmp", victim_pid)
            time.sleep(120)  # killed by the test long before
        if case_id == CRASHER:
            os._exit(3)

    def kill_victim() -> None:
        deadline = time.monotonic() + 120
        while not victim_pid.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(int(victim_pid.read_text()), signal.SIGKILL)

    killer = threading.Thread(target=kill_victim, daemon=True)
    killer.start()
    progress: list[tuple[float, str]] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ray_engine, "FAULT_HOOK", fault_hook)
        patch.setattr(ray_engine, "CASE_ATTEMPTS", 2)
        result = segment_folder(cohort, out, card_path, CPU, engine="ray",
                                progress=lambda f, m: progress.append((f, m)))
    killer.join(timeout=5)
    return result, out, progress


@pytest.fixture(scope="module")
def ray_head() -> Iterator[heads.RayHead]:
    """A cluster of its own for the module, as a user starts one: 2 CPUs, 80 MB object store, on 127.0.0.1."""
    pytest.importorskip("ray")
    with heads.ray_head(num_cpus=2, object_store_bytes=80 * 1024**2) as head:
        yield head


def _cluster_env(head: heads.RayHead, **extra: str) -> dict[str, str]:
    """The environment of a ``batch`` process joining ``head``: its token, two actors of one CPU each."""
    return {**os.environ, **head.client_env(), ray_engine.CPUS_PER_ACTOR_ENV: "1", **extra}


#: ``batch`` in a process of its own whose actors keep HELD running until the batch is cancelled (the hook is
#: defined in ``__main__``, so Ray ships it to the actors by value). argv: marks folder, then batch's.
HOLD_SCRIPT = """
import sys, time
from pathlib import Path
from SegMambaSlicerLib.cli import main
from SegMambaSlicerLib.run import ray_engine

MARKS = Path(sys.argv[1])

def hold(case_id, cancelled):
    if case_id == HELD:
        (MARKS / "holding").touch()
        deadline = time.monotonic() + 120
        while not cancelled() and time.monotonic() < deadline:
            time.sleep(0.05)

ray_engine.FAULT_HOOK = hold
sys.exit(main(sys.argv[2:]))
"""

#: ``batch`` in a process of its own whose actors record, per case, whether the case's folder exists for
#: them at the path the driver reads it from; before and after, a driver of its own joins the cluster and
#: reads its free CPUs. argv: marks folder, the driver's input folder, then batch's.
LOOK_SCRIPT = """
import json, os, sys, time
from pathlib import Path
import ray
from SegMambaSlicerLib.cli import main
from SegMambaSlicerLib.run import ray_engine

MARKS, INPUT = Path(sys.argv[1]), sys.argv[2]

def look(case_id, cancelled):
    (MARKS / (case_id + ".seen")).write_text(str(os.path.exists(os.path.join(INPUT, case_id))))

def cpus():
    ray.init(address="auto", configure_logging=False)
    try:
        deadline = time.monotonic() + 20
        while ray.available_resources().get("CPU") != ray.cluster_resources()["CPU"] and time.monotonic() < deadline:
            time.sleep(0.2)
        return [ray.available_resources().get("CPU"), ray.cluster_resources()["CPU"]]
    finally:
        ray.shutdown()

before = cpus()
if before[0] != before[1]:
    (MARKS / "cpus.json").write_text(json.dumps([before, None]))
    sys.exit(99)
ray_engine.FAULT_HOOK = look
code = main(sys.argv[3:])
(MARKS / "cpus.json").write_text(json.dumps([before, cpus()]))
sys.exit(code)
"""


@pytest.fixture(scope="module")
def interrupted(ray_head: heads.RayHead, cohort: Path, card_path: Path,
                tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, Path]:
    """``batch --engine ray --address 127.0.0.1:PORT`` as a process of its own, sent SIGINT (Ctrl-C) once
    Case-A is written while VICTIM is being segmented; its exit code, standard error and output folder."""
    work = tmp_path_factory.mktemp("interrupted")
    out, marks, script = work / "out", work / "marks", work / "hold.py"
    marks.mkdir()
    script.write_text(HOLD_SCRIPT.replace("HELD", repr(VICTIM)), encoding="utf-8")
    child = subprocess.Popen(
        [sys.executable, str(script), str(marks), "batch", str(cohort), str(out), "-m", str(card_path),
         "--device", "cpu", "--engine", "ray", "--address", ray_head.address, "--confidence", "-q"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_cluster_env(ray_head))
    try:
        deadline = time.monotonic() + 240
        while child.poll() is None and time.monotonic() < deadline and not (
                (out / "Case-A.nii.gz").exists() and (marks / "holding").exists()):
            time.sleep(0.1)
        assert child.poll() is None, f"the batch ended before it was interrupted:\n{child.communicate()[1][-3000:]}"
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=90)
    finally:
        if child.poll() is None:
            child.kill()
    return child.returncode, err, out


def _steps() -> ray_engine.CaseSteps:
    """The case steps ``segment_folder`` hands the engine."""
    return ray_engine.CaseSteps(batch.run_case, batch.prepare_case, batch.write_case, batch.case_failed,
                                lambda case_id, error: batch.CaseResult(case_id, FAILED, error=error))


def _assert_as_local(out: Path, local_out: Path, case_id: str) -> None:
    """The case's label map equals the local engine's voxel for voxel, its confidence map to float32 rounding.

    The actors run PyTorch with other thread counts than this process, which sums the convolutions in
    another order: the logits differ in their last bits (measured: up to 1e-6 in confidence), never enough
    to change a label.
    """
    np.testing.assert_array_equal(_array(out / f"{case_id}.nii.gz"), _array(local_out / f"{case_id}.nii.gz"))
    name = f"{case_id}_confidence.nii.gz"
    np.testing.assert_allclose(_array(out / name), _array(local_out / name), rtol=0, atol=1e-5)


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _rows(summary: Path) -> dict[str, dict[str, str]]:
    with summary.open(newline="") as f:
        return {row["case"]: row for row in csv.DictReader(f)}


# ---------------------------------------------------------------- without Ray


def test_the_batch_module_and_a_local_batch_never_import_ray(card_path: Path, tmp_path: Path) -> None:
    write_brats_case(make_phantom(shape=(32, 32, 24), seed=0), tmp_path / "cohort", "Case-A")
    cohort = tmp_path / "cohort"
    code = (
        "import sys\nfrom SegMambaSlicerLib.run import batch\nfrom SegMambaSlicerLib.cli import main\n"
        "assert 'ray' not in sys.modules, 'importing run.batch imported ray'\n"
        f"code = main(['batch', {str(cohort)!r}, {str(tmp_path / 'out')!r}, '-m', {str(card_path)!r}, "
        "'--device', 'cpu', '-q'])\n"
        "assert code == 0, code\n"
        "assert 'ray' not in sys.modules, 'a local batch imported ray'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out" / "Case-A.nii.gz").is_file()


def test_actors_are_one_per_gpu_or_per_cpu_slot_and_never_more_than_cases() -> None:
    nodes = [{"CPU": 32.0, "GPU": 4.0}, {"CPU": 16.0, "GPU": 2.0}, {"CPU": 8.0}]
    assert plan_actors("auto", nodes, 100, 4) == ActorPlan(6, 1, 1, 8, "cuda")
    assert plan_actors("cuda", nodes, 3, 4).count == 3
    assert plan_actors("cpu", nodes, 100, 4) == ActorPlan(14, 4, 0, 4, "cpu")
    assert plan_actors("auto", [{"CPU": 2.0}], 100, 4) == ActorPlan(1, 2, 0, 2, "cpu")
    for device, cluster in (("cuda:1", nodes), ("mps", nodes), ("cuda", [{"CPU": 8.0}])):
        with pytest.raises(BatchError, match="device|GPU"):
            plan_actors(device, cluster, 10, 4)


def test_ray_settings_that_cannot_work_are_refused_in_one_line(cohort: Path, card_path: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    base = ["batch", str(cohort), str(tmp_path / "out"), "-m", str(card_path), "-q"]
    assert main([*base, "--address", "auto"]) == 1
    assert main([*base, "--engine", "ray", "--devices", "cpu,cpu"]) == 1
    assert main([*base, "--ship-inputs"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and "--engine ray" in lines[0] and "leave out --devices" in lines[1]
    assert lines[2] == "error: Shipping the inputs to the actors needs the Ray engine: add --engine ray (engine='ray')."
    with pytest.raises(BatchError, match="Unknown batch engine 'spark'"):
        segment_folder(cohort, tmp_path / "out", card_path, CPU, engine="spark")


# ---------------------------------------------------------------- on a local Ray instance


@needs_ray
def test_the_local_ray_instance_listens_on_the_loopback_address_only(ray_instance: str) -> None:
    import ray

    assert ray_instance.startswith("127.0.0.1:")
    assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}


@needs_ray
def test_cli_ray_engine_equals_the_local_engine_voxel_for_voxel(ray_instance: str, cohort: Path, card_path: Path,
                                                               local_out: Path, tmp_path: Path) -> None:
    out = tmp_path / "ray"
    code = main(["batch", str(cohort), str(out), "-m", str(card_path), "--device", "cpu", "--engine", "ray",
                 "--confidence", "-q"])
    assert code == 1  # the corrupt case, as with the local engine
    for case_id in GOOD:
        _assert_as_local(out, local_out, case_id)
    assert not (out / f"{CORRUPT}.nii.gz").exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in local_out.iterdir())
    ray_rows, local_rows = _rows(out / "summary.csv"), _rows(local_out / "summary.csv")
    assert list(ray_rows) == list(local_rows)
    for case_id, row in ray_rows.items():
        expected = dict(local_rows[case_id], seconds=row["seconds"], output=row["output"].replace(str(out),
                                                                                                  str(local_out)))
        assert dict(row, output=row["output"].replace(str(out), str(local_out))) == expected
    assert ray_rows[CORRUPT]["status"] == FAILED and "t1c" in ray_rows[CORRUPT]["error"]


@needs_ray
def test_a_killed_actor_is_restarted_and_its_case_retried(fault_run, local_out: Path) -> None:
    result, out, progress = fault_run
    by_case = {c.case_id: c for c in result.cases}
    assert by_case["Case-A"].status == DONE and by_case[VICTIM].status == DONE
    for case_id in ("Case-A", VICTIM):
        np.testing.assert_array_equal(_array(out / f"{case_id}.nii.gz"), _array(local_out / f"{case_id}.nii.gz"))
    fractions = [f for f, _ in progress]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert any("running" in message for _, message in progress)


@needs_ray
def test_a_case_that_crashes_its_actor_every_time_fails_after_the_retries(fault_run) -> None:
    result, out, _ = fault_run
    crasher = {c.case_id: c for c in result.cases}[CRASHER]
    assert crasher.status == FAILED
    assert "not segmented after 2 tries" in crasher.error and "actor died" in crasher.error
    assert "\n" not in crasher.error
    assert [c.case_id for c in result.failed] == [CRASHER, CORRUPT]
    assert not (out / f"{CRASHER}.nii.gz").exists()
    assert _rows(out / "summary.csv")[CRASHER]["status"] == FAILED


@needs_ray
def test_a_rerun_skips_finished_cases_untouched_and_completes_the_rest(fault_run, cohort: Path,
                                                                      card_path: Path, local_out: Path) -> None:
    _, out, _ = fault_run
    finished = {p: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")}
    assert len(finished) == 2
    result = segment_folder(cohort, out, card_path, CPU, engine="ray")
    statuses = {c.case_id: c.status for c in result.cases}
    assert statuses == {"Case-A": SKIPPED, VICTIM: SKIPPED, CRASHER: DONE, CORRUPT: FAILED}
    assert {p: p.stat().st_mtime_ns for p in finished} == finished
    np.testing.assert_array_equal(_array(out / f"{CRASHER}.nii.gz"), _array(local_out / f"{CRASHER}.nii.gz"))
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


@needs_ray
def test_cancel_stops_the_cohort_without_partial_outputs_and_keeps_the_callers_ray(ray_instance: str, cohort: Path,
                                                                                   card_path: Path,
                                                                                   tmp_path: Path) -> None:
    import ray

    finished: list[str] = []
    started: list[str] = []  # cancelled as soon as a case is handed to an actor
    with pytest.raises(CancelledError):
        segment_folder(cohort, tmp_path, card_path, CPU, engine="ray", on_case=lambda r: finished.append(r.case_id),
                       progress=lambda f, m: started.append(m) if "started" in m else None,
                       cancel=lambda: bool(started))
    assert ray.is_initialized()
    assert set(_rows(tmp_path / "summary.csv")) == set(finished)
    written = [p for p in tmp_path.iterdir() if p.name != "summary.csv"]
    assert {f"{c}.nii.gz" for c in finished} <= {p.name for p in written}
    assert all(p.name.endswith(".nii.gz") and not p.name.startswith(".") for p in written)  # no temporaries
    for path in written:  # a case that ended while the others stopped is complete; none is partial
        assert _array(path).shape == (24, 36, 40)


@needs_ray
def test_an_address_that_does_not_answer_is_one_line_within_seconds(ray_instance: str, cohort: Path,
                                                                    card_path: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    start = time.monotonic()
    code = main(["batch", str(cohort), str(tmp_path / "out"), "-m", str(card_path), "--engine", "ray",
                 "--address", f"127.0.0.1:{heads.free_port()}", "-q"])
    assert code == 1 and time.monotonic() - start < ray_engine.CONNECT_TIMEOUT_S + 5
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No Ray cluster answers at 127.0.0.1:" in err[0]


@needs_ray
def test_workers_without_the_package_are_one_clear_line(ray_instance: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """An actor class the workers cannot import (its module exists only for this process), as on a cluster
    whose nodes lack segmamba-slicer."""
    import ray

    (tmp_path / "driver_only_actor.py").write_text(
        "class Actor:\n    def ready(self, probe):\n        return ''\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    from driver_only_actor import Actor

    actor = ray.remote(num_cpus=0)(Actor).remote()
    scheduler = ray_engine._Scheduler(ray, None, [actor], [Case("x", (tmp_path,))], _steps())
    with pytest.raises(BatchError, match="cannot import SegMambaSlicerLib or what it needs .No module named 'driver_only_actor'"):
        scheduler.run(None)
    ray.kill(actor)


def _image(values: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(values.astype(np.float32))  # as read_image gives every input
    image.SetSpacing((0.9, 1.1, 2.5))
    image.SetOrigin((-90.5, 12.25, 3.0))
    image.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    return image


def test_shipped_images_keep_every_voxel_value_and_the_grid_in_half_the_bytes_when_they_can() -> None:
    rng = np.random.default_rng(0)
    shape = (5, 6, 7)
    scanner = rng.integers(-1024, 3072, shape)  # CT / MRI integers, widened to float32 by the reader
    bright = rng.integers(0, 65535, shape)
    wide = np.where(rng.random(shape) < 0.5, -1, 40000)  # neither 16-bit type holds both
    fractional = rng.normal(100, 30, shape)
    broken = fractional.copy()
    broken[0, 0, 0] = np.nan
    for values, sent in ((scanner, np.int16), (bright, np.uint16), (wide, np.float32), (fractional, np.float32),
                         (broken, np.float32)):
        original = _image(values)
        volume = Volume.of(original, narrow=True)
        assert volume.voxels.dtype == sent
        back = volume.image()
        assert (back.GetSpacing(), back.GetOrigin(), back.GetDirection()) == (
            original.GetSpacing(), original.GetOrigin(), original.GetDirection())
        # what the pipeline reads from it (read_image widens to float32 again) is what it read from the file
        np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(back)), sitk.GetArrayFromImage(original))
    assert Volume.of(_image(scanner)).voxels.dtype == np.float32  # label maps and confidences go back as made


@needs_ray
def test_ctrl_c_cancels_a_cohort_on_a_joined_cluster_cleanly(interrupted: tuple[int, str, Path],
                                                              local_out: Path) -> None:
    code, err, out = interrupted
    assert code == 130, err[-3000:]
    assert "Traceback" not in err and [line for line in err.splitlines() if line.strip()][-1] == "cancelled"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left
    assert not (out / f"{VICTIM}.nii.gz").exists()  # stopped mid-case: nothing written
    rows = _rows(out / "summary.csv")
    done = {case_id for case_id, row in rows.items() if row["status"] == DONE}
    assert "Case-A" in done and VICTIM not in rows
    assert sorted(p.name for p in out.glob("*.nii.gz")) == sorted(
        f"{case_id}{kind}.nii.gz" for case_id in done for kind in ("", "_confidence"))
    for case_id in done:  # finished cases are complete
        _assert_as_local(out, local_out, case_id)


@needs_ray
def test_a_new_driver_joins_by_auto_and_ships_the_cases_the_interrupted_run_left(
        interrupted: tuple[int, str, Path], ray_head: heads.RayHead, cohort: Path, card_path: Path,
        local_out: Path, tmp_path: Path) -> None:
    """The rerun's driver knows the folders only as ``/proc/self/fd/N``, paths that exist in its own process
    alone: the actors (processes of the cluster) record that the cases are not there for them, yet every
    case is segmented, from the images the driver read and sent, and written by the driver."""
    _, _, out = interrupted
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")}
    marks, script = tmp_path / "marks", tmp_path / "look.py"
    marks.mkdir()
    script.write_text(LOOK_SCRIPT, encoding="utf-8")
    folders = []
    for folder in (cohort, out):  # high numbers, which no Ray worker has open
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        folders.append(fcntl.fcntl(fd, fcntl.F_DUPFD, 600))
        os.close(fd)
    cohort_here, out_here = (f"/proc/self/fd/{fd}" for fd in folders)
    try:
        child = subprocess.run(
            [sys.executable, str(script), str(marks), cohort_here, "batch", cohort_here, out_here,
             "-m", str(card_path), "--device", "cpu", "--engine", "ray", "--address", "auto", "--ship-inputs",
             "--confidence", "-q"],
            capture_output=True, text=True, timeout=300, pass_fds=folders,
            env=_cluster_env(ray_head, RAY_ADDRESS=ray_head.address, **{ray_engine.CPUS_PER_ACTOR_ENV: "2"}))
    finally:
        for fd in folders:
            os.close(fd)
    assert child.returncode == 1, child.stderr[-3000:]  # the corrupt case, as with the local engine
    before, after = json.loads((marks / "cpus.json").read_text())
    assert before == after == [2.0, 2.0]  # the interrupted run and this one left the cluster up and idle
    rows, local_rows = _rows(out / "summary.csv"), _rows(local_out / "summary.csv")
    finished_ids = {name[: -len(".nii.gz")] for name in finished if "_confidence" not in name}
    assert {c for c, row in rows.items() if row["status"] == SKIPPED} == finished_ids
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz") if p.name in finished} == finished
    shipped = {c for c, row in rows.items() if row["status"] == DONE}
    assert VICTIM in shipped and shipped | finished_ids == set(GOOD) and not shipped & finished_ids
    for case_id in GOOD:  # the label and confidence maps the actors sent back, as the local engine's
        _assert_as_local(out, local_out, case_id)
        volumes = {k: v for k, v in rows[case_id].items() if k.endswith("(mL)")}
        assert volumes == {k: v for k, v in local_rows[case_id].items() if k.endswith("(mL)")}
    assert {p.stem: p.read_text() for p in marks.glob("*.seen")} == dict.fromkeys(shipped, "False")
    assert rows[CORRUPT]["status"] == FAILED  # read by the driver, with the local engine's message
    assert rows[CORRUPT]["error"] == local_rows[CORRUPT]["error"].replace(str(cohort), cohort_here)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]

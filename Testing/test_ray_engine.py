"""The Ray engine of ``segment_folder`` / ``batch --engine ray`` on a real local Ray instance.

One Ray instance on 127.0.0.1 (2 CPUs, a small object store) serves the whole module; each batch starts its
own actors on it (one CPU each), with the tiny SegMamba of ``toy_models`` on small phantom cases. Faults
are real: an actor process is killed with SIGKILL mid-case, and a case makes its actor's process exit
every time it is tried.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from SegMambaSlicerLib.cli import main
from SegMambaSlicerLib.engine.pipeline import SegmentOptions
from SegMambaSlicerLib.errors import CancelledError
from SegMambaSlicerLib.evaluation.phantom import make_phantom, write_brats_case
from SegMambaSlicerLib.run import ray_engine
from SegMambaSlicerLib.run.batch import DONE, FAILED, SKIPPED, segment_folder
from SegMambaSlicerLib.run.cases import BatchError, Case
from SegMambaSlicerLib.run.ray_engine import ActorPlan, plan_actors
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
    """The local engine's outputs: what the Ray engine must reproduce voxel for voxel."""
    out = tmp_path_factory.mktemp("local")
    segment_folder(cohort, out, card_path, CPU)
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

    def fault_hook(case_id: str) -> None:  # runs in the actor; nested, so Ray ships it by value
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


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _rows(summary: Path) -> dict[str, dict[str, str]]:
    with summary.open(newline="") as f:
        return {row["case"]: row for row in csv.DictReader(f)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "--engine ray" in lines[0] and "leave out --devices" in lines[1]
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
                 "-q"])
    assert code == 1  # the corrupt case, as with the local engine
    for case_id in GOOD:
        np.testing.assert_array_equal(_array(out / f"{case_id}.nii.gz"), _array(local_out / f"{case_id}.nii.gz"))
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
                 "--address", f"127.0.0.1:{_free_port()}", "-q"])
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
    scheduler = ray_engine._Scheduler(ray, None, [actor], [Case("x", (tmp_path,))], lambda c, e: None)
    with pytest.raises(BatchError, match="cannot import SegMambaSlicerLib or what it needs .No module named 'driver_only_actor'"):
        scheduler.run(None)
    ray.kill(actor)

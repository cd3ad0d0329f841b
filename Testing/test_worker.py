"""The background worker: a real child process on a tiny registered SegMamba, streamed, cancelled, crashed.

The parent (run/worker.py) and the child (run/worker_child.py) share only run/worker_protocol.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from SegMambaSlicerLib.engine.pipeline import SegmentOptions, load_network, segment
from SegMambaSlicerLib.errors import CancelledError, CheckpointError
from SegMambaSlicerLib.models.cards import card_to_dict, load_card
from SegMambaSlicerLib.networks import build_network
from SegMambaSlicerLib.run import worker_child
from SegMambaSlicerLib.run.worker import (
    MPS_FALLBACK_VARIABLE,
    WarmWorker,
    WorkerCrashedError,
    WorkerError,
    WorkerEvent,
    WorkerOutOfMemoryError,
    WorkerProcess,
    default_worker_threads,
    describe_exit,
    load_image_npz,
    parse_event,
    python_executable,
    save_image_npz,
    taskkill_command,
    usable_cpu_count,
    worker_environment,
)
from SegMambaSlicerLib.run.worker_child import is_out_of_memory, network_key
from SegMambaSlicerLib.run.worker_protocol import CHILD_MODULE, format_event, format_job_line, parse_job_line

LIB_PARENT = Path(__file__).resolve().parents[1] / "SegMambaSlicer"

posix_only = pytest.mark.skipif(os.name == "nt", reason="uses POSIX signals and a shell script")
CPU = SegmentOptions(device="cpu")
# The smallest SegMamba V1 that runs: 48 head channels are fixed, 32^3 windows are the minimum.
TINY_KWARGS = {"in_chans": 1, "out_chans": 2, "depths": [1, 1, 1, 1], "feat_size": [48, 16, 16, 16],
               "hidden_size": 32}


@pytest.fixture(scope="module")
def tiny_card(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """A real segmamba_v1 card with seeded weights in a file next to it (the path users take)."""
    folder = tmp_path_factory.mktemp("tiny_model")
    torch.manual_seed(3)
    torch.save(build_network("segmamba_v1", **TINY_KWARGS).state_dict(), folder / "tiny.pt")
    card = {
        "id": "tiny-segmamba", "display_name": "Tiny SegMamba",
        "architecture": {"name": "segmamba_v1", "kwargs": TINY_KWARGS},
        "channels": [{"key": "t1", "display_name": "T1"}],
        "labels": [{"value": 1, "name": "Lesion", "color": [1, 0, 0]}],
        "inference": {"roi_size": [32, 32, 32], "overlap": 0.5, "sw_batch_size": 1},
        "weights": {"kind": "file", "file": "tiny.pt"},
    }
    (folder / "tiny.json").write_text(json.dumps(card))
    yield load_card(folder / "tiny.json")


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Same thread count as the worker, and no oversubscription of the shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _volume(shape_zyx: tuple[int, int, int], seed: int = 0) -> sitk.Image:
    rng = np.random.default_rng(seed)
    image = sitk.GetImageFromArray((rng.random(shape_zyx) * 100 + 1).astype(np.float32))
    image.SetSpacing((0.9, 1.1, 1.7))
    image.SetOrigin((-20.5, 13.25, 7.0))
    image.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    return image


def _wait_for(worker: WorkerProcess, wanted, timeout: float = 120.0) -> list[WorkerEvent]:
    """Poll until an event satisfies ``wanted`` (returns all events so far); fails on a timeout."""
    seen: list[WorkerEvent] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = worker.poll()
        seen += new
        if any(wanted(e) for e in new) or worker.finished:
            return seen
        time.sleep(0.02)
    worker.cancel()
    pytest.fail(f"worker did not report the expected event in {timeout} s; got {[e.kind for e in seen]}")


def _finish(job: WorkerProcess) -> list[WorkerEvent]:
    """Poll a started job to its end; returns its events."""
    return _wait_for(job, lambda e: e.kind == "finished")


def _network_events(events: list[WorkerEvent]) -> list[tuple[bool, int]]:
    """(reused, loads so far in the process) of each ``network`` event."""
    return [(e.data["reused"], e.data["loads"]) for e in events if e.kind == "network"]


def _labels(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)


def _group_gone(pgid: int, deadline: float) -> bool:
    """True once no process of the group is left (killed orphans are reaped by init a moment later)."""
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


def _fake_python(folder: Path, script: str) -> str:
    """A stand-in interpreter (shell script) for behaviour a real worker shows only when things go wrong."""
    path = folder / "python-fake"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)
    return str(path)


# ---------------------------------------------------------------- pure helpers


def test_python_executable_finds_pythonslicer_for_the_slicer_application() -> None:
    files = {Path("/opt/Slicer/bin/PythonSlicer"), Path("/Applications/Slicer.app/Contents/bin/PythonSlicer"),
             Path("C:/Slicer 5.12/bin/PythonSlicer.exe")}

    def pick(executable: str, platform: str = "linux", which=lambda name: None) -> str:
        return python_executable(executable, platform, which, lambda p: p in files)

    assert pick("/work/.venv/bin/python3.12") == "/work/.venv/bin/python3.12"
    assert pick("/opt/Slicer/bin/PythonSlicer") == "/opt/Slicer/bin/PythonSlicer"
    assert pick("/opt/Slicer/bin/SlicerApp-real") == str(Path("/opt/Slicer/bin/PythonSlicer"))
    assert pick("/Applications/Slicer.app/Contents/MacOS/Slicer", "darwin") == str(
        Path("/Applications/Slicer.app/Contents/bin/PythonSlicer"))
    assert pick("C:/Slicer 5.12/bin/SlicerApp-real.exe", "win32") == str(Path("C:/Slicer 5.12/bin/PythonSlicer.exe"))
    assert pick("/elsewhere/Slicer", which=lambda name: f"/launcher/{name}") == "/launcher/PythonSlicer"
    with pytest.raises(WorkerError, match="PythonSlicer"):
        pick("/elsewhere/Slicer")


@pytest.mark.parametrize("executable", ["", None])
@pytest.mark.parametrize("platform", ["linux", "darwin", "win32"])
def test_an_empty_sys_executable_gives_a_worker_error_that_says_what_to_do(executable, platform) -> None:
    """Slicer sets sys.executable to "" when it cannot find PythonSlicer: no ValueError from an empty path."""
    with pytest.raises(WorkerError, match=r"launcher \(PythonSlicer\) was not found .*Reinstall Slicer"):
        python_executable(executable, platform, lambda name: None, lambda path: True)
    on_path = python_executable(executable, platform, lambda name: f"/launcher/{name}", lambda path: True)
    assert on_path == "/launcher/PythonSlicer"


def test_the_child_falls_back_to_the_cpu_for_operations_mps_lacks() -> None:
    """Apple Silicon: 3-D ops missing on MPS run on the CPU instead of failing; a user's own value stays."""
    assert worker_environment({"PATH": "/bin"}, "darwin")[MPS_FALLBACK_VARIABLE] == "1"
    assert worker_environment({MPS_FALLBACK_VARIABLE: "0"}, "darwin")[MPS_FALLBACK_VARIABLE] == "0"
    assert MPS_FALLBACK_VARIABLE not in worker_environment({"PATH": "/bin"}, "linux")  # no MPS there


def test_the_worker_leaves_one_core_free_unless_told_otherwise(tiny_card) -> None:
    assert [default_worker_threads(n) for n in (None, 1, 2, 8, 64)] == [1, 1, 1, 7, 63]
    assert 1 <= usable_cpu_count() <= (os.cpu_count() or 1)
    image = _volume((8, 8, 8))
    default = default_worker_threads(usable_cpu_count())
    assert WorkerProcess([image], tiny_card).threads == default
    assert WorkerProcess([image], tiny_card, threads=None).threads == default
    assert WorkerProcess([image], tiny_card, threads=3).threads == 3


def test_windows_cancel_ends_the_whole_process_tree() -> None:
    """taskkill /T also ends the real Python behind the PythonSlicer launcher; /F does not ask it first."""
    assert taskkill_command(4242) == ["taskkill", "/T", "/F", "/PID", "4242"]


def test_parent_and_child_share_only_the_protocol_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither side imports the other (function-level imports too); the parent names the child's module."""
    grimp = pytest.importorskip("grimp", reason="grimp comes with import-linter")
    monkeypatch.syspath_prepend(str(LIB_PARENT))
    graph = grimp.build_graph("SegMambaSlicerLib", cache_dir=None)
    parent, child, protocol = (f"SegMambaSlicerLib.run.worker{m}" for m in ("", "_child", "_protocol"))
    assert not graph.chain_exists(importer=parent, imported=child)
    assert not graph.chain_exists(importer=child, imported=parent)
    assert not graph.chain_exists(importer=protocol, imported=parent)
    assert not graph.chain_exists(importer=protocol, imported=child)
    assert {parent, child} <= graph.find_modules_that_directly_import(protocol)
    assert CHILD_MODULE == worker_child.__name__


def test_exit_descriptions_and_out_of_memory_recognition() -> None:
    assert "out of memory" in describe_exit(-signal.SIGKILL, "linux")
    assert "segmentation fault" in describe_exit(-signal.SIGSEGV, "linux")
    assert describe_exit(3, "linux") == "exited with code 3"
    assert "access violation" in describe_exit(3221225477, "win32")
    assert "access violation" in describe_exit(-1073741819, "win32")  # the same code, signed

    class OutOfMemoryError(RuntimeError):  # torch.OutOfMemoryError's name, without importing CUDA
        pass

    assert is_out_of_memory(OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 17 GB)"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(ValueError("out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


def test_npz_hand_over_keeps_voxels_and_geometry_bit_exact(tmp_path: Path, oblique_labelmap: sitk.Image) -> None:
    image = sitk.Cast(oblique_labelmap, sitk.sitkFloat32) * 0.1 + 1e-7
    for original in (image, oblique_labelmap):
        back = load_image_npz(save_image_npz(original, tmp_path / "x.npz"))
        assert back.GetPixelID() == original.GetPixelID()
        np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(original))
        assert back.GetSpacing() == original.GetSpacing()
        assert back.GetOrigin() == original.GetOrigin()
        assert back.GetDirection() == original.GetDirection()


def test_job_lines_carry_any_path_on_one_ascii_line() -> None:
    path = Path("C:/Temp/Ünïcode folder with spaces/new\nline/job.json")
    line = format_job_line(path)
    assert line.endswith("\n") and line.count("\n") == 1 and line.isascii()
    assert parse_job_line(line) == path


def test_the_network_key_changes_with_what_the_network_is_built_from(tiny_card, tmp_path: Path) -> None:
    """Same card, weights file, folds, device and scan backend: reused; any of them changed: built anew."""
    job = {"card": card_to_dict(tiny_card), "card_path": str(tiny_card.source_path)}
    key = network_key(job, tiny_card, CPU, "cpu")
    window_options = SegmentOptions(device="cpu", overlap=0.25, tta=True)  # no part of the network
    assert network_key(dict(job), tiny_card, window_options, "cpu") == key
    assert network_key(job, tiny_card, CPU, "cuda:0") != key
    assert network_key(job, tiny_card, SegmentOptions(scan_backend="torch"), "cpu") != key
    assert network_key(job, tiny_card, SegmentOptions(folds=[0]), "cpu") != key
    other = tmp_path / "other.pt"
    shutil.copy(tiny_card.weights_path(), other)
    assert network_key(job, tiny_card, SegmentOptions(weights=str(other)), "cpu") != key
    renamed = {**job, "card": {**job["card"], "id": "tiny-2"}}
    assert network_key(renamed, tiny_card, CPU, "cpu") != key
    stat = tiny_card.weights_path().stat()
    os.utime(tiny_card.weights_path(), ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**6))  # replaced in place
    try:
        assert network_key(job, tiny_card, CPU, "cpu") != key
    finally:
        os.utime(tiny_card.weights_path(), ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_event_lines_parse_and_stray_output_becomes_log() -> None:
    line = format_event("result", output="C:/Temp/Ünïcode folder/labelmap.npz", volumes={"Lesion": 1.5})
    assert line.endswith("\n") and line.count("\n") == 1 and line.isascii()
    event = parse_event(line)
    assert (event.kind, event.data["output"]) == ("result", "C:/Temp/Ünïcode folder/labelmap.npz")
    error = parse_event(format_event("error", kind="OutOfMemory", message="out of memory"))
    assert (error.kind, error.data["kind"]) == ("error", "OutOfMemory")
    event = parse_event('{"event": "progress", "fraction": 0.25, "message": "window 1/4"}\n')
    assert (event.kind, event.fraction, event.message) == ("progress", 0.25, "window 1/4")
    assert parse_event("Warning: something printed\n") == WorkerEvent("log", "Warning: something printed")
    assert parse_event("[1, 2]").kind == "log"


# ---------------------------------------------------------------- real child processes


def test_worker_streams_progress_and_equals_in_process_run(tiny_card, one_thread) -> None:
    image = _volume((20, 28, 40))  # 40 voxels along x: two 32-voxel windows at overlap 0.5
    reported: list[tuple[float, str]] = []
    worker = WorkerProcess([image], tiny_card, CPU, threads=1)
    result = worker.run(progress=lambda fraction, message: reported.append((fraction, message)))

    expected = segment([image], tiny_card, CPU)
    got, want = sitk.GetArrayFromImage(result.labelmap), sitk.GetArrayFromImage(expected.labelmap)
    assert set(np.unique(want)) == {0, 1}  # the seeded network gives both labels: a real comparison
    np.testing.assert_array_equal(got, want)
    for attribute in ("GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(result.labelmap, attribute)() == getattr(image, attribute)()
    assert result.volumes == pytest.approx(expected.volumes)
    assert (result.windows, result.device, result.card) == (2, "cpu", tiny_card)
    fractions = [f for f, _ in reported]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert [m for _, m in reported if m.startswith("window")] == ["window 1/2", "window 2/2"]
    assert not worker.folder.exists()  # temporary inputs and output removed


def test_the_confidence_map_comes_back_from_the_worker(tiny_card, one_thread) -> None:
    image = _volume((20, 28, 40), seed=6)
    options = dataclasses.replace(CPU, confidence=True)
    result = WorkerProcess([image], tiny_card, options, threads=1).run()
    direct = segment([image], tiny_card, options)
    assert result.confidence is not None and result.confidence.GetSize() == image.GetSize()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(result.confidence), sitk.GetArrayFromImage(direct.confidence))
    assert result.confidence.GetDirection() == image.GetDirection()
    assert WorkerProcess([image], tiny_card, CPU, threads=1).run().confidence is None  # only when asked


def test_warnings_about_the_inputs_come_back_from_the_worker(tiny_card, one_thread) -> None:
    array = sitk.GetArrayFromImage(_volume((20, 28, 40), seed=2))
    array[3, 4, 5] = np.nan
    image = sitk.GetImageFromArray(array)
    result = WorkerProcess([image], tiny_card, CPU, threads=1).run()
    assert result.warnings == segment([image], tiny_card, CPU).warnings
    assert len(result.warnings) == 1 and "1 voxel of the T1 image (0.0045%) is not a number" in result.warnings[0]


def test_worker_runs_in_a_folder_with_spaces_and_non_ascii_characters(
    tiny_card, one_thread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Job file, npz hand-over, output and model card under "Ünïcode folder with spaces" (as on Windows)."""
    folder = tmp_path / "Ünïcode folder with spaces"
    folder.mkdir()
    for name in ("tiny.json", "tiny.pt"):
        shutil.copy(tiny_card.source_path.parent / name, folder / name)
    card = load_card(folder / "tiny.json")
    monkeypatch.setattr(tempfile, "tempdir", str(folder))  # where mkdtemp puts the worker's private folder
    image = _volume((20, 28, 40), seed=4)
    worker = WorkerProcess([image], card, CPU, threads=1)
    worker.start()
    assert worker.folder.parent == folder
    job = json.loads((worker.folder / "job.json").read_text(encoding="utf-8"))
    assert job["card_path"] == str(folder / "tiny.json")
    result = worker.run()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(result.labelmap),
                                  sitk.GetArrayFromImage(segment([image], card, CPU).labelmap))
    assert result.labelmap.GetOrigin() == image.GetOrigin()
    assert not worker.folder.exists() and sorted(p.name for p in folder.iterdir()) == ["tiny.json", "tiny.pt"]


@posix_only
def test_parent_starts_the_child_module_with_its_environment_and_default_threads(
    tiny_card, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the child is given, recorded by a stand-in interpreter: module, environment, job with threads."""
    monkeypatch.delenv(MPS_FALLBACK_VARIABLE, raising=False)
    seen = tmp_path / "seen"
    seen.mkdir()
    python = _fake_python(tmp_path, f'echo "$@" > "{seen}/argv"\n'
                                    f'echo "${MPS_FALLBACK_VARIABLE}" > "{seen}/mps"\n'
                                    'read -r line; job="${line#\\"}"\n'  # the job path: a JSON string
                                    f'cp "${{job%\\"}}" "{seen}/job.json"\nexit 1\n')
    with pytest.raises(WorkerCrashedError, match="exited with code 1"):
        WorkerProcess([_volume((8, 8, 8))], tiny_card, CPU, python=python).run()
    assert (seen / "argv").read_text().split() == ["-m", "SegMambaSlicerLib.run.worker_child"]
    assert (seen / "mps").read_text().strip() == worker_environment(os.environ).get(MPS_FALLBACK_VARIABLE, "")
    job = json.loads((seen / "job.json").read_text(encoding="utf-8"))
    assert job["threads"] == default_worker_threads(usable_cpu_count())
    assert job["options"]["device"] == "cpu" and job["inputs"][0].endswith("input0.npz")


@posix_only
def test_cancel_kills_the_process_group_within_two_seconds(tiny_card) -> None:
    worker = WorkerProcess([_volume((96, 96, 96), seed=1)], tiny_card, CPU, threads=1)  # 125 windows
    worker.start()
    # Cancel while it imports PyTorch: SIGKILL of the group does not depend on what the child is doing,
    # and waiting for the network phase would cost seconds of start-up per test run.
    seen = _wait_for(worker, lambda e: e.kind == "progress" and e.message == "loading PyTorch")
    time.sleep(0.3)
    assert not worker.finished, [e.message for e in seen]
    assert [e.kind for e in seen][0] == "started"
    start = time.monotonic()
    worker.cancel()
    assert time.monotonic() - start < 2.0
    assert worker.process.poll() is not None
    assert _group_gone(worker.process.pid, start + 2.0)
    assert not worker.folder.exists()
    with pytest.raises(CancelledError):
        worker.result()


def test_error_in_worker_reaches_caller_as_the_same_error(tiny_card, tmp_path: Path) -> None:
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    options = SegmentOptions(device="cpu", weights=str(broken))
    with pytest.raises(CheckpointError) as in_process:
        load_network(tiny_card, broken, torch.device("cpu"))
    with pytest.raises(CheckpointError) as in_worker:
        WorkerProcess([_volume((8, 8, 8))], tiny_card, options, threads=1).run()
    assert str(in_worker.value) == str(in_process.value)


@posix_only
def test_killed_worker_becomes_a_clear_out_of_memory_hint(tiny_card) -> None:
    worker = WorkerProcess([_volume((8, 8, 8))], tiny_card, CPU)
    worker.start()
    _wait_for(worker, lambda e: e.kind == "started")
    os.kill(worker.process.pid, signal.SIGKILL)  # what the kernel's out-of-memory killer does
    _wait_for(worker, lambda e: e.kind == "finished", timeout=10)
    with pytest.raises(WorkerCrashedError, match="killed .*out of memory"):
        worker.result()
    assert not worker.folder.exists()


@posix_only
def test_crash_without_report_quotes_the_last_stderr_lines(tiny_card, tmp_path: Path) -> None:
    python = _fake_python(tmp_path, "echo 'loading CUDA kernels' >&2\necho 'fatal: libcudart.so.12 missing' >&2\nexit 7\n")
    worker = WorkerProcess([_volume((8, 8, 8))], tiny_card, CPU, python=python)
    with pytest.raises(WorkerCrashedError) as error:
        worker.run()
    assert "exited with code 7" in str(error.value)
    assert str(error.value).endswith("loading CUDA kernels\nfatal: libcudart.so.12 missing")
    assert error.value.details == "loading CUDA kernels\nfatal: libcudart.so.12 missing"


@posix_only
def test_reported_out_of_memory_and_internal_errors_keep_their_meaning(tiny_card, tmp_path: Path) -> None:
    oom = '{"event": "error", "kind": "OutOfMemory", "message": "The computer ran out of memory", "traceback": "T"}'
    with pytest.raises(WorkerOutOfMemoryError, match="ran out of memory") as error:
        WorkerProcess([_volume((8, 8, 8))], tiny_card, CPU, python=_fake_python(tmp_path, f"echo '{oom}'\nexit 1\n")).run()
    assert error.value.details == "T"
    bug = '{"event": "error", "kind": "InternalError", "message": "KeyError: 0", "traceback": "Traceback ..."}'
    with pytest.raises(WorkerError, match="The segmentation failed: KeyError: 0") as error:
        WorkerProcess([_volume((8, 8, 8))], tiny_card, CPU, python=_fake_python(tmp_path, f"echo '{bug}'\nexit 1\n")).run()
    assert type(error.value) is WorkerError and error.value.details == "Traceback ..."


@posix_only
def test_cancel_also_ends_processes_the_worker_started(tiny_card, tmp_path: Path) -> None:
    python = _fake_python(tmp_path, "sleep 60 &\necho '{\"event\": \"started\"}'\nwait\n")
    worker = WorkerProcess([_volume((8, 8, 8))], tiny_card, CPU, python=python)
    worker.start()
    _wait_for(worker, lambda e: e.kind == "started", timeout=10)
    start = time.monotonic()
    worker.cancel()
    assert time.monotonic() - start < 2.0
    assert _group_gone(worker.process.pid, start + 2.0)  # the background sleep was in the group: gone too


@posix_only
def test_leftover_children_holding_the_pipes_do_not_hang_the_caller(tiny_card, tmp_path: Path) -> None:
    python = _fake_python(tmp_path, "sleep 60 &\nexit 0\n")  # the sleep inherits stdout and stderr
    start = time.monotonic()
    with pytest.raises(WorkerCrashedError, match="exited with code 0 before it could report a result"):
        WorkerProcess([_volume((8, 8, 8))], tiny_card, CPU, python=python).run()
    assert time.monotonic() - start < 10.0


@posix_only
def test_worker_exits_when_its_parent_goes_away(tiny_card) -> None:
    worker = WorkerProcess([_volume((8, 8, 8))], tiny_card, CPU)
    worker.start()
    _wait_for(worker, lambda e: e.kind == "started")
    worker.process.stdin.close()  # as if Slicer had crashed (the watch starts once the job is read)
    assert worker.process.wait(timeout=5) == 3
    _wait_for(worker, lambda e: e.kind == "finished", timeout=10)
    with pytest.raises(WorkerCrashedError, match="exited with code 3"):
        worker.result()



# ---------------------------------------------------------------- the warm worker (real child processes)


@pytest.fixture
def other_card(tiny_card, tmp_path: Path):
    """Another model of the same shape: other seeded weights, so its labels differ from tiny_card's."""
    torch.manual_seed(11)
    torch.save(build_network("segmamba_v1", **TINY_KWARGS).state_dict(), tmp_path / "other.pt")
    card = {**json.loads(tiny_card.source_path.read_text()), "id": "other-tiny",
            "weights": {"kind": "file", "file": "other.pt"}}
    (tmp_path / "other.json").write_text(json.dumps(card))
    return load_card(tmp_path / "other.json")


def test_a_warm_worker_keeps_its_process_and_last_network_between_jobs(
    tiny_card, other_card, one_thread
) -> None:
    """Same model again: same pid, network reused, the in-process result; another model: loaded anew."""
    warm = WarmWorker()
    images = [_volume((20, 28, 40), seed=s) for s in (7, 8)]
    try:
        first = warm.start([images[0]], tiny_card, CPU, threads=1)
        first_events = _finish(first)
        pid = warm.pid
        second = warm.start([images[1]], tiny_card, CPU, threads=1)
        second_events = _finish(second)
        assert warm.pid == pid == first.process.pid == second.process.pid
        assert "started" not in [e.kind for e in second_events]  # the process was already running
        assert "loading PyTorch" not in [e.message for e in second_events]
        assert (_network_events(first_events), _network_events(second_events)) == ([(False, 1)], [(True, 1)])
        for job, image in zip((first, second), images):
            want = segment([image], tiny_card, CPU)
            np.testing.assert_array_equal(_labels(job.result().labelmap), _labels(want.labelmap))
            assert job.result().volumes == pytest.approx(want.volumes)
            assert not job.folder.exists()
        assert set(np.unique(_labels(second.result().labelmap))) == {0, 1}

        third = warm.start([images[1]], other_card, CPU, threads=1)
        third_events = _finish(third)
        fourth = warm.start([images[1]], tiny_card, CPU, threads=1)  # only the last network is kept
        fourth_events = _finish(fourth)
        assert (_network_events(third_events), _network_events(fourth_events)) == ([(False, 2)], [(False, 3)])
        want = segment([images[1]], other_card, CPU).labelmap
        np.testing.assert_array_equal(_labels(third.result().labelmap), _labels(want))
        assert not np.array_equal(_labels(want), _labels(fourth.result().labelmap))  # a real change of model
        np.testing.assert_array_equal(_labels(fourth.result().labelmap), _labels(second.result().labelmap))
        assert warm.pid == pid
    finally:
        warm.release()


@posix_only
def test_cancel_kills_a_warm_worker_and_the_next_job_starts_a_fresh_one(tiny_card, one_thread) -> None:
    warm = WarmWorker()
    try:
        job = warm.start([_volume((96, 96, 96), seed=1)], tiny_card, CPU, threads=1)  # 125 windows
        _wait_for(job, lambda e: e.kind == "progress" and e.message.startswith("window"))
        pid = warm.pid
        start = time.monotonic()
        job.cancel()
        assert time.monotonic() - start < 2.0
        assert _group_gone(pid, start + 2.0) and warm.pid is None
        assert not job.folder.exists()
        with pytest.raises(CancelledError):
            job.result()
        image = _volume((20, 28, 40), seed=9)
        again = warm.start([image], tiny_card, CPU, threads=1)
        events = _finish(again)
        assert again.process.pid != pid and warm.pid == again.process.pid
        assert _network_events(events) == [(False, 1)]
        np.testing.assert_array_equal(_labels(again.result().labelmap),
                                      _labels(segment([image], tiny_card, CPU).labelmap))
    finally:
        warm.release()


@posix_only
def test_a_warm_worker_killed_between_jobs_is_replaced_on_the_next_job(tiny_card, one_thread) -> None:
    warm = WarmWorker()
    image = _volume((20, 28, 40), seed=10)
    try:
        first = warm.start([image], tiny_card, CPU, threads=1)
        _finish(first)
        os.kill(first.process.pid, signal.SIGKILL)  # a crash, or the out-of-memory killer, while idle
        first.process.wait(timeout=5)
        assert warm.pid is None
        second = warm.start([image], tiny_card, CPU, threads=1)
        events = _finish(second)
        assert second.process.pid != first.process.pid and [e.kind for e in events][0] == "started"
        np.testing.assert_array_equal(_labels(second.result().labelmap), _labels(first.result().labelmap))
    finally:
        warm.release()


def test_the_idle_timeout_ends_the_warm_process(tiny_card) -> None:
    warm = WarmWorker(idle_timeout=0.5)
    job = warm.start([_volume((8, 8, 8))], tiny_card, CPU, threads=1)
    _finish(job)
    assert job.process.poll() is None and warm.pid == job.process.pid  # warm right after the job
    job.process.wait(timeout=10)  # ended by the idle timer, half a second later
    assert warm.pid is None and job.result().windows == 1


def test_release_ends_the_warm_process_and_frees_its_memory(tiny_card) -> None:
    warm = WarmWorker()
    warm.release()  # nothing to release yet
    job = warm.start([_volume((8, 8, 8))], tiny_card, CPU, threads=1)
    _finish(job)
    assert warm.pid == job.process.pid
    start = time.monotonic()
    warm.release()
    assert job.process.poll() is not None and time.monotonic() - start < 2.0
    assert warm.pid is None
    job.result()  # the finished job's result stays


@posix_only
def test_a_warm_worker_runs_one_job_at_a_time_and_release_cancels_a_running_one(
    tiny_card, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    python = _fake_python(tmp_path, "echo '{\"event\": \"started\"}'\nsleep 60\n")
    (tmp_path / "temp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "temp"))  # where the jobs' folders go
    warm = WarmWorker(python=python)
    job = warm.start([_volume((8, 8, 8))], tiny_card, CPU)
    _wait_for(job, lambda e: e.kind == "started", timeout=10)
    with pytest.raises(WorkerError, match="busy with another segmentation"):
        warm.start([_volume((8, 8, 8))], tiny_card, CPU)
    assert [p.name for p in (tmp_path / "temp").iterdir()] == [job.folder.name]  # none of the refused job
    warm.release()
    assert job.finished and job.process.poll() is not None and not job.folder.exists()
    with pytest.raises(CancelledError):
        job.result()


@posix_only
def test_a_warm_worker_exits_when_its_parent_goes_away_between_jobs(tiny_card) -> None:
    warm = WarmWorker()
    job = warm.start([_volume((8, 8, 8))], tiny_card, CPU, threads=1)
    _finish(job)
    job.process.stdin.close()  # as if Slicer had exited while the worker waited for the next click
    assert job.process.wait(timeout=5) == 3
    warm.release()

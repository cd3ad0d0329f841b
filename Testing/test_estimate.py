"""The estimate before a run: windows as the run makes them, time from a measured rate, memory, the verdict,
the rate cache, and measurements that really measure (engine/estimate.py)."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from SegMambaSlicerLib.engine import estimate as est
from SegMambaSlicerLib.engine import memory, rates
from SegMambaSlicerLib.engine.inference import WindowSettings, predict_logits
from SegMambaSlicerLib.engine.pipeline import SegmentOptions, load_network, segment
from SegMambaSlicerLib.engine.recipes import recipe_for
from SegMambaSlicerLib.errors import InputImageError
from SegMambaSlicerLib.io.geometry import stack_channels
from SegMambaSlicerLib.models.cards import card_from_dict, load_card
from toy_models import PointwiseNet

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


def _image(array_zyx: np.ndarray, spacing=(1.0, 1.0, 1.0), direction=None, origin=(0.0, 0.0, 0.0)) -> sitk.Image:
    image = sitk.GetImageFromArray(array_zyx.astype(np.float32))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    return image


def _blob(shape, lo, hi, value=3.0) -> np.ndarray:
    array = np.zeros(shape, np.float32)
    array[tuple(slice(a, b) for a, b in zip(lo, hi))] = value
    array[tuple((a + b) // 2 for a, b in zip(lo, hi))] = 2 * value  # contrast
    return array


def _card(spacing=None, orientation="LPS", roi=16, **inference):
    raw = {
        "id": "toy", "display_name": "Toy", "architecture": {"name": "toy", "kwargs": {}},
        "channels": [{"key": f"c{i}", "display_name": f"Channel {i}", "synonyms": []} for i in range(2)],
        "labels": [{"value": v, "name": f"Label {v}", "color": [0.5, 0.5, 0.5]} for v in (1, 2)],
        "orientation": orientation,
        "preprocessing": {"scheme": "crop_nonzero_zscore", "spacing": spacing},
        "inference": {"roi_size": [roi] * 3, "overlap": 0.5, "sw_batch_size": 2, **inference},
    }
    return card_from_dict(raw)


# ---------------------------------------------------------------- windows and grids


@pytest.mark.parametrize("tiling", ["monai", "nnunet"])
@pytest.mark.parametrize("mirror_axes", [(), (0, 2)])
def test_network_passes_are_the_passes_the_sliding_window_makes(tiling: str, mirror_axes: tuple) -> None:
    """Counted against the network calls of a real sliding-window run (each flip of TTA is one pass)."""
    shape = (20, 45, 33)
    settings = WindowSettings(roi_size=(16, 16, 16), overlap=0.5, sw_batch_size=2, mirror_axes=mirror_axes,
                              tiling=tiling)
    measured = rates.MeasuredNetwork(PointwiseNet(np.ones((2, 1)), np.zeros(2)))
    predict_logits(measured, torch.ones((1, 1, *shape)), settings, CPU)
    assert measured.windows == est.network_passes(shape, settings)
    assert est.network_passes(shape, settings) > (len(mirror_axes) + 1) * 8  # several windows, really tiled


@pytest.mark.parametrize("card_spacing", [None, (2.0, 1.5, 3.0)])
def test_network_grid_is_the_grid_the_segmamba_recipe_makes(card_spacing) -> None:
    """An oblique-free but permuted, flipped, anisotropic grid, two channels: the recipe's own network input."""
    direction = (0.0, 0.0, 1.0, -1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # index axes point along world z, -x, y
    shape = (40, 57, 23)
    images = [_image(_blob(shape, (3, 10, 2), (30, 50, 20)), (0.9, 1.3, 2.5), direction),
              _image(_blob(shape, (5, 4, 6), (28, 44, 21)), (0.9, 1.3, 2.5), direction)]
    card = _card(spacing=card_spacing)
    net_input, _restore = recipe_for(card).prepare(stack_channels(images), images[0], card)
    case = est.case_grid(images)
    assert case.box_lo == (3, 4, 2) and case.box_hi == (30, 50, 21)  # the union of both channels' boxes
    assert est.network_shape(case, card) == tuple(net_input.shape[1:])


def test_a_channel_on_another_grid_adds_its_content_where_the_first_grid_sees_it() -> None:
    """The pipeline resamples other grids onto the first; the mapped box is within a voxel of what it makes."""
    from SegMambaSlicerLib.engine.pipeline import _read_on_grid

    first = _image(_blob((30, 40, 40), (10, 10, 10), (20, 30, 30)), (1.0, 1.0, 2.0))
    other = _image(_blob((25, 50, 50), (2, 5, 30), (12, 45, 48)), (0.8, 0.8, 2.0), origin=(3.0, -2.0, 5.0))
    card = _card()
    on_grid, _ = _read_on_grid([first, other], card)
    data = stack_channels(on_grid)
    mask = np.any(data != 0, axis=0)
    lo = [int(np.flatnonzero(mask.any(axis=tuple(b for b in range(3) if b != a)))[0]) for a in range(3)]
    hi = [int(np.flatnonzero(mask.any(axis=tuple(b for b in range(3) if b != a)))[-1]) + 1 for a in range(3)]
    case = est.case_grid([first, other])
    assert case.box_hi[2] > 30  # the other channel widens the box beyond the first one's content
    assert all(abs(a - b) <= 1 for a, b in zip(case.box_lo, lo)) and all(abs(a - b) <= 1 for a, b in zip(case.box_hi, hi))


def test_network_grid_is_the_grid_nnunet_preprocessing_makes() -> None:
    from SegMambaSlicerLib.engine.recipes.nnunet import preprocess_nnunet
    from SegMambaSlicerLib.models.nnunet import settings_from_plans

    paths = [FIXTURES / name for name in ("mambaclinix_tiny_plans.json", "mambaclinix_small_dataset.json")]
    if not all(p.is_file() for p in paths):
        pytest.skip(f"shared fixtures not found ({FIXTURES})")
    plans, dataset = (json.loads(p.read_text(encoding="utf-8")) for p in paths)
    settings = settings_from_plans(plans, dataset, "3d_fullres")
    settings = dataclasses.replace(settings, transpose_forward=(2, 0, 1), spacing=(1.5, 0.7, 2.2))
    image = _image(_blob((31, 26, 37), (4, 3, 5), (29, 20, 33), value=200.0), (1.1, 0.6, 1.7))
    net_input, _geometry = preprocess_nnunet(stack_channels([image]), image.GetSpacing()[::-1], settings)
    case = est.case_grid([image])
    assert est.network_shape(case, _card(), nnunet_settings=settings) == tuple(net_input.shape[1:])


def test_an_empty_case_is_refused_as_the_pipeline_refuses_it() -> None:
    with pytest.raises(InputImageError, match="zero everywhere"):
        est.case_grid([_image(np.zeros((8, 8, 8)))])


# ---------------------------------------------------------------- time and memory from a rate


def _case() -> est.CaseGrid:
    return est.case_grid([_image(_blob((40, 48, 44), (4, 6, 2), (36, 40, 42)))] * 2)


RATE = rates.Rate(seconds_per_window=0.5, window_bytes=300 * 2**20, window_bytes_exact=True, weights_bytes=50 * 2**20,
                runtime_bytes=400 * 2**20, warmup_seconds=2.0, overhead_seconds_per_megavoxel=0.25)


def test_time_is_windows_times_the_rate_plus_the_warm_up_of_a_cold_process_and_the_overhead() -> None:
    card, case = _card(), _case()
    settings = WindowSettings(roi_size=(16, 16, 16), overlap=0.5, sw_batch_size=1, mirror_axes=(0, 1, 2))
    got = est.estimate(case, card, settings, "cpu", RATE, free_bytes=None)
    windows = est.network_passes(case.box_shape, settings)
    assert got.windows == windows == 8 * math.prod(math.ceil((n - 16) / 8) + 1 for n in case.box_shape)
    assert got.seconds == pytest.approx(windows * 0.5 + 2.0 + 0.25 * case.voxels * 2 / 1e6)
    warm = est.estimate(case, card, settings, "cpu", RATE, free_bytes=None, warm=True)
    assert warm.seconds == pytest.approx(windows * 0.5 + 0.25 * case.voxels * 2 / 1e6)
    assert est.estimate(case, card, settings, "cpu", None, free_bytes=None).seconds is None


def test_peak_memory_adds_runtime_weights_and_the_largest_phase() -> None:
    card, case = _card(), _case()
    settings = WindowSettings(roi_size=(16, 16, 16), overlap=0.5, sw_batch_size=1)
    on_cpu = est.estimate(case, card, settings, "cpu", RATE, free_bytes=None)
    phases = on_cpu.buffers
    assert phases is not None
    assert on_cpu.peak_bytes == RATE.runtime_bytes + RATE.weights_bytes + max(
        phases.prepare, phases.network + RATE.window_bytes, phases.restore)
    assert not on_cpu.peak_is_lower_bound and on_cpu.gpu_peak_bytes is None
    on_gpu = est.estimate(case, card, settings, "cuda", RATE, free_bytes=None, gpu_free_bytes=2**30)
    assert on_gpu.gpu_peak_bytes == RATE.weights_bytes + RATE.window_bytes  # the network lives on the GPU
    assert on_gpu.peak_bytes == RATE.runtime_bytes + phases.peak  # the host holds images and stitching
    unmeasured = est.estimate(case, card, settings, "cpu", None, free_bytes=None)
    assert unmeasured.peak_is_lower_bound and unmeasured.peak_bytes == phases.peak
    # what each setting adds: the confidence map (crop and full grid), TTA's flipped input and sums
    with_confidence = est.buffer_bytes(case, card, case.box_shape, settings, confidence=True)
    assert with_confidence.restore - phases.restore == 4 * (math.prod(case.box_shape) + case.voxels)
    with_tta = est.buffer_bytes(case, card, case.box_shape, dataclasses.replace(settings, mirror_axes=(0,)))
    assert with_tta.network - phases.network == 4 * (2 + 2 * 3) * math.prod(case.box_shape)


def test_the_network_input_and_logits_are_within_the_buffers_of_the_network_phase() -> None:
    """The real recipe's network input and a logits array of its grid fit in what the estimate counts."""
    images = [_image(_blob((40, 48, 44), (4, 6, 2), (36, 40, 42)))] * 2
    card = _card(spacing=(2.0, 2.0, 2.0))
    net_input, _ = recipe_for(card).prepare(stack_channels(images), images[0], card)
    settings = WindowSettings(roi_size=(16, 16, 16), overlap=0.5, sw_batch_size=1)
    case = est.case_grid(images)
    buffers = est.buffer_bytes(case, card, est.network_shape(case, card), settings)
    arrays = 2 * sum(img.GetNumberOfPixels() * 4 for img in images) + net_input.nbytes + 3 * net_input[0].nbytes * 2
    assert buffers.network >= arrays


# ---------------------------------------------------------------- the verdict


def _estimate(peak: int, free: int | None, **changes) -> est.Estimate:
    base = est.Estimate(windows=8, network_shape=(32, 32, 32), device="cpu", seconds=10.0, peak_bytes=peak,
                        peak_is_lower_bound=False, gpu_peak_bytes=None, free_bytes=free, gpu_free_bytes=None)
    return dataclasses.replace(base, **changes)


def test_too_little_memory_is_said_with_what_to_change() -> None:
    short = est.memory_shortfall(_estimate(peak=9 * 2**30, free=4 * 2**30, resident_bytes=2**30))
    assert short is not None and (short.needed_bytes, short.free_bytes) == (8 * 2**30, 4 * 2**30)
    message = est.shortfall_message(short, "--low-memory", "--device cpu")
    assert "8.0 GiB of memory" in message and "4.0 GiB is free" in message and "--low-memory" in message
    assert "--device cpu" not in message  # on the CPU already
    already = est.memory_shortfall(_estimate(peak=9 * 2**30, free=4 * 2**30, low_memory=True))
    assert already is not None and "--low-memory" not in est.shortfall_message(already, "--low-memory", "x")


def test_a_gpu_without_room_suggests_low_memory_and_the_cpu() -> None:
    short = est.memory_shortfall(_estimate(peak=2**30, free=8 * 2**30, device="cuda", gpu_peak_bytes=6 * 2**30,
                                           gpu_free_bytes=4 * 2**30))
    assert short is not None and short.where == "GPU memory"
    message = est.shortfall_message(short, "--low-memory", "--device cpu")
    assert "--low-memory" in message and "--device cpu" in message


def test_enough_or_unknown_free_memory_never_refuses() -> None:
    assert est.memory_shortfall(_estimate(peak=3 * 2**30, free=4 * 2**30)) is None
    assert est.memory_shortfall(_estimate(peak=5 * 2**30, free=4 * 2**30, resident_bytes=2 * 2**30)) is None
    assert est.memory_shortfall(_estimate(peak=2**50, free=None)) is None


def test_the_summary_line_reads_as_the_cli_prints_it() -> None:
    line = est.summary(_estimate(peak=int(1.2 * 2**30), free=int(18.3 * 2**30), windows=60, seconds=35.2))
    assert line == "60 windows, ~35 s, peak ~1.2 GiB (free 18.3 GiB)"
    unknown = est.summary(_estimate(peak=600 * 2**20, free=None, seconds=None, peak_is_lower_bound=True), "later")
    assert unknown.startswith("8 windows, later, peak ≥ 600 MiB") and unknown.endswith("(free unknown)")


def test_available_memory_is_read_from_meminfo() -> None:
    text = "MemTotal:       24576000 kB\nMemFree:          100000 kB\nMemAvailable:   19000000 kB\n"
    assert memory.mem_available_from_meminfo(text) == 19000000 * 1024
    assert memory.mem_available_from_meminfo("MemTotal: 1 kB\n") is None
    free = memory.available_memory()
    assert free is None or free > 0


# ---------------------------------------------------------------- the rate cache


def test_the_rate_survives_a_round_trip_through_its_file(home: Path) -> None:
    key = rates.rate_key(_card(), WindowSettings((16, 16, 16), 0.5, 1), CPU, threads=3)
    assert rates.cached_rate(key) is None
    rates.remember_rate(key, RATE)
    assert json.loads((home / rates.ESTIMATES_FILE).read_text(encoding="utf-8"))["version"] == rates.ESTIMATES_VERSION
    back = rates.cached_rate(key)
    assert back is not None and dataclasses.replace(back, updated="") == RATE and back.updated
    other = rates.rate_key(_card(), WindowSettings((16, 16, 16), 0.5, 1), CPU, threads=3, low_memory=True)
    assert other != key and rates.cached_rate(other) is None  # the low-memory setting has its own rate
    (home / rates.ESTIMATES_FILE).write_text("{not json", encoding="utf-8")
    assert rates.cached_rate(key) is None  # a damaged record counts as none: the next run measures again


def test_a_cache_that_cannot_be_written_is_only_a_missed_shortcut(tmp_path: Path, monkeypatch) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x", encoding="utf-8")
    monkeypatch.setenv("SEGMAMBA_SLICER_HOME", str(blocker))
    key = rates.rate_key(_card(), WindowSettings((16, 16, 16), 0.5, 1), CPU)
    rates.remember_rate(key, RATE)
    assert rates.cached_rate(key) is None


def _measured(ends: list[float], window_bytes: int) -> rates.MeasuredNetwork:
    """A record of passes that ended at ``ends`` seconds (the first started at 0), one window each."""
    measured = rates.MeasuredNetwork(torch.nn.Identity())
    starts = [0.0, *ends[:-1]]
    measured.calls = [(a, b, 1) for a, b in zip(starts, ends)]
    measured.window_bytes, measured.window_bytes_exact = window_bytes, True
    return measured


def test_a_run_replaces_a_calibrated_rate_then_averages_with_earlier_runs() -> None:
    calibrated = dataclasses.replace(RATE, source="calibration", windows_timed=1)
    first = rates.rate_after_run(calibrated, _measured([4.0, 6.0, 8.0], 50 * 2**20), run_seconds=10.0,
                               input_voxels=2_000_000, weights=RATE.weights_bytes, runtime=None)
    assert first is not None and first.source == "run"
    assert (first.seconds_per_window, first.windows_timed, first.warmup_seconds) == (2.0, 2, 2.0)
    assert first.overhead_seconds_per_megavoxel == pytest.approx((10.0 - 8.0) / 2.0)
    assert first.window_bytes == RATE.window_bytes  # a run's first window reuses kept memory: never lowers it
    assert first.runtime_bytes == RATE.runtime_bytes  # not measured in this run: kept
    second = rates.rate_after_run(first, _measured([1.0, 2.0, 3.0], 900 * 2**20), run_seconds=3.0,
                                input_voxels=2_000_000, weights=RATE.weights_bytes, runtime=2**29, cold=False)
    assert second is not None and second.seconds_per_window == pytest.approx(1.5) and second.windows_timed == 4
    assert second.warmup_seconds == 2.0  # a warm process measures no warm-up
    assert second.window_bytes == 900 * 2**20 and second.runtime_bytes == 2**29


# ---------------------------------------------------------------- measuring for real


class _Sleeper(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.05)
        return x


class _Allocator(torch.nn.Module):
    """Touches 160 MiB of fresh memory per pass, as a network's activations do."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scratch = torch.ones(160 * 2**20 // 4)
        return x + scratch[:1].sum() * 0


def test_the_rate_is_the_time_of_the_passes_after_the_first() -> None:
    measured = rates.MeasuredNetwork(_Sleeper())
    for _ in range(4):
        measured(torch.zeros((1, 1, 2, 2, 2)))
    assert 0.05 <= measured.seconds_per_window < 0.2 and measured.windows == 4
    assert measured.network_seconds is not None and measured.network_seconds >= 0.2


def test_a_window_that_touches_memory_is_measured_with_that_memory() -> None:
    settings = WindowSettings((8, 8, 8), 0.5, 1)
    measured = rates.calibrate(_Allocator(), 1, settings, CPU)
    assert measured.window_bytes is not None
    assert 150 * 2**20 <= measured.window_bytes <= 200 * 2**20
    assert measured.windows == rates.CALIBRATION_WINDOWS


def test_calibration_then_a_real_run_of_the_tiny_segmamba_measure_and_the_estimate_counts_its_windows(
        home: Path, card_path: Path, case: dict[str, Path]) -> None:
    card = load_card(card_path)
    options = SegmentOptions(device="cpu")
    images = [sitk.ReadImage(str(case[c.key]), sitk.sitkFloat32) for c in card.channels]
    grid = est.case_grid(images)
    network = load_network(card, None, CPU)
    key = rates.run_key(card, options, CPU)
    calibrated = rates.calibrate_run(network, card, options, CPU, runtime=None)
    assert calibrated.seconds_per_window > 0 and calibrated.window_bytes is not None and calibrated.window_bytes > 0
    assert calibrated.weights_bytes == sum(t.numel() * t.element_size()
                                           for t in (*network.parameters(), *network.buffers())) > 0
    rates.remember_rate(key, calibrated)
    before, _, _ = est.estimate_run(grid, card, options, CPU)
    measured = rates.MeasuredNetwork(network)
    result = segment(images, card, options, network=measured)
    assert before.windows == measured.windows == result.windows and before.seconds is not None
    rate = rates.record_run(key, measured, result.seconds, grid.voxels * grid.channels, rates.weights_bytes(network),
                          runtime=memory.current_rss())
    assert rate is not None and rates.cached_rate(key) == dataclasses.replace(rate, updated=rates.cached_rate(key).updated)
    assert rate.source == "run" and rate.overhead_seconds_per_megavoxel is not None
    after, _, _ = est.estimate_run(grid, card, options, CPU)
    assert after.seconds is not None and not after.peak_is_lower_bound

"""Sliding-window inference: window counts, blending of a pointwise model, TTA, progress, cancel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from SegMambaSlicerLib.engine.inference import (
    WindowSettings,
    count_windows,
    mirror_flips,
    nnunet_gaussian,
    nnunet_steps,
    predict_logits,
    windows_per_axis,
)
from SegMambaSlicerLib.errors import CancelledError
from toy_models import PointwiseNet


@pytest.mark.parametrize(
    ("size", "roi", "overlap", "expected"),
    [
        (128, 128, 0.5, 1),  # one window when the volume equals the roi
        (100, 128, 0.5, 1),  # padded up to the roi
        (155, 128, 0.5, 2),  # starts 0, 27 (last start clamped to size - roi)
        (240, 128, 0.5, 3),  # starts 0, 64, 112
        (240, 128, 0.0, 2),  # starts 0, 112
        (40, 16, 0.25, 3),  # interval 12: starts 0, 12, 24
    ],
)
def test_windows_per_axis_matches_hand_counts(size: int, roi: int, overlap: float, expected: int) -> None:
    assert windows_per_axis(size, roi, overlap) == expected


def _net(channels: int = 2, outputs: int = 3) -> tuple[PointwiseNet, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    weight, bias = rng.normal(size=(outputs, channels)), rng.normal(size=outputs)
    return PointwiseNet(weight, bias), weight, bias


@pytest.mark.parametrize("tta", [False, True])
def test_pointwise_model_is_unchanged_by_windows_blending_and_mirroring(tta: bool) -> None:
    net, weight, bias = _net()
    x = torch.randn(1, 2, 20, 23, 17, generator=torch.Generator().manual_seed(0))
    settings = WindowSettings((16, 16, 16), 0.5, 3, mirror_axes=(0, 1, 2) if tta else ())
    logits = predict_logits(net, x, settings, torch.device("cpu"))
    expected = np.tensordot(weight, x[0].double().numpy(), axes=([1], [0])) + bias[:, None, None, None]
    np.testing.assert_allclose(logits[0].numpy(), expected, atol=1e-4)
    # MONAI's own tiling called the network on exactly the windows we count (per mirror pass)
    assert net.calls == count_windows(x.shape[2:], settings) * len(mirror_flips(settings.mirror_axes))


def test_cpu_runs_the_windows_of_a_batch_one_at_a_time() -> None:
    """Half the peak memory at the same logits: on the CPU a sw batch of 3 reaches the network window by window."""
    net, weight, bias = _net()
    sizes: list[int] = []
    net.register_forward_pre_hook(lambda _module, args: sizes.append(args[0].shape[0]))
    x = torch.randn(1, 2, 30, 30, 30, generator=torch.Generator().manual_seed(3))
    settings = WindowSettings((16, 16, 16), 0.5, 3)
    logits = predict_logits(net, x, settings, torch.device("cpu"))
    assert sizes == [1] * count_windows(x.shape[2:], settings)
    expected = np.tensordot(weight, x[0].double().numpy(), axes=([1], [0])) + bias[:, None, None, None]
    np.testing.assert_allclose(logits[0].numpy(), expected, atol=1e-4)


def test_mirror_flips_are_identity_plus_all_subsets() -> None:
    flips = mirror_flips((0, 1, 2))
    assert len(flips) == 8 and flips[0] == () and (2, 3, 4) in flips and len(set(flips)) == 8


def test_progress_is_monotonic_and_reaches_one() -> None:
    net, _, _ = _net()
    seen: list[float] = []
    predict_logits(
        net,
        torch.randn(1, 2, 30, 30, 30),
        WindowSettings((16,) * 3, 0.5, 2),
        torch.device("cpu"),
        progress=lambda f, m: seen.append(f),
    )
    assert seen == sorted(seen) and seen[-1] == pytest.approx(1.0) and len(seen) > 3


def test_cancel_stops_between_windows() -> None:
    net, _, _ = _net()
    settings = WindowSettings((16,) * 3, 0.5, 1)
    total = count_windows((30, 30, 30), settings)
    with pytest.raises(CancelledError):
        predict_logits(
            net, torch.randn(1, 2, 30, 30, 30), settings, torch.device("cpu"), cancel=lambda: net.calls >= 3
        )
    assert net.calls == 3 < total


# ---------------------------------------------------------------- nnU-Net tiling (MambaClinix)


def test_nnunet_steps_hand_cases() -> None:
    assert nnunet_steps(110, 64, 0.5) == [0, 23, 46]  # nnU-Net's own documented example
    assert nnunet_steps(64, 64, 0.5) == [0]
    assert nnunet_steps(100, 50, 1.0) == [0, 50]


def test_nnunet_importance_map_peaks_at_the_tile_centre_and_has_no_zeros() -> None:
    weights = nnunet_gaussian((9, 12, 16))
    assert weights.max() == 10.0 and weights[4, 6, 8] == 10.0 and weights.min() > 0
    assert torch.equal(weights, weights.half().float())  # float16 values, as nnU-Net stores them


@pytest.mark.parametrize(("shape", "tta"), [((20, 23, 17), False), ((9, 30, 12), True)])
def test_nnunet_tiling_leaves_a_pointwise_model_unchanged(shape: tuple[int, ...], tta: bool) -> None:
    """Padding (9 < 16), uneven starts, Gaussian blending and per-window mirroring cancel for W·x + b."""
    net, weight, bias = _net()
    x = torch.randn(1, 2, *shape, generator=torch.Generator().manual_seed(2))
    settings = WindowSettings((16, 16, 16), 0.5, 3, mirror_axes=(0, 1, 2) if tta else (), tiling="nnunet")
    logits = predict_logits(net, x, settings, torch.device("cpu"))
    expected = np.tensordot(weight, x[0].double().numpy(), axes=([1], [0])) + bias[:, None, None, None]
    assert logits.shape == (1, 3, *shape)
    np.testing.assert_allclose(logits[0].numpy(), expected, atol=1e-4)
    assert net.calls == count_windows(shape, settings) * len(mirror_flips(settings.mirror_axes))


def test_nnunet_tiling_reports_progress_and_cancels() -> None:
    net, _, _ = _net()
    settings = WindowSettings((16,) * 3, 0.5, 1, tiling="nnunet")
    seen: list[float] = []
    predict_logits(
        net,
        torch.randn(1, 2, 30, 30, 30),
        settings,
        torch.device("cpu"),
        progress=lambda f, m: seen.append(f),
    )
    assert (
        seen == sorted(seen)
        and seen[-1] == pytest.approx(1.0)
        and len(seen) == count_windows((30,) * 3, settings)
    )
    net.calls = 0
    with pytest.raises(CancelledError):
        predict_logits(
            net, torch.randn(1, 2, 30, 30, 30), settings, torch.device("cpu"), cancel=lambda: net.calls >= 2
        )
    assert net.calls == 2

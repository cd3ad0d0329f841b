"""The CPU speed-ups keep the numbers: layout-preserving layers, channels-last networks, memory reuse.

Each speed-up is checked against an independent expectation: a float64 formula, the built-in layer it
replaces, the channels-first computation of the same network, the official fixtures, or (for the
allocator setting) the page faults the kernel reports.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from allocator_fakes import KEEP, RESTORE, FakeLibc
from SegMambaSlicerLib.engine import devices
from SegMambaSlicerLib.engine.devices import reuse_freed_cpu_memory
from SegMambaSlicerLib.engine.inference import WindowSettings, predict_logits
from SegMambaSlicerLib.networks import segmamba_v1, segmamba_v2
from SegMambaSlicerLib.networks.segmamba_encoder_decoder import (
    LayoutPreservingInstanceNorm3d,
    PointwiseConv3d,
    use_layout_preserving_layers,
    volume_from_tokens,
)
from shared_data import FIXTURES, fixture_weights, require
from torch import nn
from toy_models import PointwiseNet

CL = torch.channels_last_3d


pytestmark = pytest.mark.usefixtures("one_thread")


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=CL)


# ------------------------------------------------------------------ layers


def _instance_norm_float64(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                           eps: float) -> torch.Tensor:
    """Textbook instance norm in float64: per sample and channel, biased variance, eps inside the root."""
    x = x.double()
    mean = x.mean(dim=(2, 3, 4), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(2, 3, 4), keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight.double()[:, None, None, None] + bias.double()[:, None, None, None]
    return y


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("batch", [1, 2])
def test_instance_norm_keeps_channels_last_and_matches_the_formula(affine: bool, batch: int) -> None:
    g = torch.Generator().manual_seed(0)
    norm = nn.Sequential(nn.InstanceNorm3d(6, affine=affine))
    if affine:
        with torch.no_grad():
            norm[0].weight.copy_(1 + torch.randn(6, generator=g))
            norm[0].bias.copy_(torch.randn(6, generator=g))
    use_layout_preserving_layers(norm)
    assert type(norm[0]) is LayoutPreservingInstanceNorm3d
    # channel means far from zero relative to the spread: a one-pass E[x^2] - E[x]^2 would fail this
    x = torch.randn(batch, 6, 9, 10, 11, generator=g) * 0.5 + 40 * torch.randn(1, 6, 1, 1, 1, generator=g)
    y = norm(_channels_last(x))
    assert y.is_contiguous(memory_format=CL) and not y.is_contiguous()
    expected = _instance_norm_float64(x, norm[0].weight, norm[0].bias, norm[0].eps)
    torch.testing.assert_close(y.double(), expected, rtol=0, atol=2e-6)  # the built-in is off by ~1e-5 here
    # channels-first input: exactly the built-in layer
    builtin = F.instance_norm(x, weight=norm[0].weight, bias=norm[0].bias, eps=norm[0].eps)
    assert torch.equal(norm(x), builtin)


@pytest.mark.parametrize("threads", [1, 2])
def test_pointwise_conv_keeps_channels_last_and_matches_conv3d(threads: int) -> None:
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(1)
    conv = nn.Sequential(nn.Conv3d(5, 3, 1))
    use_layout_preserving_layers(conv)
    assert type(conv[0]) is PointwiseConv3d
    x = torch.randn(2, 5, 6, 7, 8, generator=g)
    with torch.no_grad():
        y = conv(_channels_last(x))
        expected = F.conv3d(x.double(), conv[0].weight.double(), conv[0].bias.double())
        assert torch.equal(conv(x), F.conv3d(x, conv[0].weight, conv[0].bias))
    assert y.is_contiguous(memory_format=CL)
    torch.testing.assert_close(y.double(), expected, rtol=0, atol=1e-5)


def test_only_plain_instance_norms_and_pointwise_convs_are_retyped() -> None:
    layers = nn.Sequential(
        nn.InstanceNorm3d(4), nn.InstanceNorm3d(4, track_running_stats=True), nn.Conv3d(4, 4, 1),
        nn.Conv3d(4, 4, 3), nn.Conv3d(4, 4, 1, stride=2), nn.Conv3d(4, 4, 1, groups=2), nn.BatchNorm3d(4),
    )
    keys = [(k, v.shape) for k, v in layers.state_dict().items()]
    use_layout_preserving_layers(layers)
    assert [type(m) for m in layers] == [
        LayoutPreservingInstanceNorm3d, nn.InstanceNorm3d, PointwiseConv3d, nn.Conv3d, nn.Conv3d, nn.Conv3d,
        nn.BatchNorm3d,
    ]
    assert [(k, v.shape) for k, v in layers.state_dict().items()] == keys


@pytest.mark.parametrize("batch", [1, 2])
def test_volume_from_tokens_round_trips_with_canonical_strides(batch: int) -> None:
    like = _channels_last(torch.randn(batch, 3, 4, 5, 6))
    tokens = like.reshape(batch, 3, -1).transpose(1, 2)
    assert tokens.is_contiguous()  # the channels-last token view needs no copy
    back = volume_from_tokens(tokens.clone(), like=like)
    assert torch.equal(back, like) and back.stride() == like.stride()
    first = like.contiguous()
    back = volume_from_tokens(first.reshape(batch, 3, -1).transpose(1, 2), like=first)
    assert torch.equal(back, first) and back.is_contiguous()


# ------------------------------------------------------------------ networks


def _decoder_input_layouts(model: nn.Module) -> list[bool]:
    """Record whether the last decoder block receives channels-last input (proves the fast path ran)."""
    seen: list[bool] = []
    model.decoder1.register_forward_pre_hook(lambda _m, args: seen.append(args[0].is_contiguous(memory_format=CL)))
    return seen


def test_channels_last_network_matches_channels_first_computation(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = segmamba_v1.SegMambaV1(in_chans=2, out_chans=3, depths=(1, 1, 1, 1), feat_size=(48, 16, 16, 16),
                                   hidden_size=16).eval()
    x = torch.randn(2, 2, 32, 32, 32)  # batch 2: oneDNN runs every convolution, so the layout is never lost
    seen = _decoder_input_layouts(model)
    with torch.no_grad():
        fast = model(x)
        monkeypatch.setattr(segmamba_v1, "to_network_layout", lambda t: t)
        plain = model(x)
    assert seen == [True, False]
    assert fast.is_contiguous()
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-5)


def _fixture_model(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    fw = fixture_weights()
    fx = torch.load(require(FIXTURES / f"{name}.pt"), weights_only=True)
    cfg = fx["config"]
    if name.startswith("segmamba_v1"):
        model = segmamba_v1.SegMambaV1(**cfg["constructor"])
    else:
        model = segmamba_v2.SegMambaV2(*cfg["constructor_args"], **cfg["constructor_kwargs"])
    shapes = dict(zip(fx["state_dict_keys"], map(tuple, fx["state_dict_shapes"]), strict=True))
    model.load_state_dict(fw.fixture_state_dict(shapes, seed=fx["weight_seed"]), strict=True)
    return model.eval(), fw.fixture_input(fx["input_shape"], seed=fx["input_seed"]), fx["output"].float()


@pytest.mark.parametrize("name", ["segmamba_v1_small", "segmamba_v2_small"])
def test_official_fixture_through_the_channels_last_path(name: str) -> None:
    """The fixtures' own tests run batch 1, where PyTorch picks channels-first kernels for such small maps;
    a batch of two copies keeps every layer channels-last, and both copies must still match upstream."""
    model, x, expected = _fixture_model(name)
    seen = _decoder_input_layouts(model)
    with torch.no_grad():
        y = model(torch.cat([x, x]))
    assert seen == [True]
    for sample in y:
        torch.testing.assert_close(sample[None], expected, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ allocator setting


def test_memory_reuse_is_set_once_and_restored_after_the_outermost_exit(fake_libc: FakeLibc) -> None:
    with pytest.raises(RuntimeError, match="boom"), reuse_freed_cpu_memory():
        assert fake_libc.calls == KEEP
        with reuse_freed_cpu_memory():
            pass
        assert fake_libc.calls == KEEP  # the inner exit must not restore
        raise RuntimeError("boom")
    assert fake_libc.calls == KEEP + RESTORE


def test_memory_reuse_is_a_no_op_without_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices, "_glibc", lambda: None)
    with reuse_freed_cpu_memory():
        assert torch.ones(3).sum() == 3


def test_predict_logits_runs_with_memory_reuse(fake_libc: FakeLibc) -> None:
    net = PointwiseNet(np.ones((2, 1)), np.zeros(2))
    logits = predict_logits(net, torch.ones(1, 1, 8, 8, 8), WindowSettings((8, 8, 8), 0.5, 1), torch.device("cpu"))
    assert torch.equal(logits, torch.ones(1, 2, 8, 8, 8))
    assert fake_libc.calls == KEEP + RESTORE


def _rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text(encoding="utf-8").split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.slow  # reads process RSS: other processes' memory pressure makes it unreliable on a shared machine
def test_freed_memory_is_kept_inside_and_released_on_exit() -> None:
    if devices._glibc() is None or not Path("/proc/self/statm").exists():
        pytest.skip("the allocator setting only exists with glibc (and is observed through /proc)")
    block = 64 * 2**18  # 64 MiB of float32, above glibc's 32 MiB ceiling for keeping freed blocks
    base = _rss_mib()
    torch.ones(block)
    assert _rss_mib() < base + 32  # by default a freed block of this size goes straight back to the system
    with reuse_freed_cpu_memory():
        torch.ones(block)
        kept = _rss_mib()
        assert kept > base + 48  # kept for the next window's activations
    assert _rss_mib() < kept - 48  # and released when the context ends

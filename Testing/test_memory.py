"""The memory-lean inference path keeps the numbers and the memory it promises (networks/lean_blocks.py).

Each saving is checked against an independent expectation: the whole-tensor convolution a slab loop
replaces, the float64 instance-norm formula, the MONAI blocks' own forwards (which run whenever
gradients are on), and for the memory itself the peak of live tensor bytes that PyTorch's profiler
records for the plain and the lean forward of the same network.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from allocator_fakes import KEEP, KEEP_BOUNDED, RESTORE, RESTORE_BOUNDED, FakeLibc
from SegMambaSlicerLib.engine import devices
from SegMambaSlicerLib.engine.devices import reuse_freed_cpu_memory
from SegMambaSlicerLib.engine.inference import WindowSettings, predict_logits
from SegMambaSlicerLib.networks import lean_blocks, segmamba_v1, segmamba_v2
from SegMambaSlicerLib.networks.lean_blocks import (
    LeanUnetResBlock,
    LeanUnetrUpBlock,
    conv_in_place,
    convs_in_slabs,
    instance_norm_,
    memory_mode,
)
from torch import nn

CL = torch.channels_last_3d

pytestmark = pytest.mark.usefixtures("one_thread")


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=CL)


@pytest.fixture
def thin_slabs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Slabs of one plane and statistics in uneven chunks, so that tiny inputs cross many edges."""
    monkeypatch.setattr(lean_blocks, "SLAB_BYTES", 1)  # one plane per slab
    monkeypatch.setattr(lean_blocks, "MOMENT_CHUNKS", 7)  # uneven chunks of voxels


# ------------------------------------------------------------------ building blocks


@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("slab_bytes", [1, 2 * 3 * 5 * 6 * 7 * 4, 10**9])  # 1 plane, 3 planes, all at once
def test_slab_convolution_is_the_whole_tensor_convolution(kernel: int, slab_bytes: int,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lean_blocks, "SLAB_BYTES", slab_bytes)
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv3d(5, 4, kernel, padding=kernel // 2)
    x = _channels_last(torch.randn(2, 5, 8, 6, 7, generator=g))
    out = torch.empty(2, 4, 8, 6, 7, memory_format=CL)
    with torch.no_grad():
        convs_in_slabs([(conv, out)], lambda lo, hi, dest: dest.copy_(x[:, :, lo:hi]), x, 5)
        expected = F.conv3d(x.double(), conv.weight.double(), conv.bias.double(), padding=kernel // 2)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("slab_bytes", [1, 2 * 2 * 5 * 6 * 7 * 4, 10**9])
def test_in_place_slab_convolution_is_the_whole_tensor_convolution(slab_bytes: int,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lean_blocks, "SLAB_BYTES", slab_bytes)
    g = torch.Generator().manual_seed(1)
    conv = nn.Conv3d(5, 5, 3, padding=1, bias=False)
    x = _channels_last(torch.randn(2, 5, 9, 6, 7, generator=g))
    expected = F.conv3d(x.double(), conv.weight.double(), padding=1)
    storage = x.data_ptr()
    with torch.no_grad():
        y = conv_in_place(conv, x)
    assert y.data_ptr() == storage
    torch.testing.assert_close(y.double(), expected, rtol=0, atol=1e-5)


def test_in_place_instance_norm_matches_the_formula(thin_slabs: None) -> None:
    g = torch.Generator().manual_seed(2)
    norm = nn.InstanceNorm3d(8, affine=True)
    with torch.no_grad():
        norm.weight.copy_(1 + torch.randn(8, generator=g))
        norm.bias.copy_(torch.randn(8, generator=g))
    # channel means far from zero relative to the spread: a one-pass E[x^2] - E[x]^2 would fail this
    x = torch.randn(2, 8, 5, 6, 7, generator=g) * 0.5 + 40 * torch.randn(1, 8, 1, 1, 1, generator=g)
    d = x.double()
    mean = d.mean(dim=(2, 3, 4), keepdim=True)
    var = ((d - mean) ** 2).mean(dim=(2, 3, 4), keepdim=True)
    expected = (d - mean) / torch.sqrt(var + norm.eps) * norm.weight.double()[:, None, None, None]
    expected = expected + norm.bias.double()[:, None, None, None]
    work = _channels_last(x)
    with torch.no_grad():
        y = instance_norm_(norm, work)
    assert y.data_ptr() == work.data_ptr()
    torch.testing.assert_close(y.double(), expected, rtol=0, atol=2e-6)


# ------------------------------------------------------------------ whole networks


def _tiny_v1() -> nn.Module:
    torch.manual_seed(0)
    return segmamba_v1.SegMambaV1(in_chans=2, out_chans=3, depths=(1, 1, 1, 1), feat_size=(48, 16, 16, 16),
                                  hidden_size=16).eval().requires_grad_(False)


def _tiny_v2() -> nn.Module:
    torch.manual_seed(0)
    return segmamba_v2.SegMambaV2(2, 3, depths=(1, 1, 1, 1), feat_size=(48, 16, 16, 16),
                                  hidden_size=16).eval().requires_grad_(False)


def _count_calls(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    calls: list[int] = []
    original = getattr(lean_blocks, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(lean_blocks, name, counted)
    return calls


@pytest.mark.parametrize("make", [_tiny_v1, _tiny_v2], ids=["v1", "v2"])
def test_lean_network_matches_the_blocks_own_forwards(make, thin_slabs: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """No-grad (lean, default and low-memory) vs grad-enabled (MONAI's forwards) on the same network.

    Batch 2 keeps every layer channels-last (see test_perf_equivalence), so the slab paths run; one
    plane per slab makes every slab edge a halo, including the odd ones of the up-sampling.
    """
    model = make()
    assert {LeanUnetResBlock, LeanUnetrUpBlock} <= {type(m) for m in model.modules()}
    keys = list(model.state_dict())
    x = torch.randn(2, 2, 32, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.enable_grad():  # parameters do not require grad, so nothing is kept for a backward pass
        plain = model(x)
    slabs, in_place = _count_calls(monkeypatch, "convs_in_slabs"), _count_calls(monkeypatch, "conv_in_place")
    with torch.no_grad():
        lean = model(x)
        assert slabs and not in_place
        with memory_mode(True):
            low = model(x)
        assert in_place
    torch.testing.assert_close(lean, plain, rtol=0, atol=1e-5)
    torch.testing.assert_close(low, plain, rtol=0, atol=1e-5)
    assert list(model.state_dict()) == keys


def test_low_memory_reaches_the_network_through_predict_logits(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _tiny_v1()
    seen: list[bool] = []
    model.register_forward_pre_hook(lambda _m, _a: seen.append(lean_blocks.low_memory_enabled()))
    settings = WindowSettings(roi_size=(32, 32, 32), overlap=0.0, sw_batch_size=1)
    image = torch.randn(1, 2, 32, 32, 40)
    plain = predict_logits(model, image, settings, torch.device("cpu"))
    low = predict_logits(model, image, settings, torch.device("cpu"), low_memory=True)
    assert seen == [False, False, True, True] and not lean_blocks.low_memory_enabled()
    torch.testing.assert_close(low, plain, rtol=0, atol=1e-5)


def _peak_live_bytes(run, tmp_path: Path) -> int:
    """Peak of the bytes held by live CPU tensors during ``run()``, from the profiler's allocation events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    trace = tmp_path / "trace.json"
    prof.export_chrome_trace(str(trace))
    events = sorted((e for e in json.loads(trace.read_text())["traceEvents"] if e.get("name") == "[memory]"),
                    key=lambda e: e["ts"])
    start = events[0]["args"]["Total Allocated"] - events[0]["args"]["Bytes"]
    return max(e["args"]["Total Allocated"] for e in events) - start


def test_lean_decoder_holds_fewer_full_size_tensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The full-resolution decoder (decoder2, decoder1, out), where a 128³ window peaked before.

    Counted in units of one 48-channel full-resolution activation. Slabs of 2 of the 32 planes (a 128³
    window gets 8 of 128), so that a slab's temporaries weigh about what they weigh there.
    """
    monkeypatch.setattr(lean_blocks, "SLAB_BYTES", 2 * 2 * 96 * 32**2 * 4)
    model = _tiny_v1()
    x = _channels_last(torch.randn(2, 2, 32, 32, 32))
    with torch.no_grad():
        outs = model.vit(x)
        enc1 = model.encoder1(x)
        low = model.decoder3(model.decoder4(model.decoder5(model.encoder5(outs[3]), model.encoder4(outs[2])),
                                            model.encoder3(outs[1])), model.encoder2(outs[0]))
    full = enc1.numel() * enc1.element_size()

    def decode() -> None:
        # the skip is made here so that the profiler sees it freed; handed over as unetr_decode does
        model.out(model.decoder1(model.decoder2(low, [enc1.clone()])))

    def plain() -> None:
        with torch.enable_grad():
            decode()

    def lean(low_memory: bool) -> None:
        with torch.no_grad(), memory_mode(low_memory):
            decode()

    peaks = {name: _peak_live_bytes(fn, tmp_path) / full
             for name, fn in (("plain", plain), ("lean", lambda: lean(False)), ("low", lambda: lean(True)))}
    # MONAI's forwards: skip, up-sampled half, 2-unit concatenation, conv outputs, the norm's temporaries
    assert peaks["plain"] >= 6, peaks
    assert peaks["lean"] <= 3.6, peaks  # skip + conv1 output + residual, plus one slab's temporaries
    assert peaks["low"] <= 2.6, peaks  # conv1 output + the skip overwritten by the residual, plus one slab


# ------------------------------------------------------------------ allocator bound


def test_low_memory_bounds_the_kept_heap(fake_libc: FakeLibc) -> None:
    """Default: the settings the speed-up tests expect; low memory: large blocks mapped on their own."""
    model = _tiny_v1()
    settings = WindowSettings(roi_size=(32, 32, 32), overlap=0.0, sw_batch_size=1)
    predict_logits(model, torch.randn(1, 2, 32, 32, 32), settings, torch.device("cpu"))
    assert fake_libc.calls == KEEP + RESTORE
    fake_libc.calls.clear()
    predict_logits(model, torch.randn(1, 2, 32, 32, 32), settings, torch.device("cpu"), low_memory=True)
    assert fake_libc.calls == KEEP_BOUNDED + RESTORE_BOUNDED


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(devices._glibc() is None, reason="the allocator settings are glibc's")
def test_a_bounded_heap_gives_large_blocks_back_at_once() -> None:
    """With the real allocator: a freed 64 MiB block stays resident in the kept heap, not in the bounded one."""
    size = 64 * 2**20

    def resident_after_free(return_from: int | None) -> int:
        with reuse_freed_cpu_memory(return_from):
            block = torch.ones(size // 4)
            before = _rss_bytes()
            del block
            return before - _rss_bytes()

    assert resident_after_free(16 * 2**20) >= size * 3 // 4  # returned when freed
    assert resident_after_free(None) <= size // 4  # kept for reuse until the context exits

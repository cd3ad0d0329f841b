"""Selective scan and causal conv: the torch backend against mamba-ssm's reference outputs and a float64 loop."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import SegMambaSlicerLib.networks.ops.scan as ss
import torch
import torch.nn.functional as F
from SegMambaSlicerLib.networks.ops.scan import (
    ScanBackendUnavailableError,
    UnknownScanBackendError,
    available_backends,
    causal_conv1d,
    resolve_backend,
    selective_scan,
)

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shrink the tuning constants so short sequences cross chunk, block and carry-recursion boundaries."""
    monkeypatch.setattr(ss, "_CHUNK", 5)
    monkeypatch.setattr(ss, "_CPU_SLICE_BYTES", 3000)  # a few chunks per block for the shapes below
    monkeypatch.setattr(ss, "_CARRY_LOOP_MAX", 2)
    monkeypatch.setattr(ss, "_CARRY_GROUP", 3)


def random_inputs(batch: int, d: int, n: int, length: int, seed: int = 0, delta_scale: float = 1.0,
                  a_scale: float = 5.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "u": torch.randn(batch, d, length, generator=g),
        "delta": delta_scale * torch.randn(batch, d, length, generator=g),
        "A": -a_scale * torch.rand(d, n, generator=g),
        "B": torch.randn(batch, n, length, generator=g),
        "C": torch.randn(batch, n, length, generator=g),
        "D": torch.randn(d, generator=g),
        "z": torch.randn(batch, d, length, generator=g),
        "delta_bias": torch.randn(d, generator=g),
    }


def both_backends(inputs: dict[str, torch.Tensor], **kwargs: object) -> tuple:
    got = selective_scan(**inputs, **kwargs, backend="torch")
    want = selective_scan(**inputs, **kwargs, backend="reference")
    return got, want


# ------------------------------------------------------------------ official reference outputs


@pytest.mark.skipif(not (FIXTURES / "selective_scan_small.pt").exists(), reason=f"fixtures not found at {FIXTURES}")
@pytest.mark.parametrize("case", ["L4096", "L257"])
def test_torch_backend_matches_mamba_ssm_reference(case: str) -> None:
    c = torch.load(FIXTURES / "selective_scan_small.pt", weights_only=True)["cases"][case]
    args = (c["u"], c["delta"], c["A"], c["B"], c["C"], c["D"])
    kw = {"delta_bias": c["delta_bias"], "delta_softplus": True, "backend": "torch"}
    out, last = selective_scan(*args, c["z"], return_last_state=True, **kw)
    torch.testing.assert_close(out, c["out"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, c["last_state"], rtol=1e-5, atol=1e-6)
    out_no_z = selective_scan(*args, None, **kw)
    torch.testing.assert_close(out_no_z, c["out_no_z"], rtol=1e-5, atol=1e-5)
    # the kernel layout (batch, 1, N, L) of B and C gives the same result
    grouped = selective_scan(c["u"], c["delta"], c["A"], c["B"][:, None], c["C"][:, None], c["D"], None, **kw)
    torch.testing.assert_close(grouped, out_no_z, rtol=0, atol=0)


# ------------------------------------------------------------------ torch vs float64 loop


@pytest.mark.parametrize("length", [1, 4, 5, 6, 23, 61, 257])
def test_torch_matches_reference_across_chunk_and_block_boundaries(tiny_blocks: None, length: int) -> None:
    inputs = random_inputs(batch=2, d=3, n=4, length=length, seed=length)
    (out, last), (ref_out, ref_last) = both_backends(inputs, delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, ref_last, rtol=1e-5, atol=1e-6)


def test_torch_matches_reference_with_default_tuning_and_no_optional_terms() -> None:
    inputs = random_inputs(batch=1, d=8, n=16, length=3001, delta_scale=0.3)
    for key in ("D", "z", "delta_bias"):
        inputs[key] = None
    inputs["delta"] = inputs["delta"].abs()  # used as the step size directly (no softplus)
    got, want = both_backends(inputs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_computed_in_float32(dtype: torch.dtype) -> None:
    inputs = {k: v.to(dtype) for k, v in random_inputs(batch=1, d=4, n=8, length=300).items()}
    inputs["A"] = inputs["A"].float()
    out = selective_scan(**inputs, delta_softplus=True, backend="torch")
    assert out.dtype == dtype
    as_float = {k: v.float() for k, v in inputs.items()}
    expected = selective_scan(**as_float, delta_softplus=True, backend="torch").to(dtype)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_extreme_step_sizes_stay_finite(tiny_blocks: None) -> None:
    """exp(delta*A) underflows to 0 and sums of delta*A reach -1e5; no overflow, no NaN, still exact."""
    inputs = random_inputs(batch=1, d=3, n=4, length=200, a_scale=16.0)
    inputs["delta"] = torch.where(torch.rand(1, 3, 200) < 0.5, torch.full((1, 3, 200), 1000.0),
                                  torch.zeros(1, 3, 200))
    inputs["delta_bias"] = None
    (out, last), (ref_out, ref_last) = both_backends(inputs, delta_softplus=True, return_last_state=True)
    assert torch.isfinite(out).all() and torch.isfinite(last).all()
    scale = ref_out.abs().max().item()  # states reach ~1e3 here, so compare relative to the output's size
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6 * scale)
    torch.testing.assert_close(last, ref_last, rtol=1e-5, atol=1e-6 * scale)


def test_long_sequence_with_unit_decay_keeps_accumulating(tiny_blocks: None) -> None:
    """delta*A = 0 makes the state a running sum over the whole sequence (no reset at block boundaries)."""
    length = 120
    inputs = random_inputs(batch=1, d=2, n=3, length=length)
    inputs.update(delta=torch.ones(1, 2, length), A=torch.zeros(2, 3), D=None, z=None, delta_bias=None,
                  B=torch.ones(1, 3, length), C=torch.ones(1, 3, length))
    out = selective_scan(**inputs, backend="torch")
    expected = 3 * inputs["u"].cumsum(-1)  # h_t = sum_s u_s in each of the 3 states, y = sum over states
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)


def test_shape_mismatch_is_reported() -> None:
    inputs = random_inputs(batch=1, d=3, n=4, length=10)
    inputs["B"] = inputs["B"][..., :9]
    with pytest.raises(ValueError, match="B"):
        selective_scan(**inputs, backend="torch")


# ------------------------------------------------------------------ backend selection


def test_environment_variable_selects_backend_and_argument_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEGMAMBA_SCAN_BACKEND", "reference")
    assert resolve_backend(None, CPU) == "reference"
    assert resolve_backend("torch", CPU) == "torch"
    monkeypatch.setenv("SEGMAMBA_SCAN_BACKEND", "auto")
    assert resolve_backend(None, CPU) == "torch"  # no fused kernels on CPU
    monkeypatch.setenv("SEGMAMBA_SCAN_BACKEND", "bogus")
    with pytest.raises(UnknownScanBackendError, match="SEGMAMBA_SCAN_BACKEND"):
        resolve_backend(None, CPU)


def test_fused_on_cpu_raises_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEGMAMBA_SCAN_BACKEND", "fused")
    inputs = random_inputs(batch=1, d=2, n=2, length=8)
    with pytest.raises(ScanBackendUnavailableError, match="'fused'.*(CUDA|mamba_ssm)"):
        selective_scan(**inputs)
    reasons = available_backends()
    assert reasons["torch"] is None and reasons["reference"] is None
    if not torch.cuda.is_available():
        assert "CUDA" in reasons["fused"]


def test_auto_uses_fused_kernels_only_on_cuda_when_they_import(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda")
    monkeypatch.delenv("SEGMAMBA_SCAN_BACKEND", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ss, "_fused_ops", ss._FusedOps(selective_scan_fn=lambda *args, **kwargs: None))
    assert available_backends()["fused"] is None
    assert resolve_backend(None, cuda) == "fused"
    assert resolve_backend(None, CPU) == "torch"
    with pytest.raises(ScanBackendUnavailableError, match="need CUDA tensors"):
        resolve_backend("fused", CPU)
    broken = ss._FusedOps(scan_error="mamba_ssm could not be imported (ImportError: undefined symbol)")
    monkeypatch.setattr(ss, "_fused_ops", broken)
    assert resolve_backend(None, cuda) == "torch"
    with pytest.raises(ScanBackendUnavailableError, match="undefined symbol"):
        resolve_backend("fused", cuda)


def test_broken_mamba_install_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A mamba_ssm whose import fails with OSError (e.g. a missing CUDA library) must not break anything."""
    pkg = tmp_path / "mamba_ssm"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise OSError('libcudart.so.12: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "mamba_ssm", raising=False)
    monkeypatch.setitem(sys.modules, "causal_conv1d", None)  # a plain ImportError for the other package
    monkeypatch.setattr(ss, "_fused_ops", None)
    ops = ss._load_fused_ops()
    assert ops.selective_scan_fn is None and "OSError" in ops.scan_error and "libcudart" in ops.scan_error
    assert ops.causal_conv1d_fn is None and "causal_conv1d could not be imported" in ops.conv_error


def test_backend_choice_is_logged_once(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(ss, "_logged_choices", set())
    with caplog.at_level(logging.INFO, logger="SegMambaSlicerLib"):
        resolve_backend("torch", CPU)
        resolve_backend("torch", CPU)
    assert [r.message for r in caplog.records] == ["Selective scan backend: torch (device cpu)"]


# ------------------------------------------------------------------ causal conv


def explicit_causal_conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """y[t] = b + sum_k w[k] * x[t - (K-1-k)], zero history, one term at a time."""
    kernel, length = w.shape[-1], x.shape[-1]
    y = torch.zeros_like(x) if b is None else b[:, None].expand_as(x).clone()
    for t in range(length):
        for k in range(kernel):
            src = t - (kernel - 1 - k)
            if src >= 0:
                y[:, :, t] += w[:, k] * x[:, :, src]
    return y


@pytest.mark.parametrize("token_major", [False, True])
@pytest.mark.parametrize(("kernel", "length", "with_bias", "activation"),
                         [(4, 13, True, "silu"), (4, 2, True, None), (2, 7, False, "silu"), (3, 1, False, None)])
def test_causal_conv1d_matches_explicit_sum(token_major: bool, kernel: int, length: int, with_bias: bool,
                                            activation: str | None) -> None:
    g = torch.Generator().manual_seed(kernel * 100 + length)
    d = 5
    x = torch.randn(2, length, d, generator=g).transpose(1, 2) if token_major else torch.randn(2, d, length,
                                                                                              generator=g)
    w = torch.randn(d, kernel, generator=g)
    b = torch.randn(d, generator=g) if with_bias else None
    expected = explicit_causal_conv(x, w, b)
    if activation:
        expected = F.silu(expected)
    got = causal_conv1d(x, w.unsqueeze(1), b, activation=activation, backend="torch")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_causal_conv1d_rejects_unknown_activation() -> None:
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(torch.zeros(1, 2, 3), torch.zeros(2, 4), activation="relu")

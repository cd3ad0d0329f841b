"""Gradients of the torch selective-scan backend and of causal_conv1d against plain float64 autograd."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import SegMambaSlicerLib.networks.ops.scan as ss
import torch
import torch.nn.functional as F
from SegMambaSlicerLib.networks.ops.mixers import TriOrientedMamba, set_scan_backend
from SegMambaSlicerLib.networks.ops.scan import causal_conv1d, selective_scan
from SegMambaSlicerLib.networks.segmamba_v1 import SegMambaV1
from torch import nn

Tensors = dict[str, torch.Tensor]
F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def shrink_tuning(monkeypatch: pytest.MonkeyPatch, slice_bytes: int) -> None:
    """Chunks of 5 and tiny slices, so short sequences cross chunk, block and carry-recursion boundaries.

    With batch 2, N=4, d=3 in float64: 200 bytes give 2-chunk forward blocks and 1-chunk backward blocks;
    8000 bytes give one forward block and 5-chunk backward blocks (their carries take the grouped recursion).
    """
    monkeypatch.setattr(ss, "_CHUNK", 5)
    monkeypatch.setattr(ss, "_CPU_SLICE_BYTES", slice_bytes)
    monkeypatch.setattr(ss, "_CARRY_LOOP_MAX", 2)
    monkeypatch.setattr(ss, "_CARRY_GROUP", 3)


def random_inputs(batch: int, d: int, n: int, length: int, seed: int = 0, dtype: torch.dtype = F64) -> Tensors:
    g = torch.Generator().manual_seed(seed)
    t = {
        "u": torch.randn(batch, d, length, generator=g),
        "delta": torch.randn(batch, d, length, generator=g),
        "A": -5 * torch.rand(d, n, generator=g),
        "B": torch.randn(batch, n, length, generator=g),
        "C": torch.randn(batch, n, length, generator=g),
        "D": torch.randn(d, generator=g),
        "z": torch.randn(batch, d, length, generator=g),
        "delta_bias": torch.randn(d, generator=g),
    }
    return {k: v.to(dtype) for k, v in t.items()}


def plain_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
               D: torch.Tensor | None, z: torch.Tensor | None, delta_bias: torch.Tensor | None,
               delta_softplus: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The Mamba recurrence written out token by token (B, C as (batch, N, L)); autograd differentiates it."""
    dt = delta if delta_bias is None else delta + delta_bias[:, None]
    dt = F.softplus(dt) if delta_softplus else dt
    h = torch.zeros(u.shape[0], u.shape[1], A.shape[1], dtype=u.dtype)
    ys = []
    for t in range(u.shape[-1]):
        h = torch.exp(dt[:, :, t, None] * A) * h + (dt[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, -1)
    y = y if D is None else y + D[:, None] * u
    return (y if z is None else y * F.silu(z)), h


def grads_of(fn: Callable[..., tuple[torch.Tensor, torch.Tensor]], inputs: dict[str, torch.Tensor | None],
             seed: int = 1, **kwargs: object) -> tuple[torch.Tensor, Tensors]:
    """Output and gradients of <out, G> + <last state, G'> (random G, G') for every tensor input."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items() if v is not None}
    out, last = fn(**{k: leaves.get(k) for k in inputs}, **kwargs)
    g = torch.Generator().manual_seed(seed)
    loss = (out * torch.randn(out.shape, generator=g, dtype=F64).to(out.dtype)).sum()
    loss = loss + (last * torch.randn(last.shape, generator=g, dtype=F64).to(last.dtype)).sum()
    loss.backward()
    return out.detach(), {k: v.grad for k, v in leaves.items()}


def assert_grads_close(got: Tensors, want: Tensors, rtol: float, floor: float = 0.0) -> None:
    """Each gradient within rtol of the largest entry of its reference (absolute errors scale with it).

    Gradients whose reference is below ``floor`` (e.g. of a conv bias right before an instance norm, zero
    up to rounding) are compared at rtol * floor, since float32 noise is all they contain.
    """
    assert got.keys() == want.keys()
    for key in want:
        assert torch.isfinite(got[key]).all(), key
        scale = max(want[key].abs().max().item(), floor)
        torch.testing.assert_close(got[key].to(want[key].dtype), want[key], rtol=rtol, atol=rtol * scale,
                                   msg=lambda m, key=key: f"gradient of {key}: {m}")


def chunked_float64(**kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch backend's differentiable path computing in float64 (the public API computes in float32)."""
    return ss._selective_scan_differentiable(**kwargs, dtype=F64)  # type: ignore[arg-type]


VARIANTS = {
    "all terms": ({}, True),
    "no D, no z": ({"D": None, "z": None}, True),
    "no bias, no softplus": ({"delta_bias": None}, False),
}


# ------------------------------------------------------------------ selective scan


@pytest.mark.parametrize("slice_bytes", [200, 8000])
@pytest.mark.parametrize("length", [1, 5, 12, 23, 61])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_float64_gradients_match_plain_loop(monkeypatch: pytest.MonkeyPatch, slice_bytes: int, length: int,
                                            variant: str) -> None:
    shrink_tuning(monkeypatch, slice_bytes)
    removed, softplus = VARIANTS[variant]
    inputs = random_inputs(batch=2, d=3, n=4, length=length, seed=length) | removed
    if not softplus:
        inputs["delta"] = inputs["delta"].abs()  # used as the step size directly
    out, got = grads_of(chunked_float64, inputs, softplus=softplus)
    ref_out, want = grads_of(plain_scan, inputs, delta_softplus=softplus)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    assert_grads_close(got, want, rtol=1e-10)


def test_chunked_scan_passes_gradcheck(monkeypatch: pytest.MonkeyPatch) -> None:
    """Finite differences on the recurrence itself (no reference implementation involved)."""
    shrink_tuning(monkeypatch, 200)
    g = torch.Generator().manual_seed(3)
    length, d, n = 11, 3, 4
    args = (torch.randn(2, length, d, generator=g, dtype=F64), torch.rand(2, length, d, generator=g, dtype=F64),
            -2 * torch.rand(d, n, generator=g, dtype=F64), torch.randn(2, length, n, generator=g, dtype=F64),
            torch.randn(2, length, n, generator=g, dtype=F64))
    assert torch.autograd.gradcheck(ss._ChunkedScan.apply, [a.requires_grad_(True) for a in args])


@pytest.mark.parametrize("grouped", [False, True])
def test_public_float32_gradients_match_plain_loop(monkeypatch: pytest.MonkeyPatch, grouped: bool) -> None:
    """The public API (float32 compute) incl. the kernel layout (batch, 1, N, L) of B and C."""
    shrink_tuning(monkeypatch, 200)
    inputs = random_inputs(batch=2, d=3, n=4, length=37, seed=7, dtype=torch.float32)

    def public(B: torch.Tensor, C: torch.Tensor, **kw: object) -> tuple[torch.Tensor, torch.Tensor]:
        if grouped:
            B, C = B.unsqueeze(1), C.unsqueeze(1)
        return selective_scan(B=B, C=C, **kw, delta_softplus=True, return_last_state=True, backend="torch")

    out, got = grads_of(public, inputs)
    ref_out, want = grads_of(plain_scan, {k: v.double() for k, v in inputs.items()}, delta_softplus=True)
    torch.testing.assert_close(out, ref_out.float(), rtol=1e-5, atol=1e-5)
    assert got["u"].dtype == torch.float32
    assert_grads_close(got, want, rtol=2e-5)


def test_gradients_for_only_some_inputs_and_token_major_views(caplog: pytest.LogCaptureFixture) -> None:
    """Mixer-style (batch, L, d) memory, default tuning, only u and A requiring grad; nothing is logged."""
    inputs = random_inputs(batch=1, d=8, n=16, length=300, seed=5, dtype=torch.float32)
    inputs = {k: (v.transpose(1, 2).contiguous().transpose(1, 2) if v.dim() == 3 else v) for k, v in inputs.items()}
    u, A = inputs["u"].clone().requires_grad_(True), inputs["A"].clone().requires_grad_(True)
    with caplog.at_level(logging.WARNING, logger="SegMambaSlicerLib"):
        out = selective_scan(**(inputs | {"u": u, "A": A}), delta_softplus=True, backend="torch")
    out.square().sum().backward()
    assert not caplog.records
    ref = {k: v.double() for k, v in inputs.items()}
    ref_u, ref_A = ref["u"].requires_grad_(True), ref["A"].requires_grad_(True)
    plain_scan(**ref, delta_softplus=True)[0].square().sum().backward()
    assert_grads_close({"u": u.grad, "A": A.grad}, {"u": ref_u.grad, "A": ref_A.grad}, rtol=2e-5)


def test_gradients_stay_finite_with_extreme_step_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    """exp(delta*A) underflows to 0 and chunk sums of delta*A reach -1e5: no inf/NaN, still exact."""
    shrink_tuning(monkeypatch, 200)
    inputs = random_inputs(batch=2, d=3, n=4, length=40, seed=9)
    inputs["A"] = inputs["A"] * 3
    big = torch.rand(2, 3, 40, generator=torch.Generator().manual_seed(1)) < 0.5
    inputs["delta"] = torch.where(big, 1000.0, -3.0).to(F64)
    inputs["delta_bias"] = None
    _, got = grads_of(chunked_float64, inputs, softplus=True)
    _, want = grads_of(plain_scan, inputs, delta_softplus=True)
    assert_grads_close(got, want, rtol=1e-10)


def test_no_grad_and_grad_mode_give_the_same_output() -> None:
    inputs = random_inputs(batch=2, d=4, n=8, length=300, seed=2, dtype=torch.float32)
    with torch.no_grad():
        fast = selective_scan(**inputs, delta_softplus=True, backend="torch")
    tracked = selective_scan(**(inputs | {"z": inputs["z"].requires_grad_(True)}), delta_softplus=True,
                             backend="torch")
    assert tracked.requires_grad
    torch.testing.assert_close(tracked.detach(), fast, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ causal conv


@pytest.mark.parametrize("token_major", [False, True])
@pytest.mark.parametrize(("with_bias", "activation"), [(True, "silu"), (False, None)])
def test_causal_conv1d_gradients(token_major: bool, with_bias: bool, activation: str | None) -> None:
    g = torch.Generator().manual_seed(4)
    d, length, kernel = 5, 9, 4
    x = torch.randn(2, length, d, generator=g).transpose(1, 2) if token_major else torch.randn(2, d, length,
                                                                                              generator=g)
    inputs = {"x": x, "weight": torch.randn(d, kernel, generator=g),
              "bias": torch.randn(d, generator=g) if with_bias else None}

    def ours(**kw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = causal_conv1d(**kw, activation=activation, backend="torch")
        return out, out.new_zeros(1)

    def plain(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        out = F.conv1d(x, weight[:, None], bias, padding=kernel - 1, groups=d)[..., :length]
        return (F.silu(out) if activation else out), out.new_zeros(1)

    out, got = grads_of(ours, inputs)
    ref_out, want = grads_of(plain, {k: None if v is None else v.double() for k, v in inputs.items()})
    torch.testing.assert_close(out, ref_out.float(), rtol=1e-5, atol=1e-5)
    assert_grads_close(got, want, rtol=1e-5)


# ------------------------------------------------------------------ whole mixers and networks


def parameter_grads(model: nn.Module, x: torch.Tensor, backend: str) -> Tensors:
    """Gradients of a fixed random projection of the output, for every parameter and the input."""
    set_scan_backend(model, backend)
    model.zero_grad()
    leaf = x.clone().requires_grad_(True)
    out = model(leaf)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(0)))
    return {name: p.grad.clone() for name, p in model.named_parameters()} | {"input": leaf.grad}


def test_tri_oriented_mamba_gradients_match_reference_backend() -> None:
    """Three branches, the in-place sum of their outputs and the token-major causal conv all back-propagate."""
    torch.manual_seed(0)
    mixer = TriOrientedMamba(8, d_state=4, nslices=5)
    x = torch.randn(2, 70, 8)
    assert_grads_close(parameter_grads(mixer, x, "torch"), parameter_grads(mixer, x, "reference"), rtol=1e-4)


@pytest.mark.slow
def test_tiny_segmamba_v1_gradients_match_reference_backend() -> None:
    """End to end at 32^3 (scans of 4096, 512, 64 and 8 tokens); the reference backend takes most of the time."""
    torch.manual_seed(0)
    model = SegMambaV1(in_chans=4, out_chans=4, depths=(1, 1, 1, 1), feat_size=(48, 16, 16, 16), hidden_size=32)
    x = torch.randn(1, 4, 32, 32, 32)
    got, want = parameter_grads(model, x, "torch"), parameter_grads(model, x, "reference")
    largest = max(g.abs().max().item() for g in want.values())
    assert_grads_close(got, want, rtol=1e-3, floor=1e-3 * largest)  # measured: <1e-5 relative above the floor

"""Mamba and TriOrientedMamba: parameter layout, interleave rule and forward against a plain float64 model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from SegMambaSlicerLib.networks.ops.mixers import (
    Mamba,
    SequenceLengthError,
    TriOrientedMamba,
    deinterleave_slices,
    interleave_slices,
    set_scan_backend,
)
from SegMambaSlicerLib.networks.ops.scan import UnknownScanBackendError
from torch import nn

LISTING = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "state_dicts"


pytestmark = pytest.mark.usefixtures("one_thread")


def perturb(module: nn.Module, seed: int = 0) -> nn.Module:
    """Move every parameter away from its structured initial value (A = -1..-16, D = 1, ...)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return module.eval()


# ------------------------------------------------------------------ plain float64 model (MODELS.md 1.2)


def plain_branch(x: torch.Tensor, z: torch.Tensor, m: nn.Module, suffix: str) -> torch.Tensor:
    """Steps 2-8 of the Mamba block on x, z (batch, d, L), written out literally in float64."""
    conv, x_proj, dt_proj = (getattr(m, f"{n}{suffix}") for n in ("conv1d", "x_proj", "dt_proj"))
    A = -torch.exp(getattr(m, f"A{suffix}_log").double())
    D = getattr(m, f"D{suffix}").double()
    d, length = x.shape[1], x.shape[2]
    n, rank = A.shape[1], dt_proj.in_features
    xc = F.conv1d(x, conv.weight.double(), conv.bias.double(), padding=conv.kernel_size[0] - 1, groups=d)
    xc = F.silu(xc[..., :length])
    q = torch.einsum("rd,bdl->brl", x_proj.weight.double(), xc)
    delta, B, C = q[:, :rank], q[:, rank : rank + n], q[:, rank + n :]
    dt = F.softplus(torch.einsum("dr,brl->bdl", dt_proj.weight.double(), delta) + dt_proj.bias.double()[:, None])
    h = torch.zeros(x.shape[0], d, n, dtype=torch.float64)
    ys = []
    for t in range(length):
        h = torch.exp(dt[:, :, t, None] * A) * h + dt[:, :, t, None] * B[:, None, :, t] * xc[:, :, t, None]
        ys.append((h * C[:, None, :, t]).sum(-1) + D * xc[:, :, t])
    return torch.stack(ys, -1) * F.silu(z)


def plain_in(m: nn.Module, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xz = torch.einsum("oc,blc->bol", m.in_proj.weight.double(), u.double())
    return xz[:, : m.d_inner], xz[:, m.d_inner :]


def plain_out(m: nn.Module, g: torch.Tensor) -> torch.Tensor:
    return torch.einsum("co,bol->blc", m.out_proj.weight.double(), g)


def interleave_index(length: int, ns: int) -> torch.Tensor:
    """Pi(v)[n] = v[(n mod ns) * P + n // ns] (MODELS.md 2.3), as an index vector."""
    n = torch.arange(length)
    return (n % ns) * (length // ns) + n // ns


# ------------------------------------------------------------------ interleave rule


def test_interleave_toy_case_visiting_order() -> None:
    tokens = torch.arange(4 * 2 * 3)  # (D, H, W) = (4, 2, 3) flattened, nslices 4
    order = interleave_slices(tokens, 4)
    assert order[:8].tolist() == [0, 6, 12, 18, 1, 7, 13, 19]
    assert order.tolist() == interleave_index(24, 4).tolist()
    assert deinterleave_slices(order, 4).tolist() == tokens.tolist()


def test_interleave_generic_rule_along_token_axis() -> None:
    v = torch.randn(2, 40, 3)  # (batch, L, channels), L = 40 with 8 slices of P = 5
    torch.testing.assert_close(interleave_slices(v, 8, dim=1), v[:, interleave_index(40, 8)])
    torch.testing.assert_close(deinterleave_slices(interleave_slices(v, 8, dim=1), 8, dim=1), v)


# ------------------------------------------------------------------ parameters


def test_mamba_parameters_and_initialisation() -> None:
    m = Mamba(48)
    shapes = [(k, tuple(v.shape)) for k, v in m.state_dict().items()]
    assert shapes == [("A_log", (96, 16)), ("D", (96,)), ("in_proj.weight", (192, 48)),
                      ("conv1d.weight", (96, 1, 4)), ("conv1d.bias", (96,)), ("x_proj.weight", (35, 96)),
                      ("dt_proj.weight", (96, 3)), ("dt_proj.bias", (96,)), ("out_proj.weight", (48, 96))]
    torch.testing.assert_close(torch.exp(m.A_log), torch.arange(1, 17.0).expand(96, 16))
    assert torch.all(m.D == 1)
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)
    assert m.dt_proj.weight.abs().max() <= 3**-0.5


@pytest.mark.skipif(not (LISTING / "segmamba_v1_default.txt").exists(), reason=f"listings not found at {LISTING}")
def test_tri_oriented_parameters_match_official_stage0_listing() -> None:
    prefix = "vit.stages.0.0.mamba."
    expected = []
    for line in (LISTING / "segmamba_v1_default.txt").read_text(encoding="utf-8").splitlines():
        key, shape = line.split("\t")[:2]
        if key.startswith(prefix):
            expected.append((key[len(prefix) :], shape))
    m = TriOrientedMamba(48, nslices=64)
    assert [(k, str(tuple(v.shape))) for k, v in m.state_dict().items()] == expected


# ------------------------------------------------------------------ forward


def test_mamba_forward_matches_plain_model() -> None:
    m = perturb(Mamba(8, d_state=4))
    u = torch.randn(2, 19, 8)
    x, z = plain_in(m, u)
    expected = plain_out(m, plain_branch(x, z, m, ""))
    with torch.no_grad():
        got = m(u)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)


def test_tri_oriented_forward_matches_plain_model() -> None:
    ns, length = 4, 24
    m = perturb(TriOrientedMamba(8, d_state=4, nslices=ns))
    u = torch.randn(2, length, 8)
    x, z = plain_in(m, u)
    perm = interleave_index(length, ns)
    inverse = torch.argsort(perm)
    g = plain_branch(x, z, m, "")
    g = g + plain_branch(x.flip(-1), z.flip(-1), m, "_b").flip(-1)
    g = g + plain_branch(x[..., perm], z[..., perm], m, "_s")[..., inverse]
    with torch.no_grad():
        got = m(u)
    torch.testing.assert_close(got.double(), plain_out(m, g), rtol=1e-4, atol=1e-5)


def test_tri_oriented_branches_are_not_interchangeable() -> None:
    """Guards the test above: swapping the reverse (_b) and inter-slice (_s) parameters changes the output."""
    m = perturb(TriOrientedMamba(8, d_state=4, nslices=4))
    u = torch.randn(1, 24, 8)
    state = m.state_dict()
    swapped = {k: state[k.replace("_b", "_s") if "_b" in k else k.replace("_s", "_b")] for k in state}
    with torch.no_grad():
        before = m(u)
        m.load_state_dict(swapped)
        after = m(u)
    assert (before - after).abs().max() > 1e-3


def test_tri_oriented_needs_length_multiple_of_nslices() -> None:
    m = TriOrientedMamba(8, d_state=4, nslices=4)
    with pytest.raises(SequenceLengthError, match="multiple of 4"):
        m(torch.randn(1, 10, 8))


def test_set_scan_backend_reaches_every_mixer_and_backends_agree() -> None:
    model = perturb(nn.Sequential(TriOrientedMamba(8, d_state=4, nslices=2), Mamba(8, d_state=4)))
    u = torch.randn(1, 30, 8)
    set_scan_backend(model, "reference")
    assert [mod.scan_backend for mod in model] == ["reference", "reference"]
    with torch.no_grad():
        ref = model(u)
        set_scan_backend(model, "torch")
        got = model(u)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(UnknownScanBackendError):
        set_scan_backend(model, "cuda-magic")

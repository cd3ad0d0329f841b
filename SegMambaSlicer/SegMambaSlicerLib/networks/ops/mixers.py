"""Mamba token mixers: the standard selective-SSM block and SegMamba's tri-oriented variant.

Both keep the official parameter names, shapes and registration order (docs/models.md, "Mamba selective-SSM
block" and "Tri-oriented Mamba") so that official state dicts load strictly. The SSM itself runs through
:mod:`selective_scan`, whose backend each mixer takes from its ``scan_backend`` attribute (None = automatic /
environment variable).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import InputImageError
from . import low_memory_enabled
from .scan import SCAN_BACKENDS, UnknownScanBackendError, causal_conv1d, selective_scan

__all__ = [
    "Mamba",
    "SequenceLengthError",
    "TriOrientedMamba",
    "deinterleave_slices",
    "interleave_slices",
    "set_scan_backend",
]


class SequenceLengthError(InputImageError, ValueError):
    """Raised when a token sequence cannot be cut into the mixer's fixed number of slices."""


def _dt_rank(d_model: int, dt_rank: int | str) -> int:
    return math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)


def _a_log_init(d_inner: int, d_state: int) -> Tensor:
    """S4D-real initialisation A = -(1..N) for every channel, stored as log(-A)."""
    return torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1)


def _init_dt_proj(dt_proj: nn.Linear, dt_rank: int, dt_min: float, dt_max: float, dt_init_floor: float) -> None:
    """Mamba's dt init: weights U(+-R^-1/2); bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max]."""
    bound = dt_rank**-0.5
    nn.init.uniform_(dt_proj.weight, -bound, bound)
    dt = torch.exp(torch.rand(dt_proj.out_features) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_init_floor)
    with torch.no_grad():
        dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))


def _ssm_branch(
    x: Tensor, z: Tensor, conv1d: nn.Conv1d, x_proj: nn.Linear, dt_proj: nn.Linear, A_log: Tensor, D: Tensor,
    d_state: int, backend: str | None,
) -> Tensor:
    """Steps 2-8 of the Mamba block (docs/models.md, "Mamba selective-SSM block") on token-major x, z.

    x and z are (batch, L, d_inner); returns the gated y (batch, L, d_inner).

    Everything stays token-major ((batch, L, channels) memory, channel-major views where the ops want them),
    which is what the linear layers produce and consume, so no full-size transposes are made.
    """
    x = causal_conv1d(x.transpose(1, 2), conv1d.weight, conv1d.bias, activation="silu", backend=backend)
    x_dbl = F.linear(x.transpose(1, 2), x_proj.weight)  # (batch, L, R + 2N)
    delta, B, C = torch.split(x_dbl, [dt_proj.in_features, d_state, d_state], dim=-1)
    delta = F.linear(delta, dt_proj.weight)  # (batch, L, d_inner); the bias is applied inside the scan
    y = selective_scan(
        x, delta.transpose(1, 2), -torch.exp(A_log.float()), B.transpose(1, 2), C.transpose(1, 2), D.float(),
        z.transpose(1, 2), delta_bias=dt_proj.bias.float(), delta_softplus=True, backend=backend,
    )
    return y.transpose(1, 2)


class Mamba(nn.Module):
    """The standard selective-SSM block of state-spaces/mamba (v1.0.1 ... v2.1.0), inference forward."""

    def __init__(
        self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank: int | str = "auto",
        dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4, conv_bias: bool = True,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        self.dt_rank = _dt_rank(d_model, dt_rank)
        self.scan_backend: str | None = None
        # registration order = official state-dict order
        self.A_log = nn.Parameter(_a_log_init(self.d_inner, d_state))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1,
                                bias=conv_bias)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)
        _init_dt_proj(self.dt_proj, self.dt_rank, dt_min, dt_max, dt_init_floor)

    def forward(self, hidden_states: Tensor) -> Tensor:
        """(batch, L, d_model) -> (batch, L, d_model)."""
        x, z = self.in_proj(hidden_states).chunk(2, dim=-1)  # x: the first d_inner output rows, z: the rest
        y = _ssm_branch(x, z, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D, self.d_state,
                        self.scan_backend)
        return self.out_proj(y)


def interleave_slices(v: Tensor, nslices: int, dim: int = -1) -> Tensor:
    """Chunk-interleave permutation along ``dim``: new index p*ns + j holds original j*P + p (P = L / ns)."""
    dim = dim % v.dim()
    return v.unflatten(dim, (nslices, -1)).transpose(dim, dim + 1).flatten(dim, dim + 1)


def deinterleave_slices(v: Tensor, nslices: int, dim: int = -1) -> Tensor:
    """Inverse of :func:`interleave_slices`."""
    dim = dim % v.dim()
    return v.unflatten(dim, (-1, nslices)).transpose(dim, dim + 1).flatten(dim, dim + 1)


class TriOrientedMamba(nn.Module):
    """SegMamba's tri-oriented Mamba (bimamba "v3"): forward, reverse and inter-slice scans, shared projections."""

    def __init__(
        self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank: int | str = "auto",
        dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4, conv_bias: bool = True,
        bias: bool = False, nslices: int = 5,
    ) -> None:
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        self.dt_rank = _dt_rank(d_model, dt_rank)
        self.nslices = nslices
        self.scan_backend: str | None = None
        # registration order = official state-dict order (docs/models.md, "Tri-oriented Mamba")
        self.A_log = nn.Parameter(_a_log_init(self.d_inner, d_state))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.A_b_log = nn.Parameter(_a_log_init(self.d_inner, d_state))
        self.D_b = nn.Parameter(torch.ones(self.d_inner))
        self.A_s_log = nn.Parameter(_a_log_init(self.d_inner, d_state))
        self.D_s = nn.Parameter(torch.ones(self.d_inner))
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        for suffix in ("", "_b", "_s"):
            self.add_module(f"conv1d{suffix}", nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner,
                                                         padding=d_conv - 1, bias=conv_bias))
            self.add_module(f"x_proj{suffix}", nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False))
            self.add_module(f"dt_proj{suffix}", nn.Linear(self.dt_rank, self.d_inner, bias=True))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)
        # as in the official fork, only the forward branch gets the special dt initialisation
        _init_dt_proj(self.dt_proj, self.dt_rank, dt_min, dt_max, dt_init_floor)

    def _branch(self, xz: Tensor, suffix: str) -> Tensor:
        """One direction's gated SSM output (batch, L, d_inner) from its (reordered) xz."""
        x, z = xz.chunk(2, dim=-1)
        return _ssm_branch(
            x, z, getattr(self, f"conv1d{suffix}"), getattr(self, f"x_proj{suffix}"),
            getattr(self, f"dt_proj{suffix}"), getattr(self, f"A{suffix}_log"), getattr(self, f"D{suffix}"),
            self.d_state, self.scan_backend,
        )

    def forward(self, hidden_states: Tensor) -> Tensor:
        """(batch, L, d_model) -> (batch, L, d_model); L must be a multiple of ``nslices``."""
        length = hidden_states.shape[1]
        if length % self.nslices:
            raise SequenceLengthError(
                f"The tri-oriented Mamba cuts its {length} tokens into {self.nslices} slices, which needs the "
                f"token count to be a multiple of {self.nslices}; choose an input (window) size accordingly."
            )
        if low_memory_enabled() and not torch.is_grad_enabled():
            return self._forward_low_memory(hidden_states)
        xz = self.in_proj(hidden_states)  # (batch, L, 2*d_inner), shared by all branches
        out = self._branch(xz, "")
        out.add_(self._branch(xz.flip(1), "_b").flip(1))  # x AND z reversed, result reversed back
        ns = self.nslices
        out.add_(deinterleave_slices(self._branch(interleave_slices(xz, ns, dim=1), "_s"), ns, dim=1))
        return self.out_proj(out)

    def _forward_low_memory(self, hidden_states: Tensor) -> Tensor:
        """The same three branches, each projecting its own reordering of the (4x narrower) input.

        Reordering tokens commutes with the token-wise in_proj, so only one (batch, L, 2*d_inner)
        projection is alive at a time instead of the shared one plus a reordered copy; this costs two
        more in_proj products.
        """
        ns = self.nslices
        out = self._branch(self.in_proj(hidden_states), "")
        out.add_(self._branch(self.in_proj(hidden_states.flip(1)), "_b").flip(1))
        out.add_(deinterleave_slices(self._branch(self.in_proj(interleave_slices(hidden_states, ns, dim=1)), "_s"),
                                     ns, dim=1))
        return self.out_proj(out)


def set_scan_backend(module: nn.Module, backend: str | None) -> None:
    """Set ``scan_backend`` on every mixer inside ``module`` (None = automatic / environment variable).

    Any submodule with a ``scan_backend`` attribute counts as a mixer, so mixers defined elsewhere follow too.
    """
    if backend is not None and backend.strip().lower() not in SCAN_BACKENDS:
        raise UnknownScanBackendError(
            f"Unknown selective-scan backend {backend!r}; choose one of {', '.join(SCAN_BACKENDS)} or None."
        )
    for sub in module.modules():
        if hasattr(sub, "scan_backend"):
            sub.scan_backend = backend

"""Selective scan (the Mamba SSM recurrence) and the causal depthwise convolution, on any torch device.

The official networks call CUDA-only kernels (mamba-ssm's ``selective_scan_fn``, causal-conv1d's
``causal_conv1d_fn``). This module offers the same mathematics through interchangeable backends so that a
model runs on CPU, CUDA and MPS alike:

* ``"torch"``: a blocked, chunked pure-PyTorch scan (default off CUDA). The sequence is processed in
  blocks that carry the state, so memory stays at a few cache-sized slices whatever the length. Within a
  block all chunks of 32 steps advance together, one vectorised step at a time: a first pass finds each
  chunk's end state, a short recurrence over the chunks gives the state entering each chunk, and a second
  pass re-runs the chunks from those states while contracting with C. Decays are formed per step as
  ``exp(delta * A)`` and per chunk as exp of the chunk's (bounded, non-positive) sum of ``delta * A``; there is
  never an exp of an unbounded cumulative sum, so large ``delta * A`` cannot overflow. When an input requires
  grad (and grad mode is on), the same scan runs inside an autograd Function that keeps only the state
  entering each chunk; its backward recomputes the states block by block, from the end of the sequence, and
  runs the adjoint recurrence (the state recurrence reversed in time) chunked the same way, so training
  memory stays at a few (batch, L, d) tensors per call. Under ``torch.no_grad()`` nothing is kept.
* ``"fused"``: the mamba-ssm / causal-conv1d CUDA kernels, imported lazily so that a missing or broken
  install never breaks importing this package.
* ``"reference"``: the plain per-token recurrence in float64, for tests only.

The backend is chosen per call: the ``backend`` argument, else the ``SEGMAMBA_SCAN_BACKEND`` environment
variable (``auto|torch|fused|reference``), else automatically (fused on CUDA when importable, else torch).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ...errors import DeviceError, SegMambaError
from . import BACKEND_ENV_VAR, SCAN_BACKENDS

__all__ = [
    "BACKEND_ENV_VAR",
    "SCAN_BACKENDS",
    "ScanBackendUnavailableError",
    "UnknownScanBackendError",
    "available_backends",
    "causal_conv1d",
    "resolve_backend",
    "selective_scan",
]

logger = logging.getLogger(__name__)


# Tuning of the torch backend (benchmarks/bench_scan.py; figures in docs/benchmarks.md): chunks of 32 steps,
# and per-step state slices of (K chunks, batch, N, d) float32 that fit a CPU cache yet keep per-operation
# overhead small; accelerators prefer larger slices (fewer launches).
_CHUNK = 32
_CPU_SLICE_BYTES = 4 * 2**20
_ACCEL_SLICE_BYTES = 32 * 2**20
_CARRY_LOOP_MAX = 64  # chunk-carry recurrences up to this length run step by step
_CARRY_GROUP = 16
_GRAD_SLICE_DIVISOR = 8  # backward slices: 1/8 of the forward's, since a block keeps 2 * chunk + 1 of them
_LOG2E = 1.4426950408889634


class UnknownScanBackendError(SegMambaError, ValueError):
    """Raised for a backend name that is not one of ``SCAN_BACKENDS``."""


class ScanBackendUnavailableError(DeviceError):
    """Raised when the fused backend is requested but cannot run here (and why)."""


@dataclass
class _FusedOps:
    """Lazily imported CUDA kernels; ``None`` entries carry the reason in ``*_error``."""

    selective_scan_fn: Callable[..., object] | None = None
    scan_error: str | None = None
    causal_conv1d_fn: Callable[..., Tensor] | None = None
    conv_error: str | None = None


_fused_ops: _FusedOps | None = None
_logged_choices: set[str] = set()
_IMPORT_FAILURES = (ImportError, OSError, RuntimeError, AttributeError)


def _load_fused_ops() -> _FusedOps:
    """Import mamba-ssm and causal-conv1d once; a failure of either is recorded, never raised."""
    global _fused_ops
    if _fused_ops is not None:
        return _fused_ops
    ops = _FusedOps()
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        ops.selective_scan_fn = selective_scan_fn
    except _IMPORT_FAILURES as exc:  # a broken CUDA build raises more than ImportError
        ops.scan_error = f"mamba_ssm could not be imported ({type(exc).__name__}: {exc})"
    try:
        from causal_conv1d import causal_conv1d_fn

        ops.causal_conv1d_fn = causal_conv1d_fn
    except _IMPORT_FAILURES as exc:
        ops.conv_error = f"causal_conv1d could not be imported ({type(exc).__name__}: {exc})"
    _fused_ops = ops
    return ops


def _fused_unavailable_reason() -> str | None:
    """Why the fused backend cannot run in this process, or None when it can (given CUDA tensors)."""
    if not torch.cuda.is_available():
        return "no CUDA device is available (the mamba-ssm kernels are CUDA-only)"
    return _load_fused_ops().scan_error


def available_backends() -> dict[str, str | None]:
    """Backend name -> reason it is unavailable, or None when usable (for the GUI's info line)."""
    return {"torch": None, "fused": _fused_unavailable_reason(), "reference": None}


def _requested_backend(backend: str | None) -> str:
    """The explicit argument wins; otherwise the environment variable; otherwise ``auto``."""
    name = backend if backend is not None else os.environ.get(BACKEND_ENV_VAR, "auto")
    name = name.strip().lower() or "auto"
    if name not in SCAN_BACKENDS:
        source = "argument" if backend is not None else f"environment variable {BACKEND_ENV_VAR}"
        raise UnknownScanBackendError(
            f"Unknown selective-scan backend {name!r} (from the {source}); choose one of {', '.join(SCAN_BACKENDS)}."
        )
    return name


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """Concrete backend (torch|fused|reference) for tensors on ``device``; logs each choice once per process."""
    name = _requested_backend(backend)
    if name == "auto":
        use_fused = device.type == "cuda" and _fused_unavailable_reason() is None
        name = "fused" if use_fused else "torch"
    elif name == "fused":
        reason = _fused_unavailable_reason()
        if reason is None and device.type != "cuda":
            reason = f"the tensors are on {device.type!r}, the fused kernels need CUDA tensors"
        if reason is not None:
            raise ScanBackendUnavailableError(
                f"The 'fused' selective-scan backend cannot be used: {reason}. "
                f"Use backend 'torch' (or unset {BACKEND_ENV_VAR}) to run the pure-PyTorch scan."
            )
    if name not in _logged_choices:
        _logged_choices.add(name)
        logger.info("Selective scan backend: %s (device %s)", name, device.type)
    return name


# --------------------------------------------------------------------------------------------------
# causal depthwise convolution


def causal_conv1d(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None,
    backend: str | None = None,
) -> Tensor:
    """Depthwise causal conv ``y[t] = b + sum_k w[k] * x[t - (K-1-k)]`` (zero history), optional SiLU.

    x (batch, d, L), weight (d, K) or (d, 1, K). The output has x's memory layout. Uses causal-conv1d's
    kernel when the resolved backend is fused and that package imports. Otherwise ``F.conv1d`` with K-1 zeros
    of left padding for channel-major x, and K shifted multiply-adds for token-major x (a transposed view of
    (batch, L, d) memory, as the mixers produce), which avoids two full transposes on CPU. Both give the same
    result up to float rounding.
    """
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"causal_conv1d activation must be 'silu' or None, got {activation!r}")
    if weight.dim() == 3:
        weight = weight.squeeze(1)
    if resolve_backend(backend, x.device) == "fused":
        conv_fn = _load_fused_ops().causal_conv1d_fn
        if conv_fn is not None:
            return conv_fn(x if x.stride(-1) == 1 else x.contiguous(), weight, bias, activation=activation)
    if x.stride(1) == 1 and x.shape[1] > 1:
        y = _causal_conv_tokens(x.transpose(1, 2), weight, bias).transpose(1, 2)
    else:
        kernel = weight.shape[-1]
        y = F.conv1d(F.pad(x, (kernel - 1, 0)), weight.unsqueeze(1), bias, groups=x.shape[1])
    return F.silu(y, inplace=True) if activation is not None else y


def _causal_conv_tokens(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Causal depthwise conv on token-major x (batch, L, d) by shifted multiply-adds; returns (batch, L, d)."""
    length, kernel = x.shape[1], weight.shape[-1]
    y = torch.mul(x, weight[:, -1])  # not out=: autograd follows this and the in-place slice updates below
    if bias is not None:
        y.add_(bias)
    for k in range(kernel - 1):
        shift = kernel - 1 - k
        if shift < length:
            y[:, shift:].addcmul_(x[:, : length - shift], weight[:, k])
    return y


# --------------------------------------------------------------------------------------------------
# selective scan


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """mamba-ssm ``selective_scan_fn`` semantics on any device.

    u, delta: (batch, d, L); A: (d, N); B, C: (batch, N, L) or (batch, 1, N, L); D: (d,); z: (batch, d, L);
    delta_bias: (d,). Computes ``h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t``,
    ``y_t = C_t . h_t + D u_t``, then ``y * silu(z)`` when z is given. Always computes in float32 (float64 for
    the reference backend); returns ``out`` in u's dtype, plus the last state (batch, d, N) float32 if asked.
    Every backend is differentiable with respect to all tensor arguments (and the last state).
    """
    B, C = _squeeze_group(B, "B"), _squeeze_group(C, "C")
    _check_shapes(u, delta, A, B, C)
    name = resolve_backend(backend, u.device)
    if name == "fused":
        return _load_fused_ops().selective_scan_fn(  # type: ignore[misc]
            u, delta, A, B.unsqueeze(1), C.unsqueeze(1), D=D, z=z, delta_bias=delta_bias,
            delta_softplus=delta_softplus, return_last_state=return_last_state,
        )
    if name == "reference":
        return _selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (u, delta, A, B, C, D, z,
                                                                                    delta_bias)):
        out, last = _selective_scan_differentiable(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        return (out, last) if return_last_state else out
    with torch.no_grad():
        # token-major (batch, L, channels) views: the mixers produce that memory layout, so no copies here
        y, last = _scan_torch(
            u.transpose(1, 2), delta.transpose(1, 2), A.float(), B.transpose(1, 2), C.transpose(1, 2),
            None if D is None else D.float(), None if z is None else z.transpose(1, 2),
            None if delta_bias is None else delta_bias.float(), delta_softplus,
        )
        out = y.to(u.dtype).transpose(1, 2)
    return (out, last) if return_last_state else out


def _selective_scan_reference(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
    delta_bias: Tensor | None, delta_softplus: bool, return_last_state: bool,
) -> Tensor | tuple[Tensor, Tensor]:
    """The whole computation in float64 with one Python step per token (tests only)."""
    f64 = torch.float64
    dt = delta.to(f64)
    if delta_bias is not None:
        dt = dt + delta_bias.to(f64)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    u_c = u.to(f64)
    y, last = _scan_reference(u_c, dt, A.to(f64), B.to(f64), C.to(f64))
    if D is not None:
        y = y + D.to(f64)[:, None] * u_c
    if z is not None:
        y = y * F.silu(z.to(f64))
    out = y.to(u.dtype)
    return (out, last.float()) if return_last_state else out


def _selective_scan_differentiable(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
    delta_bias: Tensor | None, softplus: bool, dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """The torch backend with gradients: per-token terms through autograd, the recurrence via ``_ChunkedScan``.

    Autograd keeps a few (batch, L, d) intermediates, as any layer does, but never the (batch, L, N, d)
    states: the scan keeps one state per chunk and recomputes the rest during backward. ``dtype`` is float32
    from the public API (float64 only in gradient checks). Returns out (u's dtype) and the last state.
    """
    u_t = u.transpose(1, 2).to(dtype)
    dt = delta.transpose(1, 2).to(dtype)
    if delta_bias is not None:
        dt = dt + delta_bias.to(dtype)
    if softplus:
        dt = F.softplus(dt)
    y, last = _ChunkedScan.apply(u_t, dt, A.to(dtype), B.transpose(1, 2).to(dtype), C.transpose(1, 2).to(dtype))
    if D is not None:
        y = y + u_t * D.to(dtype)
    if z is not None:
        y = y * F.silu(z.transpose(1, 2).to(dtype))
    return y.to(u.dtype).transpose(1, 2), last


def _squeeze_group(t: Tensor, name: str) -> Tensor:
    """Accept the kernel layout (batch, G=1, N, L) as well as (batch, N, L)."""
    if t.dim() == 4:
        if t.shape[1] != 1:
            raise ValueError(f"{name} with {t.shape[1]} groups is not supported; expected (batch, 1, N, L)")
        return t.squeeze(1)
    if t.dim() != 3:
        raise ValueError(f"{name} must be (batch, N, L) or (batch, 1, N, L), got shape {tuple(t.shape)}")
    return t


def _check_shapes(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> None:
    """Fail early with the offending shapes instead of deep inside a broadcast."""
    batch, d, length = u.shape
    n_state = A.shape[-1]
    problems = []
    if delta.shape != u.shape:
        problems.append(f"delta {tuple(delta.shape)} != u {tuple(u.shape)}")
    if A.shape != (d, n_state):
        problems.append(f"A {tuple(A.shape)} is not (d={d}, N)")
    for name, t in (("B", B), ("C", C)):
        if t.shape != (batch, n_state, length):
            problems.append(f"{name} {tuple(t.shape)} is not (batch={batch}, N={n_state}, L={length})")
    if problems:
        raise ValueError("selective_scan shape mismatch: " + "; ".join(problems))


def _scan_reference(u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor) -> tuple[Tensor, Tensor]:
    """One Python step per token; slow but obviously correct (tests only)."""
    batch, d, length = u.shape
    h = u.new_zeros(batch, d, A.shape[-1])
    ys = []
    for t in range(length):
        step_dt = dt[:, :, t, None]
        h = torch.exp(step_dt * A) * h + step_dt * B[:, None, :, t] * u[:, :, t, None]
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else u.new_zeros(batch, d, 0)
    return y, h


def _slice_budget(device: torch.device) -> int:
    """Bytes of one per-step state slice: small enough for the CPU caches, large enough to amortise launches."""
    return _CPU_SLICE_BYTES if device.type == "cpu" else _ACCEL_SLICE_BYTES


def _scan_torch(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
    delta_bias: Tensor | None, softplus: bool, carries: list[Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Blocked, chunked scan on token-major inputs: u, delta, z (batch, L, d); B, C (batch, L, N); any strides.

    Returns the finished output (batch, L, d) (C.h + D u, gated) and the last state (batch, d, N), both in A's
    dtype (float32 from the public API; float64 only for the gradient checks). Everything per token
    (softplus, D term, gate) is done block by block on cache-sized pieces, so the only full-length
    allocation is the output itself. ``carries``, when given, receives the state entering every chunk
    (blocks of (K, batch, N, d)), which is all the gradient needs to recompute the states later.
    """
    batch, length, d = u.shape
    n_state, dtype = A.shape[-1], A.dtype
    chunk = max(1, min(_CHUNK, length))
    block = chunk * max(1, _slice_budget(u.device) // (batch * n_state * d * 4))
    a2 = (A * _LOG2E).t().contiguous()  # (N, d): exp(dt*A) = exp2(dt*a2), and exp2 is much faster on CPU
    y = u.new_empty(batch, -(-length // chunk) * chunk, d, dtype=dtype)
    state = u.new_zeros(batch, n_state, d, dtype=dtype)
    for start in range(0, length, block):
        stop = min(start + block, length)
        dt = delta[:, start:stop].to(dtype)
        if delta_bias is not None:
            dt = dt + delta_bias
        if softplus:
            dt = F.softplus(dt)
        u_c = _chunk_major(u[:, start:stop], chunk, dtype)
        y_c, state = _scan_block(
            _chunk_major(dt, chunk, dtype), u_c, a2, _chunk_major(B[:, start:stop], chunk, dtype),
            _chunk_major(C[:, start:stop], chunk, dtype), state, carries,
        )
        if D is not None:
            y_c.addcmul_(u_c, D)
        if z is not None:
            y_c.mul_(F.silu(_chunk_major(z[:, start:stop], chunk, dtype)))
        n_tokens = y_c.shape[0] * y_c.shape[1]
        y[:, start : start + n_tokens].view(batch, -1, chunk, d).copy_(y_c.permute(2, 1, 0, 3))
    return y[:, :length], state.transpose(1, 2)


def _chunk_major(t: Tensor, chunk: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """(batch, Lb, c) -> contiguous (T, K, batch, c) in ``dtype``, token k*T + t at [t, k]; zero-pads Lb to K*T.

    Zero padding is neutral at the end of a sequence: a step size of 0 gives decay 1 and input 0.
    """
    pad = -t.shape[1] % chunk
    if pad:
        t = F.pad(t, (0, 0, 0, pad))
    return t.unflatten(1, (-1, chunk)).permute(2, 1, 0, 3).to(dtype).contiguous()


def _scan_block(
    dt: Tensor, u: Tensor, a2: Tensor, B: Tensor, C: Tensor, state: Tensor, carries: list[Tensor] | None = None
) -> tuple[Tensor, Tensor]:
    """Scan one block, chunk-major (T, K, batch, c), from ``state`` (batch, N, d).

    Returns (y = C.h as (T, K, batch, d), state after the block). All K chunks advance together one step
    at a time on (K, batch, N, d) slices: pass 1 finds each chunk's end state from a zero start; the
    carries into the chunks follow from a recurrence over chunks whose decays are exp2(a2 * sum of the
    chunk's dt) (a bounded, non-positive exponent for A <= 0); pass 2 re-runs the steps from the true
    carries and contracts y_t = C_t . h_t. Nothing of size (Lb, N, d) is materialised.
    """
    chunk, n_chunks, batch, d = dt.shape
    n_state = a2.shape[0]
    dt = dt.unsqueeze(-2)  # (T, K, b, 1, d)
    du = dt * u.unsqueeze(-2)  # (T, K, b, 1, d)
    B = B.unsqueeze(-1)  # (T, K, b, N, 1)
    C = C.view(chunk, n_chunks * batch, 1, n_state)
    decay = dt.new_empty(n_chunks, batch, n_state, d)
    ends = torch.mul(du[0], B[0])
    for t in range(1, chunk):
        torch.mul(dt[t], a2, out=decay).exp2_()
        ends.mul_(decay).addcmul_(du[t], B[t])
    h = _chunk_carries(torch.exp2(dt.sum(0) * a2), ends, state)
    if carries is not None:
        carries.append(h.clone())
    h_mat = h.view(n_chunks * batch, n_state, d)
    y = dt.new_empty(chunk, n_chunks * batch, 1, d)
    for t in range(chunk):
        torch.mul(dt[t], a2, out=decay).exp2_()
        h.mul_(decay).addcmul_(du[t], B[t])
        torch.bmm(C[t], h_mat, out=y[t])
    return y.view(chunk, n_chunks, batch, d), h[-1].clone()


def _chunk_carries(chunk_decay: Tensor, chunk_end: Tensor, state: Tensor) -> Tensor:
    """State entering each chunk (K, b, N, d): carry_0 = state, carry_{k+1} = decay_k * carry_k + end_k."""
    carry = torch.empty_like(chunk_end)
    carry[0] = state
    if carry.shape[0] > 1:
        carry[1:] = _linear_recurrence(chunk_decay[:-1], chunk_end[:-1], state)
    return carry


def _linear_recurrence(decay: Tensor, inp: Tensor, h0: Tensor) -> Tensor:
    """All states of h_k = decay_k * h_{k-1} + inp_k along dim 0, from h_{-1} = h0.

    Short sequences run step by step; long ones are cut into groups scanned side by side (keeping the
    within-group decay products), whose carries come from the same function one level up. This keeps the
    number of (launch-bound) small operations logarithmic instead of linear in the number of chunks.
    """
    steps = decay.shape[0]
    if steps <= _CARRY_LOOP_MAX:
        out = torch.empty_like(inp)
        h = h0
        for k in range(steps):
            h = torch.addcmul(inp[k], decay[k], h, out=out[k])
        return out
    group = _CARRY_GROUP
    pad = -steps % group
    a = F.pad(decay, (0,) * (2 * decay.dim() - 2) + (0, pad), value=1.0)
    x = F.pad(inp, (0,) * (2 * inp.dim() - 2) + (0, pad))
    a = a.unflatten(0, (-1, group)).transpose(0, 1).contiguous()  # (group, n_groups, ...)
    x = x.unflatten(0, (-1, group)).transpose(0, 1).contiguous()
    for t in range(1, group):
        x[t].addcmul_(a[t], x[t - 1])
        a[t].mul_(a[t - 1])
    group_ends = _linear_recurrence(a[-1], x[-1], h0)
    starts = torch.cat([h0.unsqueeze(0), group_ends[:-1]])
    x.addcmul_(a, starts)
    return x.transpose(0, 1).flatten(0, 1)[:steps]


# --------------------------------------------------------------------------------------------------
# gradients of the torch backend


class _ChunkedScan(torch.autograd.Function):
    """y_t = C_t . h_t with h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t, on token-major tensors, differentiable.

    u, dt (batch, L, d); A (d, N); B, C (batch, L, N), all in one float dtype. Forward is the inference scan,
    which also keeps the state entering every chunk (1/chunk of all states); backward recomputes the states
    and runs the adjoint recurrence block by block (``_scan_backward``). Returns y (batch, L, d) and the
    last state (batch, d, N).
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, u: Tensor, dt: Tensor, A: Tensor, B: Tensor,
                C: Tensor) -> tuple[Tensor, Tensor]:
        carries: list[Tensor] = [u.new_empty(0, u.shape[0], A.shape[1], u.shape[2], dtype=A.dtype)]  # L = 0 too
        y, last = _scan_torch(u, dt, A, B, C, None, None, None, False, carries)
        ctx.save_for_backward(u, dt, A, B, C, torch.cat(carries))
        return y, last

    @staticmethod
    @once_differentiable  # the backward's own ops are not differentiable (no double backward)
    def backward(ctx: torch.autograd.function.FunctionCtx, g_y: Tensor, g_last: Tensor) -> tuple[Tensor, ...]:
        u, dt, A, B, C, carries = ctx.saved_tensors
        return _scan_backward(g_y, g_last.transpose(1, 2), u, dt, A, B, C, carries)


def _scan_backward(
    g_y: Tensor, g_last: Tensor, u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, carries: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients for (u, dt, A, B, C) of ``_ChunkedScan``, walking blocks of chunks from the sequence's end.

    The adjoint g_t = dLoss/dh_t obeys g_t = C_t gy_t + a_{t+1} g_{t+1} (a_t = exp(dt_t A)) with g_{L-1}
    also receiving the last state's gradient: the state recurrence run backwards in time, chunked the same
    way. What flows from one block into the previous one is a_first g_first (batch, N, d). ``carries``
    (chunks, batch, N, d) are the saved states entering each chunk; g_last is (batch, N, d). The per-step
    slices are a fraction of the forward's, because a block keeps 2 * chunk + 1 of them (decays, states).
    """
    batch, length, d = u.shape
    n_state, dtype = A.shape[-1], A.dtype
    chunk = max(1, min(_CHUNK, length))
    per_chunk = _GRAD_SLICE_DIVISOR * batch * n_state * d * dtype.itemsize
    n_chunks = max(1, min(_slice_budget(u.device) // per_chunk, carries.shape[0]))
    block = chunk * n_chunks
    a2 = (A * _LOG2E).t().contiguous()
    workspace = u.new_empty((2 * chunk + 1) * n_chunks * batch * n_state * d, dtype=dtype)
    padded = carries.shape[0] * chunk
    g_u, g_dt = u.new_empty(batch, padded, d, dtype=dtype), u.new_empty(batch, padded, d, dtype=dtype)
    g_B, g_C = u.new_empty(batch, padded, n_state, dtype=dtype), u.new_empty(batch, padded, n_state, dtype=dtype)
    g_A = A.new_zeros(n_state, d)
    g_next = g_last.contiguous()
    for start in reversed(range(0, length, block)):
        stop = min(start + block, length)
        k0 = start // chunk
        grads, g_block_a, g_next = _scan_block_backward(
            *(_chunk_major(t[:, start:stop], chunk, dtype) for t in (dt, u, B, C, g_y)), a2, A.t(),
            carries[k0 : k0 + n_chunks], g_next, workspace,
        )
        g_A += g_block_a
        for full, part in zip((g_u, g_dt, g_B, g_C), grads, strict=True):
            full[:, start : start + part.shape[0] * part.shape[1]].view(batch, -1, chunk, part.shape[-1]).copy_(
                part.permute(2, 1, 0, 3))
    return g_u[:, :length], g_dt[:, :length], g_A.t(), g_B[:, :length], g_C[:, :length]


def _scan_block_backward(
    dt: Tensor, u: Tensor, B: Tensor, C: Tensor, g_y: Tensor, a2: Tensor, a_nd: Tensor, h0: Tensor,
    g_next: Tensor, workspace: Tensor,
) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor], Tensor, Tensor]:
    """Backward through one block, chunk-major (T, K, batch, c), given the states entering its K chunks.

    ``g_next`` (batch, N, d) is what the block after this one passes back (a_{t+1} g_{t+1} at the block's
    last token). Steps, all K chunks side by side on (K, batch, N, d) slices: recompute the block's decays
    and states into ``workspace`` (reused by every block, so no fresh pages per block), contracting
    g_C = h . gy on the way; run the adjoint backwards in every chunk from zero for each chunk's own part
    of the previous chunk's carry; chain those with the chunk decays (the forward's carry recurrence,
    reversed); rerun the adjoint from the true carries, contracting each step into the gradients at once,
    so the adjoints are never stored. Returns ((g_u, g_dt, g_B, g_C) chunk-major, g_A (N, d), what passes
    to the previous block).
    """
    chunk, n_chunks, batch, d = dt.shape
    n_state = a2.shape[0]
    rows, size = n_chunks * batch, n_chunks * batch * n_state * d
    dt5 = dt.unsqueeze(-2)  # (T, K, b, 1, d)
    du = dt5 * u.unsqueeze(-2)
    B5, C5, gy5 = B.unsqueeze(-1), C.unsqueeze(-1), g_y.unsqueeze(-2)  # (T, K, b, N, 1) and (T, K, b, 1, d)
    decay = torch.mul(dt5, a2, out=workspace[: chunk * size].view(chunk, n_chunks, batch, n_state, d)).exp2_()
    states = workspace[chunk * size : (2 * chunk + 1) * size].view(chunk + 1, n_chunks, batch, n_state, d)
    states[0] = h0
    g_C = dt.new_empty(chunk, n_chunks, batch, n_state)
    for t in range(chunk):
        h = torch.mul(decay[t], states[t], out=states[t + 1]).addcmul_(du[t], B5[t])
        # (1, d) @ (d, N) products: much faster on CPU than the equivalent (N, d) @ (d, 1) ones
        torch.bmm(g_y[t].view(rows, 1, d), h.view(rows, n_state, d).mT, out=g_C[t].view(rows, 1, n_state))
    adj = C5[-1] * gy5[-1]
    for t in range(chunk - 2, -1, -1):
        adj.mul_(decay[t + 1]).addcmul_(C5[t], gy5[t])
    into_prev = adj.mul_(decay[0])  # each chunk's own part of a_first g_first, i.e. of the previous chunk's carry
    adj = _adjoint_carries(torch.exp2(dt5.sum(0) * a2), into_prev, g_next)
    g_B, g_du, g_dt = torch.empty_like(g_C), torch.empty_like(dt), torch.empty_like(dt)
    g_log_decay = torch.empty_like(adj)
    g_a = torch.zeros_like(adj)
    a_full = a_nd.expand_as(adj).contiguous()  # a same-shape multiply is several times faster than a broadcast
    for t in range(chunk - 1, -1, -1):
        if t < chunk - 1:
            adj.mul_(decay[t + 1])
        adj.addcmul_(C5[t], gy5[t])
        adj_mat = adj.view(rows, n_state, d)
        torch.bmm(du[t].view(rows, 1, d), adj_mat.mT, out=g_B[t].view(rows, 1, n_state))
        torch.bmm(B[t].view(rows, 1, n_state), adj_mat, out=g_du[t].view(rows, 1, d))
        torch.mul(adj, decay[t], out=g_log_decay).mul_(states[t])  # dLoss/d(dt A) per state element
        g_a.addcmul_(g_log_decay, dt5[t])
        torch.sum(g_log_decay.mul_(a_full), dim=-2, out=g_dt[t])
    g_dt.addcmul_(g_du, u)
    return (g_du.mul_(dt), g_dt, g_B, g_C), g_a.sum((0, 1)), decay[0, 0] * adj[0]


def _adjoint_carries(chunk_decay: Tensor, into_prev: Tensor, g_next: Tensor) -> Tensor:
    """Adjoint entering each chunk from its right (K, b, N, d): G_{K-1} = g_next, G_{k-1} = into_prev_k + P_k G_k."""
    carry = torch.empty_like(into_prev)
    carry[-1] = g_next
    if carry.shape[0] > 1:
        carry[:-1] = _linear_recurrence(chunk_decay[1:].flip(0), into_prev[1:].flip(0), g_next).flip(0)
    return carry

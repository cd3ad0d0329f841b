"""Time the selective-scan backends at SegMamba's stage-0 size (not a test; prints timings).

    python benchmarks/bench_scan.py                  # L=262,144, d=96, N=16, batch 1, 2 threads
    python benchmarks/bench_scan.py --length 32768 --threads 1 --mixer

The reference loop is timed on a prefix (``--ref-length``) and extrapolated linearly, because it costs one
Python step per token. ``--mixer`` also times one TriOrientedMamba layer (3 scans + projections).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from SegMambaSlicerLib.networks.ops.mixers import TriOrientedMamba, set_scan_backend
from SegMambaSlicerLib.networks.ops.scan import selective_scan


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Minimum wall time over ``repeats`` runs (the least disturbed one on a shared machine)."""
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def scan_inputs(length: int, d: int, n_state: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs distributed like a Mamba layer's (the selective_scan_small fixture recipe), mixer layout."""
    g = torch.Generator().manual_seed(seed)
    dt = math.log(1e-3) + torch.rand(d, generator=g) * (math.log(0.1) - math.log(1e-3))
    dt = dt.exp()
    return {
        "u": torch.randn(1, length, d, generator=g).transpose(1, 2),
        "delta": (0.5 + 0.6 * torch.randn(1, length, d, generator=g)).transpose(1, 2),
        "A": -torch.exp(torch.log(torch.arange(1, n_state + 1.0)) + 0.05 * torch.randn(d, n_state, generator=g)),
        "B": torch.randn(1, length, n_state, generator=g).transpose(1, 2),
        "C": torch.randn(1, length, n_state, generator=g).transpose(1, 2),
        "D": 1 + 0.1 * torch.randn(d, generator=g),
        "z": torch.randn(1, length, d, generator=g).transpose(1, 2),
        "delta_bias": dt + torch.log(-torch.expm1(-dt)),
    }


def run_scan(inputs: dict[str, torch.Tensor], backend: str, length: int | None = None) -> torch.Tensor:
    cut = {k: (v[..., :length] if v.dim() == 3 and length else v) for k, v in inputs.items()}
    return selective_scan(**cut, delta_softplus=True, backend=backend)  # type: ignore[return-value]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=262_144)
    parser.add_argument("--d-inner", type=int, default=96)
    parser.add_argument("--d-state", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ref-length", type=int, default=8192)
    parser.add_argument("--mixer", action="store_true", help="also time one stage-0 TriOrientedMamba layer")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, L={args.length}, d={args.d_inner}, N={args.d_state}")

    inputs = scan_inputs(args.length, args.d_inner, args.d_state)
    with torch.no_grad():
        t_torch = best_time(lambda: run_scan(inputs, "torch"), args.repeats)
        ref_len = min(args.ref_length, args.length)
        t_ref = best_time(lambda: run_scan(inputs, "reference", ref_len), 1) * args.length / ref_len
        err = (run_scan(inputs, "torch", ref_len) - run_scan(inputs, "reference", ref_len)).abs().max().item()
    elems = args.length * args.d_inner * args.d_state
    print(f"torch backend : {t_torch:8.3f} s  ({t_torch / elems * 1e9:.2f} ns per state element)")
    print(f"reference loop: {t_ref:8.3f} s  (extrapolated from L={ref_len}, float64)")
    print(f"speed-up      : {t_ref / t_torch:8.1f} x;  max |torch - reference| on the prefix: {err:.2e}")

    if args.mixer:
        mixer = TriOrientedMamba(args.d_inner // 2, d_state=args.d_state, nslices=64).eval()
        set_scan_backend(mixer, "torch")
        tokens = F.layer_norm(torch.randn(1, args.length, args.d_inner // 2), (args.d_inner // 2,))
        with torch.no_grad():
            t_mix = best_time(lambda: mixer(tokens), args.repeats)
        print(f"TriOrientedMamba layer (3 scans + projections): {t_mix:.3f} s")


if __name__ == "__main__":
    main()

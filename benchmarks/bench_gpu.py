"""GPU benchmark of a whole BraTS-size case: scan backends, autocast dtypes, sw batch sizes, official baseline.

    python benchmarks/bench_gpu.py --json results.jsonl     # skips cleanly (exit 0) without CUDA

Every variant segments the same phantom case (``make_phantom(seed=0)``, 4 x 240 x 240 x 155) through
``pipeline.segment`` with the BraTS card's SegMamba V1 (seeded weights) already on the GPU, and records
the wall time and the peak GPU memory (``torch.cuda.max_memory_allocated``). The grid:

* scan backend ``torch`` (blocked pure-PyTorch scan) and ``fused`` (mamba-ssm kernels, when importable);
* float32, float16 autocast (the pipeline's ``mixed_precision``) and bfloat16 autocast;
* sliding-window batch 1, 2 and 4; no TTA.

Then the official pipeline's settings (roi 128, overlap 0.5, sw batch 2, Gaussian blending, float16
autocast, 8x mirror TTA, fused kernels when available, as ``4_predict.py`` runs them; MODELS.md §2.9)
against our defaults (``SegmentOptions()``: the card's settings, float16, no TTA), with the speed ratio
and the memory ratio the issue's target asks for (>= 2x faster per case, peak memory no higher).
Label agreement with the float32 / torch-backend run is reported for every variant.

``--device cpu --shape 128 128 96 --quick`` runs a reduced grid on the CPU: a smoke test of this script
on machines without a GPU (times there say nothing about GPUs).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from benchlib import load_average, machine_info, seeded_network, write_json
from SegMambaSlicerLib.engine.pipeline import SegmentOptions, segment
from SegMambaSlicerLib.evaluation.phantom import make_phantom
from SegMambaSlicerLib.models.cards import find_card
from SegMambaSlicerLib.networks.ops.scan import available_backends
from torch import nn

CARD = "segmamba-brats2023"
PRECISIONS = ("float32", "float16", "bfloat16")


class Autocast(nn.Module):
    """Runs the wrapped network under autocast of one dtype (the pipeline itself only offers float16)."""

    def __init__(self, net: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.net, self.dtype = net, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=self.dtype):
            return self.net(x)


def _memory_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _memory_peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def run_variant(name: str, images: list, net: nn.Module, options: SegmentOptions, device: torch.device,
                reference: np.ndarray | None) -> tuple[dict[str, Any], np.ndarray]:
    """Segment the case once with ``options``; time, peak GPU memory and agreement with ``reference``."""
    _memory_reset(device)
    start = time.perf_counter()
    result = segment(images, find_card(CARD), options, network=net)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    labels = sitk.GetArrayFromImage(result.labelmap)
    agreement = float((labels == reference).mean()) if reference is not None else 1.0
    row = {"variant": name, "seconds": seconds, "peak_gpu_mib": _memory_peak_mib(device), "windows": result.windows,
           "tta": options.tta, "sw_batch": options.sw_batch_size, "backend": options.scan_backend,
           "label_agreement_vs_fp32": agreement, "load_average": load_average()}
    mem = "" if row["peak_gpu_mib"] is None else f", peak {row['peak_gpu_mib']:.0f} MiB"
    print(f"  {name:55s} {seconds:7.1f} s{mem}, labels = fp32 run on {agreement:.4%}", flush=True)
    return row, labels


def grid(quick: bool, fused: bool) -> list[tuple[str, str, int]]:
    """(backend, precision, sw batch) combinations; ``quick`` varies one axis at a time around torch/fp16/2."""
    backends = ["torch"] + (["fused"] if fused else [])
    if quick:
        combos = [("torch", p, 2) for p in PRECISIONS] + [("torch", "float16", b) for b in (1, 4)]
        return combos + [("fused", "float16", 2)] * fused
    return [(b, p, s) for b in backends for p in PRECISIONS for s in (1, 2, 4)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke test")
    parser.add_argument("--shape", type=int, nargs=3, default=[240, 240, 155], help="phantom size x y z")
    parser.add_argument("--quick", action="store_true", help="vary one setting at a time instead of the full grid")
    parser.add_argument("--json", help="append one JSON line per variant to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device is available here; nothing measured (skipped).")
        return
    machine = machine_info()
    print(f"machine: {machine}")
    fused_reason = available_backends()["fused"] if device.type == "cuda" else "not on CUDA"
    fused = fused_reason is None
    if not fused:
        print(f"fused backend unavailable: {fused_reason}; the official baseline uses the torch backend instead")

    card = find_card(CARD)
    case = make_phantom(shape=tuple(args.shape), seed=0)
    images = [case.images[channel.key] for channel in card.channels]
    net = seeded_network(card.architecture, **card.architecture_kwargs).to(device)
    rows: list[dict[str, Any]] = []
    dev = str(device)

    def options(**kwargs: Any) -> SegmentOptions:
        return SegmentOptions(device=dev, **kwargs)

    print("warm-up (cuDNN autotuning, kernel loading) ...", flush=True)
    segment(images, card, options(scan_backend="torch", mixed_precision=True), network=net)
    print("grid (no TTA):")
    reference: np.ndarray | None = None
    for backend, precision, sw_batch in grid(args.quick, fused):
        model = net if precision != "bfloat16" else Autocast(net, torch.bfloat16)
        opts = options(scan_backend=backend, mixed_precision=precision == "float16", sw_batch_size=sw_batch)
        row, labels = run_variant(f"{backend} / {precision} / sw batch {sw_batch}", images, model, opts, device, reference)
        if reference is None and backend == "torch" and precision == "float32":
            reference = labels
            row["label_agreement_vs_fp32"] = 1.0
        rows.append({**row, "precision": precision})

    print("official settings vs our defaults:")
    official_backend = "fused" if fused else "torch"
    official, _ = run_variant(f"official: {official_backend}, fp16, sw 2, 8x TTA", images, net,
                              options(scan_backend=official_backend, mixed_precision=True, sw_batch_size=2, tta=True),
                              device, reference)
    ours, _ = run_variant("ours: SegmentOptions() defaults (no TTA)", images, net, options(), device, reference)
    ours_tta, _ = run_variant("ours: defaults + 8x TTA", images, net, options(tta=True), device, reference)
    for row in (official, ours, ours_tta):
        rows.append({**row, "precision": "float16"})
    speedup = official["seconds"] / ours["seconds"]
    print(f"per case: ours {speedup:.1f}x faster than the official settings (target >= 2x); with TTA "
          f"{official['seconds'] / ours_tta['seconds']:.2f}x")
    if device.type == "cuda":
        ratio = ours["peak_gpu_mib"] / official["peak_gpu_mib"]
        print(f"peak GPU memory: ours {ratio:.2f}x the official settings' (target <= 1)")
    for row in rows:
        write_json(args.json, {"benchmark": "gpu", "machine": machine, **row})


if __name__ == "__main__":
    main()

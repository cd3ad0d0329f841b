"""One SegMamba forward on a 128^3 window on CPU: time, peak RSS, achieved GFLOP/s, per-part breakdown.

    python benchmarks/bench_forward.py                         # SegMamba(4, 4), 2 threads, 3 repeats
    python benchmarks/bench_forward.py --ablation --baseline-rev 5a127c0 --json results.jsonl

The network is the BraTS card's SegMamba V1 (67.4 M parameters; ``--card`` picks another card) with seeded
default-init weights (speed does not depend on the values). Steps:

1. the machine's float32 matrix-product rate, measured now with the same threads (``torch.mm`` and a
   large oneDNN 3x3x3 convolution);
2. FLOPs of one forward counted by ``torch.utils.flop_counter`` (convolutions and matrix products; the
   element-wise work of the selective scans is not counted);
3. forwards as the pipeline runs them (inside ``reuse_freed_cpu_memory``): median time and peak RSS;
4. one forward with timing hooks: convolutions / instance norms / Mamba mixers (of which the selective
   scans) / other;
5. ``--ablation``: the speed-ups switched off one at a time. Every variant runs in a fresh process (one
   warm-up forward, then ``--repeats`` timed ones), ``--rounds`` times with the order alternating, so the
   machine's load and the allocator's state hit all alike; max|logits - first variant| is reported.
   ``--baseline-rev`` adds the network of an older commit (``git archive`` into a temporary folder),
   i.e. the code before the speed-ups. ``--profile`` prints the top operators.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from benchlib import (
    load_average,
    machine_info,
    matmul_peak_gflops,
    peak_rss_mib,
    rss_mib,
    seeded_network,
    summary,
    timed,
    write_json,
)
from SegMambaSlicerLib.engine.devices import reuse_freed_cpu_memory
from SegMambaSlicerLib.models.cards import ModelCard, find_card
from SegMambaSlicerLib.networks import ARCHITECTURES
from SegMambaSlicerLib.networks.ops import mixers
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]


def count_flops(net: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """FLOPs of one forward by operator family (convolution vs matrix products)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        net(x)
    by_op = counter.get_flop_counts().get("Global", {})
    conv = sum(v for op, v in by_op.items() if "convolution" in str(op))
    return {"total": float(counter.get_total_flops()), "convolutions": float(conv),
            "matmuls": float(counter.get_total_flops() - conv)}


def _category(module: nn.Module) -> str | None:
    """Which part of the breakdown a module's own forward counts towards (None: not timed separately)."""
    if hasattr(module, "scan_backend"):
        return "mamba mixers"
    if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
        return "convolutions"
    if isinstance(module, nn.InstanceNorm3d):
        return "instance norms"
    if isinstance(module, nn.LayerNorm):
        return "layer norms"
    return None


@contextlib.contextmanager
def part_timer(net: nn.Module) -> Iterator[dict[str, float]]:
    """Accumulate wall time per category with forward hooks (CPU ops are synchronous, so this is exact)."""
    parts: dict[str, float] = defaultdict(float)
    starts: dict[int, float] = {}
    handles = []

    def before(module: nn.Module, _args: Any) -> None:
        starts[id(module)] = time.perf_counter()

    def after(category: str) -> Callable[..., None]:
        def hook(module: nn.Module, _args: Any, _out: Any) -> None:
            parts[category] += time.perf_counter() - starts.pop(id(module))
        return hook

    for module in net.modules():
        category = _category(module)
        if category is not None:
            handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after(category))]
    real_scan = mixers.selective_scan

    def scan(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = real_scan(*args, **kwargs)
        parts["  of which selective scans"] += time.perf_counter() - start
        return out

    try:
        with mock.patch.object(mixers, "selective_scan", scan):
            yield parts
    finally:
        for handle in handles:
            handle.remove()


def breakdown(net: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Seconds per part of one forward (inside the allocator setting the pipeline uses, after a warm-up
    forward in the same setting, so that first-touch page faults do not land on whichever part grows
    the heap)."""
    with torch.no_grad(), reuse_freed_cpu_memory():
        net(x)
        with part_timer(net) as parts:
            total = timed(lambda: net(x))
    named = sum(v for k, v in parts.items() if not k.startswith(" "))
    order = ["convolutions", "instance norms", "layer norms", "mamba mixers", "  of which selective scans"]
    return {"total": total, **{k: parts[k] for k in order if k in parts},
            "other (activations, adds, concatenations, copies)": total - named}


# ------------------------------------------------------------------ ablation

#: Variant key -> description; each runs in its own process, so allocator state never leaks between them.
VARIANTS = {
    "before": "before speed-ups (git baseline)",
    "cf": "channels-first, default allocator",
    "cf+reuse": "channels-first, reuse freed memory",
    "cl": "channels-last, default allocator",
    "cl+reuse": "channels-last, reuse freed memory (default)",
}


def extract_baseline(rev: str, workdir: Path) -> Path:
    """``git archive`` of the package at ``rev`` into ``workdir``, renamed so it imports beside the current one."""
    archive = workdir / "before.tar"
    subprocess.run(["git", "-C", str(REPO), "archive", "-o", str(archive), rev, "SegMambaSlicer/SegMambaSlicerLib"],
                   check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(workdir, filter="data")
    (workdir / "SegMambaSlicer" / "SegMambaSlicerLib").rename(workdir / "SegMambaSlicerLib_before")
    return workdir


def baseline_network(baseline_dir: Path, card: ModelCard) -> nn.Module:
    """The card's network class from the extracted older package (relative imports keep it self-contained)."""
    sys.path.insert(0, str(baseline_dir))
    module, _, name = ARCHITECTURES[card.architecture].partition(":")
    before = getattr(importlib.import_module(module.replace("SegMambaSlicerLib", "SegMambaSlicerLib_before", 1)), name)
    return before(**card.architecture_kwargs).eval()


def _channels_first(net: nn.Module) -> contextlib.AbstractContextManager:
    """Run ``net`` with channels-first activations, i.e. without the channels-last speed-up."""
    return mock.patch.object(sys.modules[type(net).__module__], "to_network_layout", lambda x: x)


def run_variant(args: argparse.Namespace) -> None:
    """Child process: one warm-up forward then ``--repeats`` timed ones of one variant; prints a JSON line."""
    card = find_card(args.card)
    net = seeded_network(card.architecture, **card.architecture_kwargs)
    model = net
    if args.variant == "before":
        model = baseline_network(Path(args.baseline_dir), card)
        model.load_state_dict(net.state_dict())
    layout = _channels_first(net) if args.variant.startswith("cf") else contextlib.nullcontext()
    reuse = reuse_freed_cpu_memory() if args.variant.endswith("reuse") else contextlib.nullcontext()
    x = _window(args)
    with torch.no_grad(), layout, reuse:
        out = model(x)
        times = [timed(lambda: model(x)) for _ in range(args.repeats)]
    torch.save(out, args.logits)
    print(json.dumps({"times": times, "peak_rss_mib": peak_rss_mib(), "load_average": load_average()}))


def ablation(args: argparse.Namespace, baseline_dir: Path | None, workdir: Path) -> list[dict[str, Any]]:
    """Run every variant ``--rounds`` times in fresh processes, order alternating between rounds."""
    keys = [k for k in VARIANTS if k != "before" or baseline_dir is not None]
    results: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for rnd in range(args.rounds):
        for key in keys if rnd % 2 == 0 else keys[::-1]:
            command = [sys.executable, __file__, "--variant", key, "--card", args.card, "--threads", str(args.threads),
                       "--repeats", str(args.repeats), "--size", str(args.size), "--batch", str(args.batch),
                       "--logits", str(workdir / f"{key}.pt"), "--baseline-dir", str(baseline_dir or "")]
            done = subprocess.run(command, check=True, capture_output=True, text=True)
            results[key].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"  round {rnd + 1}/{args.rounds} {VARIANTS[key]:45s} "
                  f"{[round(t, 1) for t in results[key][-1]['times']]} s", flush=True)
    first = torch.load(workdir / f"{keys[0]}.pt", weights_only=True)
    base = statistics.median(t for r in results[keys[0]] for t in r["times"])
    rows = []
    for key in keys:
        times = [t for r in results[key] for t in r["times"]]
        stats = summary(times)
        rows.append({"variant": VARIANTS[key], **stats, "speedup_vs_first": base / stats["median_s"],
                     "peak_rss_mib": max(r["peak_rss_mib"] for r in results[key]),
                     "max_abs_diff_vs_first": float((torch.load(workdir / f"{key}.pt", weights_only=True)
                                                     - first).abs().max())})
    return rows


def _window(args: argparse.Namespace) -> torch.Tensor:
    """The benchmark input: seeded N(0, 1) windows of the card's four channels."""
    generator = torch.Generator().manual_seed(1)
    return torch.randn(args.batch, 4, args.size, args.size, args.size, generator=generator)


# ------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--card", default="segmamba-brats2023", help="model card id (e.g. segmamba-v2-brats2023)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=128, help="window edge (official: 128)")
    parser.add_argument("--batch", type=int, default=1, help="windows per forward (the card's sw batch is 2)")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count (one extra forward)")
    parser.add_argument("--ablation", action="store_true", help="time the speed-ups switched off one at a time")
    parser.add_argument("--rounds", type=int, default=2, help="ablation: processes per variant")
    parser.add_argument("--baseline-rev", help="ablation: also time the network of this git revision")
    parser.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)  # child process of --ablation
    parser.add_argument("--baseline-dir", help=argparse.SUPPRESS)
    parser.add_argument("--logits", help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's top operators")
    parser.add_argument("--json", help="append the results as one JSON line to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.variant:
        run_variant(args)
        return

    record: dict[str, Any] = {"benchmark": "forward", "card": args.card, "machine": machine_info(), "size": args.size,
                              "batch": args.batch}
    print(f"machine: {record['machine']}")
    peak = matmul_peak_gflops(args.threads)
    record["peak"] = peak
    print(f"float32 peak now: torch.mm {peak['mm_gflops']:.0f} GFLOP/s, oneDNN conv3d {peak['conv3d_gflops']:.0f} GFLOP/s")

    card = find_card(args.card)
    net = seeded_network(card.architecture, **card.architecture_kwargs)
    x = _window(args)
    if not args.no_flops:
        record["flops"] = count_flops(net, x)
        print(f"FLOPs per forward: {record['flops']['total'] / 1e12:.3f} T "
              f"(convolutions {record['flops']['convolutions'] / 1e12:.3f} T)")

    rss_before = rss_mib()
    with torch.no_grad(), reuse_freed_cpu_memory():
        net(x)  # warm-up: oneDNN primitive creation, first-touch of the heap
        times = [timed(lambda: net(x)) for _ in range(args.repeats)]
    record["forward"] = {**summary(times), "rss_before_mib": rss_before, "peak_rss_mib": peak_rss_mib(),
                         "load_average": load_average()}
    med = record["forward"]["median_s"]
    print(f"forward: median {med:.2f} s over {args.repeats} (min {min(times):.2f}, max {max(times):.2f}); "
          f"peak RSS {record['forward']['peak_rss_mib']:.0f} MiB (before {rss_before:.0f}); load {load_average()}")
    if "flops" in record:
        rate = record["flops"]["total"] / med / 1e9
        record["forward"]["achieved_gflops"] = rate
        print(f"achieved {rate:.0f} GFLOP/s = {rate / peak['mm_gflops']:.0%} of the torch.mm rate, "
              f"{rate / peak['conv3d_gflops']:.0%} of the oneDNN conv rate")

    record["breakdown"] = breakdown(net, x)
    for part, seconds in record["breakdown"].items():
        print(f"  {part:52s} {seconds:7.2f} s  {seconds / record['breakdown']['total']:5.1%}")

    if args.profile:
        with torch.no_grad(), reuse_freed_cpu_memory(), torch.profiler.profile() as prof:
            net(x)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))

    if args.ablation:
        del net, x  # the variants run in their own processes
        with tempfile.TemporaryDirectory() as tmp:
            baseline_dir = extract_baseline(args.baseline_rev, Path(tmp)) if args.baseline_rev else None
            record["ablation"] = ablation(args, baseline_dir, Path(tmp))
        for row in record["ablation"]:
            print(f"  {row['variant']:45s} median {row['median_s']:6.2f} s  x{row['speedup_vs_first']:.2f}  "
                  f"peak RSS {row['peak_rss_mib']:5.0f} MiB  max|Δ| {row['max_abs_diff_vs_first']:.1e}")
        record["ablation_load_average"] = load_average()
    write_json(args.json, record)


if __name__ == "__main__":
    main()

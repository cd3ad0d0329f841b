"""A whole BraTS-size case (4 x 240 x 240 x 155 phantom) end to end through ``pipeline.segment`` on CPU.

    python benchmarks/bench_case.py                          # no TTA, card settings, 2 threads, 2 runs
    python benchmarks/bench_case.py --tta run --json results.jsonl
    python benchmarks/bench_case.py --slices 172             # a head whose brain needs 8 windows

The case is ``phantom.make_phantom(seed=0)`` (BraTS geometry and intensities); the model is the BraTS
card's SegMamba V1 with seeded default-init weights, passed to ``segment`` as a loaded network, so the
time is reading + preprocessing + sliding window + post-processing, with the card's settings (roi 128,
overlap 0.5, Gaussian blending; on the CPU the windows of each sw batch run one at a time). Loading a
checkpoint is timed separately (``load_network`` on a saved state dict). Progress callbacks time every
window, so the network part and the per-window time are reported next to the total.

8x mirror TTA runs 8 times as many windows. ``--tta auto`` (default) runs it only when the estimate
(windows x measured seconds per window + the no-TTA overhead) is below ``--max-tta-minutes``, and
otherwise reports the estimate, marked as such; ``run`` / ``estimate`` / ``skip`` force the choice.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from benchlib import load_average, machine_info, peak_rss_mib, seeded_network, write_json
from SegMambaSlicerLib.engine.pipeline import SegmentOptions, load_network, segment
from SegMambaSlicerLib.evaluation.phantom import make_phantom
from SegMambaSlicerLib.models.cards import ModelCard, find_card
from torch import nn

CARD = "segmamba-brats2023"
TTA_FLIPS = 8


class WindowClock:
    """Progress callback recording when the network phase starts and when each window ends."""

    def __init__(self) -> None:
        self.network_start: float | None = None
        self.window_ends: list[float] = []

    def __call__(self, fraction: float, message: str) -> None:
        now = time.perf_counter()
        if message == "running the network":
            self.network_start = now
        elif message.startswith("window "):
            self.window_ends.append(now)

    def network_seconds(self) -> float:
        if self.network_start is None or not self.window_ends:
            return float("nan")
        return self.window_ends[-1] - self.network_start


def run_case(images: list, card: ModelCard, net: nn.Module, options: SegmentOptions) -> dict[str, Any]:
    """One ``segment`` call; total, network part, windows, seconds per window and the machine load."""
    clock = WindowClock()
    start = time.perf_counter()
    result = segment(images, card, options, progress=clock, network=net)
    total = time.perf_counter() - start
    windows = result.windows * (TTA_FLIPS if options.tta else 1)
    network = clock.network_seconds()
    return {"tta": options.tta, "total_s": total, "network_s": network,
            "overhead_s": total - network, "windows": windows, "s_per_window": network / windows,
            "estimated": False, "load_average": load_average(), "peak_rss_mib": peak_rss_mib()}


def checkpoint_load_seconds(card: ModelCard, net: nn.Module) -> float:
    """Time ``load_network`` (build + strict load of a saved state dict), as the first run of a session does."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "weights.pt"
        torch.save(net.state_dict(), path)
        start = time.perf_counter()
        load_network(card, path, torch.device("cpu"))
        return time.perf_counter() - start


def tta_estimate(plain: dict[str, Any]) -> dict[str, Any]:
    """8x TTA from a measured no-TTA run: 8x the windows at the measured seconds per window, same overhead."""
    windows = plain["windows"] * TTA_FLIPS
    network = windows * plain["s_per_window"]
    return {**plain, "tta": True, "windows": windows, "network_s": network, "total_s": network + plain["overhead_s"],
            "estimated": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--card", default=CARD, help="model card id (e.g. segmamba-v2-brats2023)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=2, help="no-TTA runs per sw batch size (median reported)")
    parser.add_argument("--tta", choices=["auto", "run", "estimate", "skip"], default="auto")
    parser.add_argument("--max-tta-minutes", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=0, help="phantom seed")
    parser.add_argument("--slices", type=int, default=155,
                        help="phantom slices (BraTS: 155; its brain then spans ~125 slices, i.e. 1 window in z; "
                             "172 gives a ~139-slice brain and 2 windows in z, as a larger head needs)")
    parser.add_argument("--json", help="append one JSON line per result to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    machine = machine_info()
    print(f"machine: {machine}")

    shape = [240, 240, args.slices]
    start = time.perf_counter()
    case = make_phantom(shape=shape, seed=args.seed)
    print(f"phantom {'x'.join(map(str, shape))} made in {time.perf_counter() - start:.1f} s")
    card = find_card(args.card)
    images = [case.images[channel.key] for channel in card.channels]
    net = seeded_network(card.architecture, **card.architecture_kwargs)
    load_s = checkpoint_load_seconds(card, net)
    print(f"checkpoint load (build + strict load of {sum(p.numel() for p in net.parameters()) / 1e6:.1f} M "
          f"parameters): {load_s:.1f} s")

    runs = [run_case(images, card, net, SegmentOptions(device="cpu")) for _ in range(args.runs)]
    plain = dict(runs[0])
    for key in ("total_s", "network_s", "overhead_s", "s_per_window"):
        plain[key] = statistics.median(r[key] for r in runs)
    plain["runs"] = [r["total_s"] for r in runs]
    results = [plain]
    print(f"no TTA: median {plain['total_s']:.1f} s over {args.runs} runs {[round(r, 1) for r in plain['runs']]}; "
          f"network {plain['network_s']:.1f} s for {plain['windows']} windows ({plain['s_per_window']:.1f} s each), "
          f"rest {plain['overhead_s']:.1f} s; peak RSS {plain['peak_rss_mib']:.0f} MiB; load {plain['load_average']}")

    estimate = tta_estimate(plain)
    run_tta = args.tta == "run" or (args.tta == "auto" and estimate["total_s"] <= 60 * args.max_tta_minutes)
    if args.tta != "skip":
        tta = run_case(images, card, net, SegmentOptions(device="cpu", tta=True)) if run_tta else estimate
        results.append(tta)
        label = "ESTIMATED from the no-TTA run" if tta["estimated"] else "measured"
        print(f"8x mirror TTA: {tta['total_s']:.1f} s ({label}); {tta['windows']} windows, "
              f"{tta['s_per_window']:.1f} s each; load {tta['load_average']}")
    for result in results:
        write_json(args.json, {"benchmark": "case", "card": args.card, "machine": machine, "checkpoint_load_s": load_s,
                               "shape": shape, **result})


if __name__ == "__main__":
    main()

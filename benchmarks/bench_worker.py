"""Click latency of the Slicer module's worker: time to the first sliding window, cold process vs warm one.

    python benchmarks/bench_worker.py                      # demo model, 96 x 96 x 64 phantom, 3 rounds
    python benchmarks/bench_worker.py --rounds 5 --json results.jsonl

What a user waits for after clicking Segment, measured as the module runs it: from ``WarmWorker.start``
(images handed over as .npz, job written) to the worker's first ``window`` progress event, i.e. the end of
the first window. Each round starts a fresh worker (cold: Python, PyTorch and the library imported, the
network built and its weights loaded, every buffer touched for the first time), runs a second job with the
same model on it (warm: the process and its loaded network reused), then releases it. Both jobs segment
the same phantom; medians over the rounds are reported with the time of the whole job.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchlib import load_average, machine_info, write_json
from SegMambaSlicerLib.engine.pipeline import SegmentOptions
from SegMambaSlicerLib.evaluation.phantom import make_phantom
from SegMambaSlicerLib.models.cards import load_card
from SegMambaSlicerLib.run.worker import WarmWorker, WorkerProcess, default_worker_threads, usable_cpu_count

DEMO_CARD = Path(__file__).resolve().parents[1] / "SegMambaSlicer/Resources/Models/segmamba-demo.json"
POLL_SECONDS = 0.005


@dataclass(frozen=True)
class Click:
    """One job's timings (seconds from the start call) and whether its network was reused."""

    first_window_s: float
    total_s: float
    reused: bool
    windows: int


def timed_job(start: float, job: WorkerProcess) -> Click:
    """Poll a started job to its end, noting when its first window and its network event arrive."""
    first_window: float | None = None
    reused = False
    while not job.finished:
        for event in job.poll():
            if event.kind == "progress" and event.message.startswith("window") and first_window is None:
                first_window = time.perf_counter() - start
            elif event.kind == "network":
                reused = bool(event.data["reused"])
        time.sleep(POLL_SECONDS)
    total = time.perf_counter() - start
    assert first_window is not None, "the job reported no window"
    return Click(first_window, total, reused, job.result().windows)


def click(warm: WarmWorker, images: list, card: Any, options: SegmentOptions) -> Click:
    """One Segment click on ``warm``: start the job and time it."""
    start = time.perf_counter()
    return timed_job(start, warm.start(images, card, options))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--card", default=str(DEMO_CARD), help="model card file (default: the demo model)")
    parser.add_argument("--shape", type=int, nargs=3, default=[96, 96, 64], help="phantom size x y z")
    parser.add_argument("--rounds", type=int, default=3, help="cold + warm pairs (medians reported)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="append one JSON line with the results to this file")
    args = parser.parse_args()
    machine = machine_info()
    threads = default_worker_threads(usable_cpu_count())  # what the module gives the worker by default
    print(f"machine: {machine}; worker threads {threads}")
    card = load_card(args.card)
    case = make_phantom(shape=args.shape, seed=0)
    images = [case.images[channel.key] for channel in card.channels]
    options = SegmentOptions(device=args.device, confidence=True)  # as the module asks (panels.py)

    cold, warm_clicks = [], []
    for round_index in range(args.rounds):
        warm = WarmWorker()
        try:
            cold.append(click(warm, images, card, options))
            warm_clicks.append(click(warm, images, card, options))
        finally:
            warm.release()
        print(f"round {round_index + 1}: cold {cold[-1]}, warm {warm_clicks[-1]}; load {load_average()}")
    assert not any(c.reused for c in cold) and all(c.reused for c in warm_clicks)

    record: dict[str, Any] = {"benchmark": "worker", "card": card.id, "shape": args.shape,
                              "device": args.device, "threads": threads, "rounds": args.rounds,
                              "windows": cold[0].windows, "machine": machine}
    for name, clicks in (("cold", cold), ("warm", warm_clicks)):
        record[f"{name}_first_window_s"] = statistics.median(c.first_window_s for c in clicks)
        record[f"{name}_total_s"] = statistics.median(c.total_s for c in clicks)
        print(f"{name}: first window after {record[f'{name}_first_window_s']:.2f} s (median of "
              f"{[round(c.first_window_s, 2) for c in clicks]}), whole job {record[f'{name}_total_s']:.1f} s "
              f"({cold[0].windows} windows)")
    write_json(args.json, record)


if __name__ == "__main__":
    main()

"""Several BraTS-size cases through ``batch.segment_folder`` on CPU: does the second case start warm?

    python benchmarks/bench_cohort.py                       # 3 phantom cases, both variants, 2 threads
    python benchmarks/bench_cohort.py --cases 2 --json results.jsonl

The cases are ``phantom.make_phantom(seed=i)`` written as BraTS case folders; the model is the BraTS card's
SegMamba V1 with seeded default-init weights, passed to ``segment_folder`` as a loaded network, so each
case's time is reading + preprocessing + sliding window + writing. Two variants, each in a fresh process:

* ``per-case``: freed CPU memory is given back to the system after every case (the behaviour before the
  cohort-wide reuse; simulated by making the batch loop's own ``reuse_freed_cpu_memory`` a no-op, so only
  the one around each case's windows remains);
* ``cohort`` (default): it stays in the process until the batch ends.

On a VM the first touch of fresh memory is expensive (the hypervisor backs the pages), so a case that
starts with a trimmed heap pays it again. Reported: seconds per case, and the page faults per case.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import SegMambaSlicerLib.engine.inference  # noqa: F401 - binds predict_logits' own memory context before any patch
import torch
from benchlib import load_average, machine_info, seeded_network, write_json
from SegMambaSlicerLib.engine import devices
from SegMambaSlicerLib.engine.pipeline import SegmentOptions
from SegMambaSlicerLib.evaluation.phantom import make_phantom, write_brats_case
from SegMambaSlicerLib.models.cards import find_card
from SegMambaSlicerLib.run.batch import segment_folder

CARD = "segmamba-brats2023"
VARIANTS = ("per-case", "cohort")


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class CaseClock:
    """``on_case`` callback: wall time and page faults between the ends of consecutive cases."""

    def __init__(self) -> None:
        self.last, self.last_faults = time.perf_counter(), _minor_faults()
        self.cases: list[dict[str, Any]] = []

    def __call__(self, result: Any) -> None:
        now, faults = time.perf_counter(), _minor_faults()
        self.cases.append({"case": result.case_id, "seconds": now - self.last, "minor_faults": faults - self.last_faults,
                           "status": result.status})
        self.last, self.last_faults = now, faults


def run_variant(args: argparse.Namespace) -> None:
    """Child process: one ``segment_folder`` over the prepared cases; prints a JSON line."""
    card = find_card(args.card)
    net = seeded_network(card.architecture, **card.architecture_kwargs)
    outer = contextlib.nullcontext()
    if args.variant == "per-case":
        # Only the batch loop's context is disabled; predict_logits keeps its own (imported by name there).
        outer = mock.patch.object(devices, "reuse_freed_cpu_memory", contextlib.nullcontext)
    clock = CaseClock()
    with outer, tempfile.TemporaryDirectory() as out:
        result = segment_folder(args.cases_dir, out, card, SegmentOptions(device="cpu"), network=net,
                                on_case=clock, overwrite=True)
    if result.failed:
        raise SystemExit(f"cases failed: {[(r.case_id, r.error) for r in result.failed]}")
    print(json.dumps({"cases": clock.cases, "load_average": load_average()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--card", default=CARD)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", type=int, default=3)
    parser.add_argument("--json", help="append one JSON line per variant to this file")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # child process
    parser.add_argument("--cases-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.variant:
        run_variant(args)
        return
    machine = machine_info()
    print(f"machine: {machine}")
    with tempfile.TemporaryDirectory() as tmp:
        cases_dir = Path(tmp) / "cases"
        for seed in range(args.cases):
            write_brats_case(make_phantom(shape=(240, 240, 155), seed=seed), cases_dir, f"case{seed}")
        for variant in VARIANTS:
            command = [sys.executable, __file__, "--variant", variant, "--card", args.card,
                       "--threads", str(args.threads), "--cases-dir", str(cases_dir)]
            done = subprocess.run(command, check=True, capture_output=True, text=True)
            record = json.loads(done.stdout.strip().splitlines()[-1])
            seconds = [c["seconds"] for c in record["cases"]]
            faults = [c["minor_faults"] for c in record["cases"]]
            print(f"{variant:9s} seconds per case {[round(s, 1) for s in seconds]} (total {sum(seconds):.1f} s); "
                  f"page faults per case {faults}; load {record['load_average']}", flush=True)
            write_json(args.json, {"benchmark": "cohort", "card": args.card, "machine": machine, "variant": variant,
                                   **record})


if __name__ == "__main__":
    main()

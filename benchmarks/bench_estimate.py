"""How good is the estimate printed before a run? Predicted vs actual windows, time and peak memory.

    python benchmarks/bench_estimate.py                                  # demo model, two phantoms, CPU
    python benchmarks/bench_estimate.py --shapes 96 96 64 160 160 104 --rounds 2 --json results.jsonl

Each run is a fresh process doing what ``segmamba-slicer predict`` does (``cli.predict.preflight``, then
``segment`` with the measured network, then the rate recorded): it reports the estimate it printed and what
the run then took: windows, seconds of ``segment`` (the images in memory to the label map; reading files and
loading the model are outside both), and the process's peak resident size (VmHWM) at the end. The rate cache
starts empty in a temporary folder, so the first run calibrates (two windows) and every later run is
estimated from the rate the previous run recorded, as a user's second and later runs are. Load average and
machine are recorded beside the numbers; compare runs of one invocation only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def child(args: argparse.Namespace) -> None:
    """One run, as the CLI makes it; prints one JSON line with the estimate and the actual numbers."""
    import torch
    from benchlib import peak_rss_mib
    from SegMambaSlicerLib.cli.predict import preflight
    from SegMambaSlicerLib.engine.pipeline import SegmentOptions, segment
    from SegMambaSlicerLib.io.images import read_image, resolve_inputs
    from SegMambaSlicerLib.models.registry import resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    card = resolve_model(args.model)
    inputs = resolve_inputs([args.case_dir], card)
    images = [read_image(s, name=c.display_name) for s, c in zip(inputs, card.channels)]
    options = SegmentOptions(device=args.device)
    plan = preflight(images, card, options, force=True, out=sys.stderr)
    result = segment(images, card, options, network=plan.network)
    plan.record(result)
    est = plan.estimate
    print(json.dumps({
        "calibrated": plan.calibrated,
        "windows_predicted": est.windows, "windows_actual": plan.network.windows,
        "seconds_predicted": est.seconds, "seconds_actual": result.seconds,
        "network_seconds": plan.network.network_seconds,
        "peak_mib_predicted": est.peak_bytes / 2**20, "peak_is_lower_bound": est.peak_is_lower_bound,
        "peak_mib_actual": peak_rss_mib(), "free_mib": None if est.free_bytes is None else est.free_bytes / 2**20,
        "threads": torch.get_num_threads(),
    }), flush=True)


def run_child(case_dir: Path, args: argparse.Namespace, home: Path) -> dict[str, Any]:
    env = {**os.environ, "SEGMAMBA_SLICER_HOME": str(home),
           "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent / "SegMambaSlicer"),
                                          os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--case-dir", str(case_dir),
               "--model", args.model, "--device", args.device, "--threads", str(args.threads or 0)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"child failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _error(predicted: float | None, actual: float) -> str:
    return "n/a" if predicted is None else f"{100.0 * (predicted - actual) / actual:+.0f} %"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--case-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", default="segmamba-demo")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--shapes", type=int, nargs="+", default=[96, 96, 64, 160, 160, 104],
                        help="phantom grids, three numbers (x y z) each")
    parser.add_argument("--rounds", type=int, default=1, help="passes over the shapes (all share one cache)")
    parser.add_argument("--json", help="append the records to this .jsonl file")
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    sys.path.insert(0, str(HERE))
    from benchlib import load_average, machine_info, write_json
    from SegMambaSlicerLib.evaluation.phantom import make_phantom, write_brats_case

    shapes = [tuple(args.shapes[i:i + 3]) for i in range(0, len(args.shapes), 3)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-estimate-") as tmp:
        home = Path(tmp) / "home"
        cases = {}
        for shape in shapes:
            case = make_phantom(shape=shape, seed=0)
            cases[shape] = write_brats_case(case, Path(tmp) / "x".join(map(str, shape)), "Phantom")["seg"].parent
        for round_index in range(args.rounds):
            for shape in shapes:
                load = load_average()
                started = time.perf_counter()
                record = run_child(cases[shape], args, home)
                record.update(shape=list(shape), round=round_index, load_average=load,
                              wall_s=time.perf_counter() - started)
                rows.append(record)
                print(json.dumps(record), flush=True)
    print()
    print("| case | rate from | windows (pred / run) | time pred / actual | error | peak RSS pred / actual | error "
          "| load (1 min) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        source = "calibration (2 windows)" if r["calibrated"] else "previous run"
        bound = "≥ " if r["peak_is_lower_bound"] else ""
        seconds = "n/a" if r["seconds_predicted"] is None else f"{r['seconds_predicted']:.1f} s"
        print(f"| {'×'.join(map(str, r['shape']))} | {source} | {r['windows_predicted']} / {r['windows_actual']} | "
              f"{seconds} / {r['seconds_actual']:.1f} s | {_error(r['seconds_predicted'], r['seconds_actual'])} | "
              f"{bound}{r['peak_mib_predicted']:.0f} / {r['peak_mib_actual']:.0f} MiB | "
              f"{_error(r['peak_mib_predicted'], r['peak_mib_actual'])} | "
              f"{r['load_average'][0] if r['load_average'] else 'n/a'} |")
    write_json(args.json, {"benchmark": "estimate", "machine": machine_info(), "model": args.model,
                           "device": args.device, "runs": rows})


if __name__ == "__main__":
    main()

"""Peak memory and time of a whole BraTS-size case, before/after the memory changes, in one interleaved run.

    python benchmarks/bench_memory.py                         # 2 rounds: before, after, after --low-memory
    python benchmarks/bench_memory.py --rounds 1 --json benchmarks/results/memory.jsonl
    python benchmarks/bench_memory.py --variants after,after-low --trace-dir /tmp/rss   # RSS timelines too

"Before" is the code at ``--before-rev`` (default 4e3c6e9, the last commit before the memory work), checked
out with ``git worktree add`` into ``--before-tree`` when that folder does not exist yet; "after" is this
working tree, with the default settings and with ``SegmentOptions(low_memory=True)``. The case is the
phantom of ``bench_case.py`` (``make_phantom(seed=0)``, 4 x 240 x 240 x 155), written once as BraTS NIfTI
files, and the model the BraTS card's SegMamba V1 (67.4 M parameters) with seeded default-init weights.

Every variant runs ``pipeline.segment`` from the files in a fresh child process (the CLI's situation: main
thread, nothing else in the process), the variants of a round interleaved, so that all of them see the
same machine load. A child reports its peak resident set size (``VmHWM``, which the kernel keeps for the
whole process, so nothing between two samples is missed), the RSS before ``segment`` (interpreter,
torch, network), the wall time of ``segment``, its network part and its windows, and on CUDA the peak
allocated and reserved GPU memory. Its label map is compared with the "before" one of the same round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CARD = "segmamba-brats2023"
VARIANTS = {"before": ("before", False), "after": ("after", False), "after-low": ("after", True)}
RESULT_PREFIX = "RESULT "


# ------------------------------------------------------------------ child: one case in this process


class _RssSampler(threading.Thread):
    """Samples this process's RSS every ``interval`` seconds (for the timeline; the peak comes from VmHWM)."""

    def __init__(self, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.interval, self.samples, self.stop = interval, [], threading.Event()

    def run(self) -> None:
        from benchlib import rss_mib

        start = time.perf_counter()
        while not self.stop.is_set():
            self.samples.append((round(time.perf_counter() - start, 3), round(rss_mib(), 1)))
            self.stop.wait(self.interval)


def _child(args: argparse.Namespace) -> None:
    """Segment the case files once and print one ``RESULT {json}`` line."""
    import numpy as np
    import SimpleITK as sitk
    import torch
    from benchlib import peak_rss_mib, rss_mib, seeded_network
    from SegMambaSlicerLib.engine.pipeline import SegmentOptions, segment
    from SegMambaSlicerLib.models.cards import find_card

    torch.set_num_threads(args.threads)
    card = find_card(CARD)
    net = seeded_network(card.architecture, **card.architecture_kwargs)
    if args.low_memory and "low_memory" not in SegmentOptions.__dataclass_fields__:
        raise SystemExit("this tree has no SegmentOptions.low_memory")
    options = SegmentOptions(device=args.device, **({"low_memory": True} if args.low_memory else {}))
    files = [Path(args.case_dir) / f"{Path(args.case_dir).name}-{channel.key}.nii.gz" for channel in card.channels]
    window_ends: list[float] = []
    network_start: list[float] = []

    def progress(fraction: float, message: str) -> None:
        if message == "running the network":
            network_start.append(time.perf_counter())
        elif message.startswith("window "):
            window_ends.append(time.perf_counter())

    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sampler = _RssSampler()
    rss_before = rss_mib()
    sampler.start()
    start = time.perf_counter()
    result = segment([str(f) for f in files], card, options, progress=progress, network=net)
    wall = time.perf_counter() - start
    sampler.stop.set()
    sampler.join()
    network_s = window_ends[-1] - network_start[0] if window_ends and network_start else float("nan")
    record: dict[str, Any] = {
        "peak_rss_mib": peak_rss_mib(), "rss_before_segment_mib": rss_before, "wall_s": wall,
        "network_s": network_s, "windows": result.windows, "s_per_window": network_s / max(result.windows, 1),
        "device": result.device,
    }
    if cuda:
        record["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        record["cuda_peak_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
    np.save(args.labels_out, sitk.GetArrayViewFromImage(result.labelmap))
    if args.trace_out:
        marks = [round(t - start, 3) for t in window_ends]
        Path(args.trace_out).write_text(json.dumps({"rss": sampler.samples, "window_ends_s": marks}), encoding="utf-8")
    print(RESULT_PREFIX + json.dumps(record), flush=True)


# ------------------------------------------------------------------ parent: rounds of fresh children


def _before_tree(rev: str, tree: Path) -> Path:
    """The package folder of the "before" code, adding a git worktree for ``rev`` when there is none."""
    if not tree.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), rev], check=True)
    head = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()
    if not rev.startswith(head) and not head.startswith(rev):
        raise SystemExit(f"{tree} is at {head}, not {rev}; remove it or pass another --before-tree")
    return tree / "SegMambaSlicer"


def _run_child(variant: str, package_root: Path, case_dir: Path, work: Path, args: argparse.Namespace,
               round_index: int) -> dict[str, Any]:
    """One variant in a fresh interpreter; returns its result record."""
    tree, low = VARIANTS[variant]
    labels = work / f"{variant}-{round_index}.npy"
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--case-dir", str(case_dir),
               "--threads", str(args.threads), "--device", args.device, "--labels-out", str(labels)]
    if low:
        command.append("--low-memory")
    if args.trace_dir:
        Path(args.trace_dir).mkdir(parents=True, exist_ok=True)
        command += ["--trace-out", str(Path(args.trace_dir) / f"{variant}-{round_index}.json")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(package_root), str(HERE)]))
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode or not lines:
        raise SystemExit(f"{variant} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    record = json.loads(lines[-1][len(RESULT_PREFIX):])
    record.update(variant=variant, tree=tree, low_memory=low, round=round_index, labels=str(labels))
    return record


def _label_agreement(a: str, b: str) -> float:
    import numpy as np

    return float((np.load(a) == np.load(b)).mean())


def _table(records: list[dict[str, Any]], variants: list[str]) -> str:
    rows = ["| variant | peak RSS (GiB) | wall (s) | s / window | RSS before segment (GiB) | labels = before |",
            "|---|---:|---:|---:|---:|---:|"]
    for variant in variants:
        mine = [r for r in records if r["variant"] == variant]
        peak = statistics.median(r["peak_rss_mib"] for r in mine) / 1024
        wall = statistics.median(r["wall_s"] for r in mine)
        per = statistics.median(r["s_per_window"] for r in mine)
        base = statistics.median(r["rss_before_segment_mib"] for r in mine) / 1024
        agree = [r["agreement_with_before"] for r in mine if r.get("agreement_with_before") is not None]
        agreement = f"{min(agree):.6f}" if agree else "-"
        walls = ", ".join(f"{r['wall_s']:.1f}" for r in mine)
        peaks = ", ".join(f"{r['peak_rss_mib'] / 1024:.2f}" for r in mine)
        rows.append(f"| {variant} | {peak:.2f} ({peaks}) | {wall:.1f} ({walls}) | {per:.1f} | {base:.2f} | {agreement} |")
        if "cuda_peak_allocated_mib" in mine[0]:
            alloc = statistics.median(r["cuda_peak_allocated_mib"] for r in mine) / 1024
            rows[-1] += f" GPU peak allocated {alloc:.2f} GiB"
    return "\n".join(rows)


def _parent(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(HERE))
    from benchlib import cpu_description, load_average, write_json

    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {sorted(VARIANTS)}")
    roots = {"after": REPO / "SegMambaSlicer"}
    if "before" in variants:
        roots["before"] = _before_tree(args.before_rev, Path(args.before_tree))
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cpu = cpu_description()
    print(f"CPU: {cpu['model']}; AVX-512: {' '.join(cpu['avx512']) or 'no'}; load {load_average()}", flush=True)
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _write_case(work / "case")
        for round_index in range(args.rounds):
            order = variants if round_index % 2 == 0 else variants[::-1]
            for variant in order:
                record = _run_child(variant, roots[VARIANTS[variant][0]], work / "case", work, args, round_index)
                record["load_average"] = load_average()
                records.append(record)
                print(f"round {round_index} {variant}: peak RSS {record['peak_rss_mib'] / 1024:.2f} GiB, "
                      f"{record['wall_s']:.1f} s ({record['s_per_window']:.1f} s/window), load "
                      f"{record['load_average']}", flush=True)
            before = [r for r in records if r["round"] == round_index and r["variant"] == "before"]
            for record in records:
                if record["round"] == round_index and before:
                    record["agreement_with_before"] = _label_agreement(record["labels"], before[0]["labels"])
    print(_table(records, variants))
    for record in records:
        record.pop("labels", None)
        write_json(args.json, {"benchmark": "memory", "card": CARD, "cpu": cpu, "threads": args.threads,
                               "before_rev": args.before_rev, **record})


def _write_case(case_dir: Path) -> None:
    """The phantom case as BraTS NIfTI files (``case-<channel>.nii.gz``), made once for all children."""
    from SegMambaSlicerLib.evaluation.phantom import make_phantom, write_brats_case

    write_brats_case(make_phantom(seed=0), case_dir.parent, case_dir.name)  # <dir>/<name>-<channel>.nii.gz


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", default="before,after,after-low", help=f"comma list of {sorted(VARIANTS)}")
    parser.add_argument("--before-rev", default="4e3c6e9")
    parser.add_argument("--before-tree", default="/tmp/before")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (cuda when available)")
    parser.add_argument("--json", help="append one JSON line per child result to this file")
    parser.add_argument("--trace-dir", help="write each child's RSS timeline (50 ms samples) here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--case-dir", help=argparse.SUPPRESS)
    parser.add_argument("--low-memory", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--labels-out", help=argparse.SUPPRESS)
    parser.add_argument("--trace-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
    else:
        _parent(args)


if __name__ == "__main__":
    main()

"""Plot time per BraTS-size case against device / settings from the benchmarks' JSON lines.

    python benchmarks/plot_benchmarks.py benchmarks/results/*.jsonl --out docs/benchmarks_case_time.png

Reads the records of ``bench_case.py`` (one group of bars per phantom shape: no TTA and 8x TTA),
``bench_forward.py --ablation`` (seconds per window before the speed-ups), ``bench_cohort.py`` (a later
case of a batch) and ``bench_gpu.py`` (when a GPU was available). Bars not measured end to end are
hatched and labelled "estimated": "before speed-ups" is windows x the baseline's median seconds per
window from the ablation run + the measured pipeline overhead; the official code's bar is a lower bound
from MODELS.md §8 (its reference scan alone, 21 s per stage-0 scan, six such scans per window).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first

#: MODELS.md §8: the official reference scan takes 21-24 s per stage-0 scan (L = 262,144) on a 2-core CPU.
REFERENCE_SCAN_S = 21.0
STAGE0_SCANS_PER_WINDOW = 6  # two MambaLayers x three directions
TARGET_S = 180.0
BRATS_SHAPE = (240, 240, 155)

Bar = tuple[str, float, bool]  # label, seconds per case, estimated?


def read(paths: list[Path]) -> list[dict[str, Any]]:
    return [json.loads(line) for path in paths for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _before_seconds_per_window(records: list[dict[str, Any]]) -> float | None:
    forward = next((r for r in records if r.get("benchmark") == "forward" and r.get("ablation")), None)
    row = next((row for row in (forward or {}).get("ablation", []) if row["variant"].startswith("before")), None)
    return None if row is None else row["median_s"]


def _shape(record: dict[str, Any]) -> tuple[int, ...]:
    return tuple(record.get("shape", BRATS_SHAPE))  # records written before bench_case's --slices existed


def case_bars(records: list[dict[str, Any]]) -> list[Bar]:
    """Per phantom shape: official lower bound, before speed-ups (estimated), now; no TTA then 8x TTA."""
    cases = [r for r in records if r.get("benchmark") == "case"]
    before = _before_seconds_per_window(records)
    out: list[Bar] = []
    for size in sorted({_shape(r) for r in cases}):
        group = [r for r in cases if _shape(r) == size]
        plain = next(r for r in group if not r["tta"])
        tag = f"{size[2]} slices, {plain['windows']} windows"
        out.append((f"official code, reference scan, no TTA\n(lower bound, MODELS.md §8) [{tag}]",
                    plain["windows"] * STAGE0_SCANS_PER_WINDOW * REFERENCE_SCAN_S, True))
        if before is not None:
            out.append((f"before speed-ups, no TTA [{tag}]", plain["windows"] * before + plain["overhead_s"], True))
        out.append((f"now, no TTA [{tag}]", plain["total_s"], plain["estimated"]))
        for tta in (r for r in group if r["tta"]):
            out.append((f"now, 8x mirror TTA [{tag}]", tta["total_s"], tta["estimated"]))
    return out


def cohort_bars(records: list[dict[str, Any]]) -> list[Bar]:
    """Median seconds of the cases after the first in a batch, per memory variant."""
    out: list[Bar] = []
    for record in (r for r in records if r.get("benchmark") == "cohort"):
        later = [c["seconds"] for c in record["cases"][1:]]
        if later:
            memory = "kept for the cohort" if record["variant"] == "cohort" else "given back after each case"
            out.append((f"batch, cases 2-{len(record['cases'])}, memory {memory},\nno TTA [155 slices, 4 windows]",
                        statistics.median(later), False))
    return out


def bars(records: list[dict[str, Any]]) -> list[Bar]:
    """All bars in drawing order (top to bottom); CPU bars carry the thread count."""
    threads = next(r["machine"]["threads"] for r in records if r.get("benchmark") == "case")
    cpu = [(f"CPU {threads} thr: {label}", s, e) for label, s, e in case_bars(records) + cohort_bars(records)]
    gpu = [(f"GPU: {r['variant']}", r["seconds"], False) for r in records if r.get("benchmark") == "gpu"]
    return cpu + gpu


def plot(entries: list[Bar], machine: dict[str, Any], gpu_note: str, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(10, 0.5 * len(entries) + 1.8))
    labels = [label for label, _, _ in entries][::-1]
    seconds = [s for _, s, _ in entries][::-1]
    estimated = [e for _, _, e in entries][::-1]
    rects = ax.barh(labels, seconds, color=["#bbbbbb" if e else "#3b75af" for e in estimated])
    for rect, s, est in zip(rects, seconds, estimated):
        if est:
            rect.set_hatch("//")
        ax.text(rect.get_width() * 1.03, rect.get_y() + rect.get_height() / 2,
                f"{s / 60:.1f} min" + (" (estimated)" if est else ""), va="center", fontsize=8)
    ax.axvline(TARGET_S, color="#c0392b", linestyle="--", linewidth=1)
    ax.text(TARGET_S, len(entries) - 0.45, " target 3 min (CPU, no TTA)", color="#c0392b", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlim(10, max(seconds) * 5)
    ax.set_xlabel("seconds per BraTS-size case (4 x 240 x 240 x slices), log scale")
    ax.set_title(f"SegMamba V1 (BraTS card) per case: {machine.get('cpu')}, {machine.get('logical_cpus')} cores, "
                 f"torch {machine.get('torch')}\n{gpu_note}", fontsize=9)
    ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="JSON-lines files written with --json")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks_case_time.png"))
    args = parser.parse_args()
    records = read(args.results)
    entries = bars(records)
    machine = next(r["machine"] for r in records if r.get("benchmark") == "case")
    has_gpu = any(r.get("benchmark") == "gpu" for r in records)
    plot(entries, machine, "" if has_gpu else "No GPU was available for these runs.", args.out)
    for label, seconds, estimated in entries:
        print(f"{label.replace(chr(10), ' '):100s} {seconds:8.1f} s{' (estimated)' if estimated else ''}")


if __name__ == "__main__":
    main()

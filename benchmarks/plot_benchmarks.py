"""Plot time per BraTS-size case against device / settings from the benchmarks' JSON lines.

    python benchmarks/plot_benchmarks.py results.jsonl --out docs/benchmarks_case_time.png

Reads the records of ``bench_case.py`` (measured or estimated cases), ``bench_forward.py --ablation``
(seconds per window before and after the speed-ups) and ``bench_gpu.py`` (when a GPU was available).
Cases that were not run end to end are drawn hatched and labelled "estimated": the "before" cases are
windows x the baseline's seconds per window (same run of bench_forward) + the measured pipeline overhead;
the official code's bar is a lower bound from MODELS.md §8 (its reference scan alone, 21 s per stage-0
scan, six such scans per window).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first

#: MODELS.md §8: the official reference scan takes 21-24 s per stage-0 scan (L = 262,144) on a 2-core CPU.
REFERENCE_SCAN_S = 21.0
STAGE0_SCANS_PER_WINDOW = 6  # two MambaLayers x three directions
TARGET_S = 180.0


def read(paths: list[Path]) -> list[dict[str, Any]]:
    return [json.loads(line) for path in paths for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def bars(records: list[dict[str, Any]]) -> list[tuple[str, float, bool]]:
    """(label, seconds per case, estimated?) in drawing order."""
    cases = [r for r in records if r.get("benchmark") == "case"]
    plain = next(r for r in cases if not r["tta"])
    tta = next((r for r in cases if r["tta"]), None)
    threads = plain["machine"]["threads"]
    out: list[tuple[str, float, bool]] = []
    windows = plain["windows"]
    out.append(("official code, reference scan\n(lower bound, MODELS.md §8), no TTA",
                windows * STAGE0_SCANS_PER_WINDOW * REFERENCE_SCAN_S, True))
    forward = next((r for r in records if r.get("benchmark") == "forward" and r.get("ablation")), None)
    before = next((row for row in (forward or {}).get("ablation", []) if row["variant"].startswith("before")), None)
    if before is not None:
        out.append(("before speed-ups, no TTA", windows * before["median_s"] + plain["overhead_s"], True))
    out.append(("now, no TTA", plain["total_s"], plain["estimated"]))
    if tta is not None:
        if before is not None:
            out.append(("before speed-ups, 8x TTA", tta["windows"] * before["median_s"] + plain["overhead_s"], True))
        out.append(("now, 8x TTA", tta["total_s"], tta["estimated"]))
    for row in (r for r in records if r.get("benchmark") == "gpu"):
        out.append((f"GPU: {row['variant']}", row["seconds"], False))
    return [(f"CPU {threads} thr: {label}" if not label.startswith("GPU") else label, s, e) for label, s, e in out]


def plot(entries: list[tuple[str, float, bool]], machine: dict[str, Any], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(entries) + 1.6))
    labels = [label for label, _, _ in entries][::-1]
    seconds = [s for _, s, _ in entries][::-1]
    estimated = [e for _, _, e in entries][::-1]
    colours = ["#bbbbbb" if e else "#3b75af" for e in estimated]
    rects = ax.barh(labels, seconds, color=colours)
    for rect, est in zip(rects, estimated):
        if est:
            rect.set_hatch("//")
    for rect, s, est in zip(rects, seconds, estimated):
        ax.text(rect.get_width() * 1.03, rect.get_y() + rect.get_height() / 2,
                f"{s / 60:.1f} min" + (" (estimated)" if est else ""), va="center", fontsize=8)
    ax.axvline(TARGET_S, color="#c0392b", linestyle="--", linewidth=1)
    ax.text(TARGET_S, len(entries) - 0.4, " target 3 min (CPU, no TTA)", color="#c0392b", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlim(10, max(seconds) * 4)
    ax.set_xlabel("seconds per BraTS-size case (4 x 240 x 240 x 155), log scale")
    ax.set_title(f"SegMamba V1 per case: {machine.get('cpu')}, {machine.get('logical_cpus')} cores, "
                 f"torch {machine.get('torch')}", fontsize=9)
    ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=130)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="JSON-lines files written with --json")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks_case_time.png"))
    args = parser.parse_args()
    records = read(args.results)
    entries = bars(records)
    machine = next(r["machine"] for r in records if r.get("benchmark") == "case")
    plot(entries, machine, args.out)
    for label, seconds, estimated in entries:
        print(f"{label.replace(chr(10), ' '):75s} {seconds:8.1f} s{' (estimated)' if estimated else ''}")


if __name__ == "__main__":
    main()

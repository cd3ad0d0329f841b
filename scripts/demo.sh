#!/usr/bin/env bash
# The README's main command: set up .venv, generate a synthetic BraTS-size case, segment it with the
# demo model (a small SegMamba trained on synthetic phantoms; not for clinical use) on CPU or GPU, and
# write the label map, the .seg.nrrd, a PNG preview and a CSV of volumes under out/demo.
# Extra arguments are passed on, e.g. `bash scripts/demo.sh --device cpu --seed 7`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/segmamba-slicer demo --out out/demo "$@"

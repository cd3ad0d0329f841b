"""Command line: ``segmamba-slicer predict|models|phantom|demo|batch|evaluate``.

Errors the user can fix print one line and exit non-zero; ``--verbose`` adds the traceback.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import SegMambaError
from ..evaluation.metrics import add_evaluate_parser
from ..evaluation.phantom import BRATS_SHAPE
from ..models.cache import ENV_VAR
from ..run.batch import add_batch_parser

if TYPE_CHECKING:
    import SimpleITK as sitk

    from ..models.cards import ModelCard

EXIT_USER_ERROR = 1
EXIT_BUG = 2
EXIT_CANCELLED = 130
#: 128 + SIGTERM, as a shell reports a process that SIGTERM ended.
EXIT_TERMINATED = 143
#: The model the README's main command runs: a small SegMamba trained on phantoms, not for clinical use.
DEMO_MODEL_ID = "segmamba-demo"


class ProgressBar:
    """A one-line text progress bar on stderr with an ETA (redrawn in place on terminals)."""

    def __init__(self, stream=None, width: int = 30) -> None:
        self.stream, self.width = stream or sys.stderr, width  # looked up now: tests and GUIs swap sys.stderr
        self.start = time.perf_counter()
        self.tty = self.stream.isatty()
        self.last_printed = -1.0
        self.message = ""

    def __call__(self, fraction: float, message: str) -> None:
        if fraction <= 0.0:
            if message != self.message:
                self._finish_line()
                print(f"{message} ...", file=self.stream, flush=True)
            self.message = message
            self.start = time.perf_counter()
            return
        if not self.tty and fraction - self.last_printed < 0.1 and fraction < 1.0:
            return
        self.last_printed = fraction
        elapsed = time.perf_counter() - self.start
        eta = elapsed * (1.0 - fraction) / fraction
        filled = int(self.width * fraction)
        bar = "#" * filled + "-" * (self.width - filled)
        line = f"[{bar}] {100 * fraction:5.1f}% {message} elapsed {elapsed:5.0f}s eta {eta:5.0f}s"
        end = "" if self.tty and fraction < 1.0 else "\n"
        print(("\r" if self.tty else "") + line, end=end, file=self.stream, flush=True)

    def _finish_line(self) -> None:
        if self.tty and 0.0 < self.last_printed < 1.0:
            print(file=self.stream)


def _cmd_predict(args: argparse.Namespace) -> int:
    seg_path = None
    if args.seg_nrrd:
        seg_path = Path(args.seg_nrrd) if args.seg_nrrd != "auto" else seg_nrrd_beside(args.output)
    check_outputs(args.input, label_map=args.output, segmentation=seg_path)  # before the slow imports

    from ..engine.pipeline import SegmentOptions, segment
    from ..io.images import resolve_inputs, write_image_atomic
    from ..models.registry import resolve_model

    card = resolve_model(args.model)
    inputs = resolve_inputs(args.input, card)
    options = SegmentOptions(
        device=args.device, weights=args.weights, overlap=args.overlap, sw_batch_size=args.sw_batch_size,
        tta=args.tta, mixed_precision=not args.no_amp, scan_backend=args.scan_backend, folds=args.folds,
    )
    progress = None if args.quiet else ProgressBar()
    result = segment(inputs, card, options, progress=progress)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    out = write_image_atomic(result.labelmap, args.output)
    print(f"label map: {out}")
    if seg_path is not None:
        from ..io.seg_nrrd import write_seg_nrrd

        written = write_seg_nrrd(result.labelmap, card.labels, seg_path, extra_segments=card.regions)
        print(f"segmentation: {written}")
    print(f"device {result.device}, {result.windows} windows, {result.seconds:.1f} s")
    for name, ml in result.volumes.items():
        print(f"  {name}: {ml:.2f} mL")
    return 0


def check_outputs(inputs: Sequence[str | Path], label_map: Path, segmentation: Path | None = None) -> None:
    """Before any work: every output can be written, replaces no input and no other output.

    ``inputs`` are the paths as given: image files, DICOM series folders, or one case folder, whose
    image files are the inputs (the folder itself may receive outputs). This needs no model, so it
    runs before PyTorch is imported, within a second of the start. Stale temporary files that killed
    runs left beside the outputs are removed here, as a batch does.
    """
    from ..io.atomic import OutputError, check_writable, refuse_overwriting_inputs, remove_stale_temporaries
    from ..io.images import LABELMAP_SUFFIXES, is_image_file

    outputs = [check_writable(label_map, suffixes=LABELMAP_SUFFIXES, what="label map")]
    if segmentation is not None:
        outputs.append(check_writable(segmentation, suffixes=(".seg.nrrd",), what="segmentation"))
        if outputs[1].resolve() == outputs[0].resolve():
            raise OutputError(f"The label map and the segmentation would both be written to {outputs[0]}.")
    sources: list[Path] = []
    for given in map(Path, inputs):
        images = [p for p in given.iterdir() if is_image_file(p)] if given.is_dir() else []
        sources.extend(images or [given])
    refuse_overwriting_inputs(outputs, sources)
    for output in outputs:
        remove_stale_temporaries(output)


def seg_nrrd_beside(path: Path) -> Path:
    """``<name>.seg.nrrd`` beside a label map ``<name>.nii.gz`` (or another image suffix)."""
    from ..io.images import IMAGE_SUFFIXES

    path = Path(path)
    name = path.name
    suffix = next((s for s in IMAGE_SUFFIXES if name.lower().endswith(s)), "")
    return path.with_name(name[: len(name) - len(suffix)] + ".seg.nrrd")


def _models_list(args: argparse.Namespace) -> int:
    from ..models.cache import cache_dir
    from ..models.registry import all_cards, weights_state

    print(f"{'ID':28s} {'ARCHITECTURE':12s} {'WEIGHTS':17s} NAME")
    for card in all_cards().values():
        print(f"{card.id:28s} {card.architecture:12s} {weights_state(card):17s} {card.display_name}")
    print(f"user models and downloads: {cache_dir()} (set {ENV_VAR} to move them)")
    return 0


def _models_show(args: argparse.Namespace) -> int:
    from ..models.checkpoints import verified_weights_path
    from ..models.registry import READY, resolve_model, weights_state

    card = resolve_model(args.model)
    print(f"id: {card.id}\nname: {card.display_name}\narchitecture: {card.architecture} {card.architecture_kwargs}")
    if card.source_path is not None:
        print(f"card: {card.source_path}")
    print("inputs: " + ", ".join(f"{c.key} ({c.display_name})" for c in card.channels))
    print("labels: " + ", ".join(f"{lab.value}={lab.name}" for lab in card.labels))
    if card.regions:
        print("regions: " + ", ".join(f"{r.name}={'+'.join(map(str, r.labels))}" for r in card.regions))
    state = weights_state(card)
    print(f"weights: {state} ({card.weights.kind}) {card.weights_path() or card.weights.url or ''}")
    if card.weights.sha256:
        print(f"  sha256 {card.weights.sha256}")
    if state != READY and card.weights.sha256:
        try:
            verified_weights_path(card)
        except SegMambaError as exc:  # what is wrong with the file and how to get the right one back
            print(f"  {exc}")
    if card.weights.instructions:
        print(f"  {card.weights.instructions}")
    if card.intended_use:
        print(f"intended use: {card.intended_use}")
    return 0


def _models_import(args: argparse.Namespace) -> int:
    from ..models.registry import import_weights

    card = import_weights(args.path, model_id=args.id, display_name=args.name, like=args.like)
    print(f"imported {card.id}: {card.architecture} {card.architecture_kwargs}")
    print(f"card: {card.source_path}\nweights: {card.weights_path()} (sha256 {card.weights.sha256})")
    return 0


def _models_download(args: argparse.Namespace) -> int:
    from ..models.registry import download_weights

    path = download_weights(args.model, progress=None if args.quiet else _DownloadProgress(args.model))
    print(f"weights of {args.model}: {path}")
    return 0


class _DownloadProgress:
    """Adapts the downloader's byte counts to :class:`ProgressBar` (sizes in MB)."""

    def __init__(self, name: str) -> None:
        self.bar = ProgressBar()
        self.name = name

    def __call__(self, done: int, total: int | None) -> None:
        if total:
            self.bar(done / total, f"downloading {self.name} ({total / 1e6:.1f} MB)")
        elif done == 0:
            self.bar(0.0, f"downloading {self.name} (size not announced)")


def _cmd_phantom(args: argparse.Namespace) -> int:
    from ..evaluation.phantom import make_phantom, write_brats_case

    case = make_phantom(shape=tuple(args.shape), seed=args.seed)
    paths = write_brats_case(case, Path(args.out_dir), args.case_id or f"Phantom-{args.seed:05d}")
    for key, path in paths.items():
        print(f"{key}: {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    """The README's main command: a phantom case segmented end to end, offline, with its Dice as a check."""
    from ..engine.pipeline import SegmentOptions, segment
    from ..evaluation.phantom import make_phantom, write_brats_case
    from ..io.images import read_image, resolve_inputs, write_image_atomic
    from ..io.report import write_preview_png, write_volumes_csv
    from ..io.seg_nrrd import write_seg_nrrd

    card = _demo_card(args.model)
    print(f"model: {card.display_name}" + (f" - {card.intended_use}" if card.intended_use else ""))
    shape, case_id = tuple(args.shape), f"Phantom-{args.seed:05d}"
    print(f"generating a synthetic BraTS-like case {'x'.join(map(str, shape))} (seed {args.seed}) ...")
    case = make_phantom(shape=shape, seed=args.seed)
    case_dir = write_brats_case(case, args.out / "case", case_id)["seg"].parent
    inputs = resolve_inputs([case_dir], card)
    result = segment(inputs, card, SegmentOptions(device=args.device), progress=ProgressBar())
    out = args.out / "segmentation"
    written = {
        "label map": write_image_atomic(result.labelmap, out / "seg.nii.gz"),
        "segmentation": write_seg_nrrd(result.labelmap, card.labels, out / "seg.seg.nrrd", extra_segments=card.regions),
        "preview": write_preview_png(read_image(inputs[0]), result.labelmap, card, out / "preview.png"),
        "volumes": write_volumes_csv(result.volumes, card, out / "volumes.csv"),
    }
    print(f"case: {case_dir}")
    for what, path in written.items():
        print(f"{what}: {path}")
    print(f"device {result.device}, {result.windows} windows, {result.seconds:.1f} s")
    print("Dice against the phantom's own labels:")
    for name, dice in _dice_scores(result.labelmap, case.seg, card).items():
        print(f"  {name}: {'n/a (absent in both)' if dice is None else f'{dice:.3f}'}")
    return 0


def _demo_card(spec: str) -> ModelCard:
    """The model the demo runs, with its weights present; the demo model ships separately, so say so."""
    from ..models.registry import READY, RegistryError, resolve_model, weights_state

    try:
        card = resolve_model(spec)
    except RegistryError:
        if spec != DEMO_MODEL_ID:
            raise
        raise RegistryError(
            f"the demo model is not installed in this checkout (no model card {DEMO_MODEL_ID!r} in "
            "SegMambaSlicer/Resources/Models); pass another model with --model."
        ) from None
    if weights_state(card) != READY:
        where = card.weights_path() or card.weights.url or "no weights named in its card"
        raise RegistryError(
            f"the weights of {card.id} are not installed ({where}); "
            + (f"run: segmamba-slicer models download {card.id}" if card.weights.kind == "url"
               else "see: segmamba-slicer models show " + card.id)
        )
    return card


def _dice_scores(predicted: sitk.Image, reference: sitk.Image, card: ModelCard) -> dict[str, float | None]:
    """Dice per label and region: 2|P∩R| / (|P| + |R|); None when both are empty."""
    import numpy as np
    import SimpleITK as sitk

    pred, ref = sitk.GetArrayViewFromImage(predicted), sitk.GetArrayViewFromImage(reference)
    groups = [(f"{lab.abbreviation or lab.value} {lab.name}", (lab.value,)) for lab in card.labels]
    groups += [(f"{region.name} {region.display_name}", region.labels) for region in card.regions]
    scores: dict[str, float | None] = {}
    for name, values in groups:
        p, r = np.isin(pred, values), np.isin(ref, values)
        total = int(p.sum()) + int(r.sum())
        scores[name] = 2.0 * int(np.logical_and(p, r).sum()) / total if total else None
    return scores


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (separate so tests and docs can inspect it)."""
    parser = argparse.ArgumentParser(prog="segmamba-slicer", description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", "-v", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("predict", help="segment one case")
    p.add_argument("--model", "-m", required=True, help="model card id, card .json, or checkpoint .pt")
    p.add_argument("--weights", "-w", help="weights file (overrides the card's)")
    p.add_argument("-i", "--input", nargs="+", required=True,
                   help="one image per model input in the card's order (e.g. T2W T2F T1N T1C), or one case folder")
    p.add_argument("-o", "--output", required=True, type=Path, help="label map to write (.nii.gz, .nrrd)")
    p.add_argument("--seg-nrrd", nargs="?", const="auto", help="also write a Slicer .seg.nrrd (path optional)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--overlap", type=float, help="sliding-window overlap in [0, 1) (card default)")
    p.add_argument("--sw-batch-size", type=int, help="windows per network call (card default)")
    p.add_argument("--tta", action="store_true", help="mirror test-time augmentation (8x slower)")
    p.add_argument("--no-amp", action="store_true", help="float32 on CUDA instead of fp16 autocast")
    p.add_argument("--scan-backend", choices=["auto", "torch", "fused", "reference"], help="selective-scan backend")
    p.add_argument("--folds", nargs="+", help="nnU-Net result folders: folds to ensemble (e.g. 0 1 2 or all)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("models", help="list, show, import or download models")
    msub = p.add_subparsers(dest="action", required=True)
    msub.add_parser("list", help="list built-in and user models with the state of their weights").set_defaults(
        func=_models_list)
    show = msub.add_parser("show", help="show one model card")
    show.add_argument("model", help="card id, card .json or checkpoint")
    show.set_defaults(func=_models_show)
    imp = msub.add_parser("import", help="validate a checkpoint and register it as a user model")
    imp.add_argument("path", type=Path, help=".pt/.pth file, or a folder holding one")
    imp.add_argument("--id", help="id of the new model (default: from the file name)")
    imp.add_argument("--name", help="display name of the new model")
    imp.add_argument("--like", metavar="CARD_ID",
                     help="model whose inputs, labels and pipeline settings the checkpoint uses (default: by inputs)")
    imp.set_defaults(func=_models_import)
    download = msub.add_parser("download", help="download a model's weights (checksum-verified, resumable)")
    download.add_argument("model", help="model id")
    download.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    download.set_defaults(func=_models_download)

    p = sub.add_parser("phantom", help="write a synthetic BraTS-like case (not real anatomy)")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape", type=int, nargs=3, default=[240, 240, 155], metavar=("X", "Y", "Z"))
    p.add_argument("--case-id", help="case folder name (default Phantom-<seed>)")
    p.set_defaults(func=_cmd_phantom)

    p = sub.add_parser("demo", help="segment a synthetic case with the demo model (offline, no patient data)")
    p.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder (default out/demo)")
    p.add_argument("--shape", type=int, nargs=3, default=list(BRATS_SHAPE), metavar=("X", "Y", "Z"),
                   help="grid of the synthetic case (default: BraTS 240 240 155)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--model", "-m", default=DEMO_MODEL_ID, help=f"model id or card .json (default {DEMO_MODEL_ID})")
    p.set_defaults(func=_cmd_demo)
    add_batch_parser(sub)
    add_evaluate_parser(sub)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler or ``kill`` ending the run), raised like Ctrl-C so that cleanup runs."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def handle_sigterm() -> None:
    """Make SIGTERM unwind like Ctrl-C (temporary files removed); only the main thread may set this."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``segmamba-slicer`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    previous = signal.getsignal(signal.SIGTERM)
    handle_sigterm()
    try:
        return args.func(args)
    except Terminated:
        print("\nterminated", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print("\ncancelled", file=sys.stderr)
        return EXIT_CANCELLED
    except SegMambaError as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as exc:  # noqa: BLE001 - last resort: one line, traceback on request
        if args.verbose:
            traceback.print_exc()
        print(f"error: unexpected {type(exc).__name__}: {exc} (run with --verbose for details)", file=sys.stderr)
        return EXIT_BUG
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)

"""``segmamba-slicer models list|show|import|download``: the built-in and user models and their weights."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import SegMambaError
from ..models.cache import ENV_VAR
from .common import ProgressBar


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``models list|show|import|download`` to a ``segmamba-slicer`` sub-command parser."""
    p = subparsers.add_parser("models", help="list, show, import or download models")
    msub = p.add_subparsers(dest="action", required=True)
    listing = msub.add_parser("list", help="list built-in and user models with the state of their weights")
    listing.set_defaults(func=_list)
    show = msub.add_parser("show", help="show one model card")
    show.add_argument("model", help="card id, card .json or checkpoint")
    show.set_defaults(func=_show)
    imp = msub.add_parser("import", help="validate a checkpoint and register it as a user model")
    imp.add_argument("path", type=Path, help=".pt/.pth file, or a folder holding one")
    imp.add_argument("--id", help="id of the new model (default: from the file name)")
    imp.add_argument("--name", help="display name of the new model")
    imp.add_argument("--like", metavar="CARD_ID",
                     help="model whose inputs, labels and pipeline settings the checkpoint uses "
                     "(default: by inputs)")
    imp.set_defaults(func=_import)
    download = msub.add_parser("download", help="download a model's weights (checksum-verified, resumable)")
    download.add_argument("model", help="model id")
    download.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    download.set_defaults(func=_download)
    return p


def _list(args: argparse.Namespace) -> int:
    from ..models.cache import cache_dir
    from ..models.registry import all_cards, weights_state

    print(f"{'ID':28s} {'ARCHITECTURE':12s} {'WEIGHTS':17s} NAME")
    for card in all_cards().values():
        print(f"{card.id:28s} {card.architecture:12s} {weights_state(card):17s} {card.display_name}")
    print(f"user models and downloads: {cache_dir()} (set {ENV_VAR} to move them)")
    return 0


def _show(args: argparse.Namespace) -> int:
    from ..models.checkpoints import verified_weights_path
    from ..models.registry import READY, resolve_model, weights_state

    card = resolve_model(args.model)
    print(f"id: {card.id}\nname: {card.display_name}")
    print(f"architecture: {card.architecture} {card.architecture_kwargs}")
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


def _import(args: argparse.Namespace) -> int:
    from ..models.registry import import_weights

    card = import_weights(args.path, model_id=args.id, display_name=args.name, like=args.like)
    print(f"imported {card.id}: {card.architecture} {card.architecture_kwargs}")
    print(f"card: {card.source_path}\nweights: {card.weights_path()} (sha256 {card.weights.sha256})")
    return 0


def _download(args: argparse.Namespace) -> int:
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

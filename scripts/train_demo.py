"""Train the offline DEMO model: a reduced SegMamba V1 on synthetic BraTS-like phantoms, on CPU.

DEMO ONLY: the model is trained on synthetic phantoms (SegMambaSlicerLib.evaluation.phantom) and is not for
clinical use. It exists so that the project's main command segments a realistic case end to end on a
machine without network access.

Everything the network needs is read from the demo card (Resources/Models/segmamba-demo.json): the
architecture and its constructor arguments, the channel order, the preprocessing and the window size,
which is also the training crop size. Cases are prepared exactly as ``pipeline.segment`` prepares
them (stack the card's channels, reorder to the card's orientation, crop to the non-zero box, z-score
each channel over the crop, resample to the card's ``preprocessing.spacing``), so the network sees at
training time what it sees at inference time. The label maps are resampled the same way (one-hot,
trilinear, argmax), as the logits are resampled back at inference.

Training draws fresh phantoms from seeds below :data:`HELD_OUT_SEED_START` (seeds from there on are
held out for ``scripts/eval_demo.py``), takes foreground-biased random crops of the window size, and
minimises cross-entropy + soft Dice with AdamW (warm-up, then cosine decay). It is seeded end to end;
the shipped weights took 58 minutes on one thread of a shared 2-core CPU (docs/demo-model.md). At the
end the weights are written (bare state dict, atomically) to the file the card names and the card's
``weights.sha256`` is updated. The window size must stay what the network was trained on: the
tri-oriented Mamba cuts each window's tokens into a fixed number of slices (``nslices``), so another
window size changes what the inter-slice scan sees (a 64^3 window loses the necrotic core).

Gradients flow through the Mamba layers by the library's own pure-PyTorch selective scan (its
autograd path), so the network is trained with the same scan that runs it at inference time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from SegMambaSlicerLib.engine.recipes.segmamba import array_spacing, network_grid, preprocess, resample_linear
from SegMambaSlicerLib.evaluation.phantom import PhantomCase, make_phantom
from SegMambaSlicerLib.io.geometry import direction_matrix, reorder_to, stack_channels
from SegMambaSlicerLib.models.cards import ModelCard, load_card
from SegMambaSlicerLib.models.downloads import sha256_file
from SegMambaSlicerLib.models.resources import models_dir
from SegMambaSlicerLib.networks import build_network
from torch import Tensor, nn

DEMO_CARD = models_dir() / "segmamba-demo.json"
#: Phantom seeds from here on are never used for training; scripts/eval_demo.py evaluates on them.
HELD_OUT_SEED_START = 100_000
#: Grids (x, y, z) the training phantoms are drawn on, with their probabilities: mostly the BraTS grid,
#: plus smaller fields of view (smaller brain and lesions in voxels) so that small test grids work too.
TRAIN_SHAPES: tuple[tuple[int, int, int], ...] = ((240, 240, 155), (160, 160, 104), (96, 96, 64))
TRAIN_SHAPE_WEIGHTS: tuple[float, ...] = (0.6, 0.25, 0.15)


# ---------------------------------------------------------------- data


def prepare_case(case: PhantomCase, card: ModelCard) -> tuple[np.ndarray, np.ndarray]:
    """Network input (C, z, y, x) float32 and class-index target (z, y, x) int64, as the pipeline sees them."""
    images = [case.images[channel.key] for channel in card.channels]
    reorder = reorder_to(direction_matrix(images[0]), card.orientation)
    data = np.ascontiguousarray(reorder.forward(stack_channels(images)))
    net_input, box = preprocess(data, card.preprocessing)
    labels = reorder.forward(sitk.GetArrayFromImage(case.seg))[box.slices]
    lookup = np.zeros(256, dtype=np.int64)
    lookup[list(card.label_values)] = np.arange(len(card.label_values))
    grid = network_grid(net_input.shape[1:], array_spacing(images[0], reorder), card.preprocessing)
    return resample_linear(net_input, grid), resample_classes(lookup[labels], grid, len(card.label_values))


def resample_classes(target: np.ndarray, grid: tuple[int, ...], classes: int) -> np.ndarray:
    """Class indices on another grid: each class's indicator resampled as the logits are, then the argmax."""
    if target.shape == grid:
        return target
    onehot = np.stack([target == k for k in range(classes)]).astype(np.float32)
    return resample_linear(onehot, grid).argmax(0).astype(np.int64)


def _pad_to(array: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad the last three axes up to ``size`` (MONAI's sliding window pads the z-scored input with 0)."""
    pad = [(0, 0)] * (array.ndim - 3) + [(0, max(0, size - n)) for n in array.shape[-3:]]
    return np.pad(array, pad) if any(p[1] for p in pad) else array


@dataclass
class CropSampler:
    """Random cubic crops of one prepared case, centred on tumour voxels with probability ``foreground``."""

    image: np.ndarray
    target: np.ndarray
    size: int
    foreground: float

    def __post_init__(self) -> None:
        self.image = _pad_to(self.image, self.size)
        self.target = _pad_to(self.target, self.size)
        self._tumour = np.flatnonzero(self.target)

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        shape = np.array(self.target.shape)
        if self._tumour.size and rng.random() < self.foreground:
            centre = np.array(np.unravel_index(self._tumour[rng.integers(self._tumour.size)], shape))
        else:
            centre = rng.integers(0, shape)
        lo = np.clip(centre - self.size // 2, 0, shape - self.size)
        box = tuple(slice(a, a + self.size) for a in lo)
        return self.image[(slice(None), *box)], self.target[box]


# ---------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines the trained weights (with the card's architecture)."""

    iterations: int = 800
    batch: int = 2
    iterations_per_case: int = 10
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup: int = 20
    foreground: float = 0.8
    seed: int = 0
    threads: int = 1


def dice_ce_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy + (1 - mean soft Dice over the foreground classes); Dice counts the whole batch."""
    ce = F.cross_entropy(logits, target)
    probs = logits.softmax(1)
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 4, 1, 2, 3).to(probs.dtype)
    dims = (0, 2, 3, 4)
    overlap = (probs * onehot).sum(dims)[1:]
    total = (probs + onehot).sum(dims)[1:]
    return ce + 1.0 - ((2.0 * overlap + 1.0) / (total + 1.0)).mean()


def _lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to zero at the last iteration."""
    if step < config.warmup:
        return (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.iterations - config.warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _training_case(rng: np.random.Generator, card: ModelCard, crop: int, foreground: float) -> CropSampler:
    seed = int(rng.integers(HELD_OUT_SEED_START))
    shape = TRAIN_SHAPES[int(rng.choice(len(TRAIN_SHAPES), p=TRAIN_SHAPE_WEIGHTS))]
    return CropSampler(*prepare_case(make_phantom(shape=shape, seed=seed), card), size=crop, foreground=foreground)


def train(card: ModelCard, config: TrainConfig, log: bool = True) -> nn.Module:
    """Train the card's network from scratch on phantom crops of the card's window size."""
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    crop = card.inference.roi_size[0]
    if len(set(card.inference.roi_size)) != 1:
        raise ValueError(f"the demo trains on cubic crops; card roi_size is {card.inference.roi_size}")
    network = build_network(card.architecture, **card.architecture_kwargs).train()
    network = network.to(memory_format=torch.channels_last_3d)  # ~1.5x faster 3-D convolutions on CPU
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, config))
    start = time.perf_counter()
    sampler = _training_case(rng, card, crop, config.foreground)
    for step in range(config.iterations):
        if step and step % config.iterations_per_case == 0:
            sampler = _training_case(rng, card, crop, config.foreground)
        crops = [sampler.sample(rng) for _ in range(config.batch)]
        images = torch.from_numpy(np.stack([c[0] for c in crops])).to(memory_format=torch.channels_last_3d)
        loss = dice_ce_loss(network(images), torch.from_numpy(np.stack([c[1] for c in crops])))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if log and (step % 10 == 0 or step == config.iterations - 1):
            elapsed = time.perf_counter() - start
            print(f"step {step + 1:4d}/{config.iterations}  loss {loss.item():.4f}  {elapsed / 60:5.1f} min",
                  flush=True)
    return network.to(memory_format=torch.contiguous_format).eval()


def save_weights(network: nn.Module, path: Path) -> str:
    """Write the bare state dict atomically (temporary file + rename) and return its SHA-256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save({k: v.detach().contiguous() for k, v in network.state_dict().items()}, tmp_name)
        os.chmod(tmp_name, 0o644)  # a shipped resource, readable by all (mkstemp creates it owner-only)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return sha256_file(path)


def record_sha256(card_path: Path, sha256: str) -> None:
    """Store the new weights' SHA-256 in the card file, changing nothing else in its text."""
    text = card_path.read_text(encoding="utf-8")
    updated, count = re.subn(r'"sha256":\s*(null|"[0-9a-fA-F]*")', f'"sha256": "{sha256}"', text)
    expected = json.loads(text)
    expected["weights"]["sha256"] = sha256
    if count != 1 or json.loads(updated) != expected:
        raise ValueError(f"{card_path} must hold exactly one \"sha256\" entry, in \"weights\"")
    card_path.write_text(updated, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--card", type=Path, default=DEMO_CARD, help="demo model card (default: the shipped one)")
    parser.add_argument("--iterations", type=int, default=TrainConfig.iterations)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--threads", type=int, default=TrainConfig.threads,
                        help="torch CPU threads (default 1: on a shared 2-core machine two threads ran 2-6x slower)")
    parser.add_argument("--out", type=Path, default=None,
                        help="write the weights here instead of the card's weights file (the card is left alone)")
    args = parser.parse_args(argv)
    card = load_card(args.card)
    config = TrainConfig(iterations=args.iterations, seed=args.seed, threads=args.threads)
    print(f"Training {card.display_name}: {config}", flush=True)
    start = time.perf_counter()
    network = train(card, config)
    minutes = (time.perf_counter() - start) / 60
    target = args.out or card.weights_path()
    if target is None:
        raise SystemExit(f"card {args.card} names no weights file; pass --out")
    sha256 = save_weights(network, target)
    if args.out is None:
        record_sha256(args.card, sha256)
    size_mb = target.stat().st_size / 1e6
    print(f"trained in {minutes:.1f} min; wrote {target} ({size_mb:.1f} MB, sha256 {sha256})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The shipped DEMO model (synthetic phantoms only, not for clinical use) and the scripts that make it.

Checks the card's labelling and pipeline fields, the weights' integrity and strict loading, the
training data preparation, the Dice helper, and the model's Dice on one small held-out phantom
through the real pipeline.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from SegMambaSlicerLib.engine.pipeline import load_network
from SegMambaSlicerLib.evaluation.phantom import make_phantom
from SegMambaSlicerLib.models.cards import builtin_cards
from SegMambaSlicerLib.models.checkpoints import detect_architecture, load_into, load_state_dict_file
from SegMambaSlicerLib.networks import build_network

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
MAX_WEIGHTS_BYTES = 20_000_000


def _script(name: str) -> ModuleType:
    """Import ``scripts/<name>.py`` (the scripts folder is not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def card():
    return builtin_cards()["segmamba-demo"]


@pytest.fixture(scope="module")
def state_dict(card):
    return load_state_dict_file(card.weights_path())


@pytest.fixture
def one_thread():
    """One thread: on a shared 2-core machine a busy second core makes 2-thread runs several times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_card_is_labelled_as_a_synthetic_demo(card):
    assert card.display_name.startswith("DEMO")
    assert "synthetic" in card.intended_use.lower() and "not for clinical use" in card.intended_use.lower()
    assert "synthetic" in card.description.lower()


def test_card_has_the_brats_inputs_labels_and_regions(card):
    brats = builtin_cards()["segmamba-brats2023"]
    assert card.channels == brats.channels
    assert card.labels == brats.labels
    assert card.regions == brats.regions
    assert dataclasses.replace(card.preprocessing, spacing=None) == brats.preprocessing
    assert card.preprocessing.spacing == (2.0, 2.0, 2.0)  # runs at 2 mm: 8x fewer voxels (docs/demo-model.md)
    assert card.inference.overlap == 0.5


def test_weights_match_the_card_checksum_and_size_limit(card):
    path = card.weights_path()
    assert card.weights.kind == "file" and path.name == "segmamba-demo.pt"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == card.weights.sha256
    assert path.stat().st_size <= MAX_WEIGHTS_BYTES


def test_weights_load_strictly_into_the_card_network(card, state_dict):
    network = build_network(card.architecture, **card.architecture_kwargs)
    load_into(network, state_dict)
    detected = detect_architecture(state_dict)
    assert detected.name == card.architecture == "segmamba_v1"
    for key in ("in_chans", "out_chans", "depths", "feat_size", "hidden_size"):
        assert list(np.atleast_1d(detected.kwargs[key])) == list(np.atleast_1d(card.architecture_kwargs[key]))


def test_demo_network_can_take_a_training_step(card, one_thread):
    """scripts/train_demo.py needs gradients through every layer, the Mamba mixers included."""
    train_demo = _script("train_demo")
    torch.manual_seed(0)
    network = build_network(card.architecture, **card.architecture_kwargs).train()
    x = torch.randn(1, 4, *card.inference.roi_size)
    target = torch.randint(0, len(card.label_values), (1, *card.inference.roi_size))
    train_demo.dice_ce_loss(network(x), target).backward()
    grads = {name: p.grad for name, p in network.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["vit.stages.0.0.mamba.A_log"].abs().sum() > 0
    assert grads["vit.stages.0.0.mamba.x_proj_s.weight"].abs().sum() > 0


def test_prepare_case_keeps_every_labelled_voxel_and_zscores_at_the_input_spacing():
    train_demo = _script("train_demo")
    case = make_phantom(shape=(48, 48, 32), seed=3)
    image, target = train_demo.prepare_case(case, builtin_cards()["segmamba-brats2023"])
    seg = sitk.GetArrayFromImage(case.seg)
    assert image.shape[0] == 4 and image.shape[1:] == target.shape
    assert np.array_equal(np.bincount(target.ravel(), minlength=4)[1:], np.bincount(seg.ravel(), minlength=4)[1:])
    np.testing.assert_allclose(image.mean(axis=(1, 2, 3)), 0.0, atol=1e-4)
    np.testing.assert_allclose(image.std(axis=(1, 2, 3)), 1.0, atol=1e-4)


def test_prepare_case_at_the_card_spacing_keeps_each_label_volume(card):
    """At 2 mm each training voxel stands for 8 input voxels; the labels' volumes in mm³ must survive."""
    train_demo = _script("train_demo")
    case = make_phantom(shape=(96, 96, 64), seed=3)
    image, target = train_demo.prepare_case(case, card)
    seg = sitk.GetArrayFromImage(case.seg)
    box = [np.flatnonzero(np.any(sitk.GetArrayFromImage(case.images["t1n"]) != 0, axis=other)) for other in
           ((1, 2), (0, 2), (0, 1))]
    assert image.shape[0] == 4 and image.shape[1:] == target.shape
    assert target.shape == tuple(round((b[-1] - b[0] + 1) / 2) for b in box)  # the brain's box at 2 mm
    for label in (1, 2, 3):
        fine_mm3 = float((seg == label).sum())  # the phantom is 1 mm isotropic
        coarse_mm3 = 8.0 * float((target == label).sum())
        assert coarse_mm3 == pytest.approx(fine_mm3, rel=0.15), label


def test_crop_sampler_pads_small_volumes_and_centres_on_tumour():
    train_demo = _script("train_demo")
    target = np.zeros((10, 40, 40), dtype=np.int64)
    target[5, 30, 12] = 3
    image = np.ones((4, *target.shape), dtype=np.float32)
    sampler = train_demo.CropSampler(image, target, size=16, foreground=1.0)
    crop_image, crop_target = sampler.sample(np.random.default_rng(0))
    assert crop_image.shape == (4, 16, 16, 16) and crop_target.shape == (16, 16, 16)
    assert crop_target.sum() == 3  # the only tumour voxel is inside the crop
    assert crop_image[:, 10:].max() == 0.0  # z was padded with zeros beyond the volume's 10 slices


def test_dice_on_hand_computed_cases():
    eval_demo = _script("eval_demo")
    pred = np.array([1, 1, 2, 0, 0])
    ref = np.array([1, 2, 2, 0, 0])
    assert eval_demo.dice(pred, ref, [1]) == pytest.approx(2 / 3)
    assert eval_demo.dice(pred, ref, [2]) == pytest.approx(2 / 3)
    assert eval_demo.dice(pred, ref, [1, 2]) == 1.0
    assert eval_demo.dice(pred, ref, [3]) == 1.0  # empty in both


def test_demo_segments_a_held_out_phantom(card, one_thread):
    """A 128×128×80 head (the smallest grid on which 2 mm still shows every lesion part; docs/demo-model.md)."""
    eval_demo = _script("eval_demo")
    network = load_network(card, None, torch.device("cpu"))
    result = eval_demo.evaluate_case(card, eval_demo.HELD_OUT_SEED_START, (128, 128, 80), network)
    for label in card.labels:
        column = f"{label.abbreviation} ({label.value})"
        assert result.scores[column] >= 0.85, (column, result.scores)

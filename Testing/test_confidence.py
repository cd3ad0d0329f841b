"""Per-voxel confidence: 1 − normalised entropy of the prediction the label map comes from.

Expected values are computed here independently with numpy (softmax or sigmoid, then entropy) from
logits known by hand (fixed-weight toy networks) or from nnunetv2's own logits, and mapped back the
way the label map is: SegMamba's reorientation and crop paste, nnU-Net's probability export.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage
from SegMambaSlicerLib.engine.inference import predict_logits
from SegMambaSlicerLib.engine.pipeline import SegmentOptions, segment, window_settings
from SegMambaSlicerLib.engine.recipes import base
from SegMambaSlicerLib.engine.recipes.base import regions_confidence, softmax_confidence
from SegMambaSlicerLib.engine.recipes.nnunet import (
    nnunet_export,
    nnunet_restore,
    preprocess_nnunet,
    resample_to_shape,
)
from SegMambaSlicerLib.evaluation.phantom import MODALITIES, make_phantom
from SegMambaSlicerLib.models.nnunet import (
    FoldEnsemble,
    NnunetChannel,
    NnunetSettings,
    settings_from_plans,
)
from toy_models import PointwiseNet, nnunet_result_card, toy_card

CPU = SegmentOptions(device="cpu")
WITH_CONFIDENCE = SegmentOptions(device="cpu", confidence=True)
NNUNET_FIXTURES = Path(__file__).resolve().parent / "fixtures_nnunet"


# --- independent numpy definitions -------------------------------------------------------------------


def _xlogx(p: np.ndarray) -> np.ndarray:
    return np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(0, keepdims=True))
    return e / e.sum(0, keepdims=True)


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits))


def _confidence_of_probabilities(probs: np.ndarray, regions: bool) -> np.ndarray:
    """1 − H/log K over classes, or 1 − max over regions of the binary entropy / log 2."""
    if regions:
        binary = -(_xlogx(probs) + _xlogx(1.0 - probs))
        return 1.0 - binary.max(0) / np.log(2.0)
    return 1.0 - (-_xlogx(probs).sum(0)) / np.log(len(probs))


def _image(
    arr_zyx: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None
) -> sitk.Image:
    img = sitk.GetImageFromArray(arr_zyx.astype(np.float32))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(np.asarray(np.eye(3) if direction is None else direction, dtype=float).ravel().tolist())
    return img


def _zscore_crop(stack: np.ndarray, box: tuple[slice, ...]) -> np.ndarray:
    crop = stack[(slice(None), *box)].astype(np.float64)
    return (crop - crop.mean(axis=(1, 2, 3), keepdims=True)) / crop.std(axis=(1, 2, 3), keepdims=True)


# --- the measures themselves -------------------------------------------------------------------------


def test_softmax_confidence_is_zero_when_undecided_and_one_when_certain_without_overflow() -> None:
    logits = np.zeros((4, 2, 3, 5), np.float32)
    logits[:, 1] = np.array([3e4, -3e4, 0.0, 1.0], np.float32)[:, None, None]  # float32 extremes
    out = softmax_confidence(logits)
    assert out.dtype == np.float32 and out.shape == (2, 3, 5)
    np.testing.assert_allclose(out[0], 0.0, atol=1e-7)
    np.testing.assert_allclose(out[1], 1.0, atol=1e-7)


def test_one_class_is_certain() -> None:
    np.testing.assert_array_equal(softmax_confidence(np.zeros((1, 2, 2, 2), np.float32)), 1.0)


def test_one_sigmoid_region_reads_as_two_softmax_classes() -> None:
    """Region and label models use the same scale: sigmoid(x) is the softmax of the logits (0, x)."""
    x = np.random.default_rng(0).normal(0, 4, (1, 6, 7, 8)).astype(np.float32)
    two_classes = np.concatenate([np.zeros_like(x), x])
    np.testing.assert_allclose(regions_confidence(x), softmax_confidence(two_classes), atol=1e-6)
    np.testing.assert_allclose(
        regions_confidence(x), _confidence_of_probabilities(_sigmoid(x.astype(np.float64)), True), atol=1e-6
    )


def test_regions_take_the_least_certain_region() -> None:
    logits = np.array([40.0, -40.0, 0.0], np.float32).reshape(3, 1, 1, 1) * np.ones((3, 2, 2, 2), np.float32)
    np.testing.assert_allclose(regions_confidence(logits), 0.0, atol=1e-7)
    np.testing.assert_allclose(regions_confidence(logits[:2]), 1.0, atol=1e-7)
    np.testing.assert_allclose(regions_confidence(np.full((2, 1, 1, 1), 1e4, np.float32)), 1.0)


def test_slabs_give_the_values_of_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    logits = np.random.default_rng(1).normal(0, 3, (3, 9, 5, 4)).astype(np.float32)
    whole_softmax, whole_regions = softmax_confidence(logits), regions_confidence(logits)
    monkeypatch.setattr(base, "_SLAB_VOXELS", 50)  # 2 slices of 3×5×4 per slab, the last one short
    np.testing.assert_array_equal(softmax_confidence(logits), whole_softmax)
    np.testing.assert_array_equal(regions_confidence(logits), whole_regions)
    expected = _confidence_of_probabilities(_softmax(logits.astype(np.float64)), False)
    np.testing.assert_allclose(whole_softmax, expected, atol=1e-6)


# --- the SegMamba recipe through segment --------------------------------------------------------------

GRIDS = {
    "permuted_flipped_anisotropic": (np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], float), (0.9, 1.1, 3.0)),
    "oblique_20deg_flipped": (
        np.array([[np.cos(0.35), -np.sin(0.35), 0], [np.sin(0.35), np.cos(0.35), 0], [0, 0, 1]])
        @ np.diag([1, -1, 1]),
        (1.0, 1.5, 2.0),
    ),
}


@pytest.mark.parametrize("grid_name", sorted(GRIDS))
def test_pointwise_confidence_equals_numpy_entropy_on_the_input_grid(grid_name: str) -> None:
    """W·x + b per voxel: softmax entropy by hand on the input array, 1 outside the crop box."""
    rng = np.random.default_rng(7)
    arrs = [np.zeros((18, 21, 19), np.float32) for _ in range(2)]
    box = (slice(3, 15), slice(2, 19), slice(4, 17))
    for a in arrs:
        a[box] = rng.normal(10, 3, size=(12, 17, 13))
    direction, spacing = GRIDS[grid_name]
    images = [_image(a, spacing, (5.0, -7.0, 11.0), direction) for a in arrs]
    weight, bias = rng.normal(size=(3, 2)), rng.normal(size=3)
    card = toy_card(channels=2, labels=2)
    network = PointwiseNet(weight, bias)

    plain = segment(images, card, CPU, network=network)
    result = segment(images, card, WITH_CONFIDENCE, network=network)

    assert plain.confidence is None
    labels = sitk.GetArrayFromImage(result.labelmap)
    np.testing.assert_array_equal(labels, sitk.GetArrayFromImage(plain.labelmap))
    conf = result.confidence
    assert conf is not None and conf.GetPixelID() == sitk.sitkFloat32
    for read in (sitk.Image.GetSize, sitk.Image.GetSpacing, sitk.Image.GetOrigin, sitk.Image.GetDirection):
        assert read(conf) == read(result.labelmap) == read(images[0])
    z = _zscore_crop(np.stack(arrs), box)
    logits = np.tensordot(weight, z, axes=([1], [0])) + bias[:, None, None, None]
    expected = np.ones(arrs[0].shape)
    expected[box] = _confidence_of_probabilities(_softmax(logits), False)
    got = sitk.GetArrayFromImage(conf)
    assert got.min() >= 0.0 and got.max() <= 1.0
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.ptp(got[box]) > 0.5  # the case spans a real range of values


class _FixedConv(torch.nn.Module):
    """A seeded 3×3×3 convolution: not mirror-symmetric, so every mirrored pass gives other logits."""

    def __init__(self, channels: int, classes: int) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = torch.nn.Conv3d(channels, classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_with_tta_the_confidence_is_that_of_the_mean_mirrored_logits() -> None:
    """One window (zero padding changes nothing for a padded conv); LPS grid, no zeros: no crop or reorder."""
    data = np.random.default_rng(4).normal(10, 3, (2, 12, 14, 10)).astype(np.float32)
    images = [_image(channel) for channel in data]
    card = toy_card(channels=2, labels=2, roi=16)
    network = _FixedConv(2, 3).eval()
    result = segment(images, card, SegmentOptions(device="cpu", confidence=True, tta=True), network=network)

    z = torch.from_numpy(_zscore_crop(data, (slice(None),) * 3).astype(np.float32))[None]
    flips = [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]
    with torch.no_grad():
        mirrored = [torch.flip(network(torch.flip(z, f)), f) if f else network(z) for f in flips]
    mean = torch.stack(mirrored).mean(0)[0].double().numpy()
    got = sitk.GetArrayFromImage(result.confidence)
    np.testing.assert_allclose(got, _confidence_of_probabilities(_softmax(mean), False), atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(result.labelmap), mean.argmax(0))
    single = mirrored[0][0].double().numpy()
    assert np.abs(_confidence_of_probabilities(_softmax(single), False) - got).max() > 0.05


def _linear_discriminant(z: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form LDA (class means, pooled covariance, priors): the weights of a pointwise classifier."""
    x, y = z.reshape(len(z), -1).T, labels.ravel()
    classes = range(int(y.max()) + 1)
    means = np.stack([x[y == k].mean(0) for k in classes])
    pooled = sum(np.cov(x[y == k].T) * (y == k).sum() for k in classes) / len(y)
    weight = means @ np.linalg.inv(pooled)
    bias = -0.5 * np.einsum("ki,ki->k", weight, means) + np.log(np.bincount(y) / len(y))
    return weight, bias


def _label_boundaries(labels: np.ndarray) -> np.ndarray:
    """Voxels with a 6-neighbour of another label."""
    edge = np.zeros(labels.shape, bool)
    for axis in range(3):
        step = np.diff(labels, axis=axis) != 0
        edge[(slice(None),) * axis + (slice(1, None),)] |= step
        edge[(slice(None),) * axis + (slice(None, -1),)] |= step
    return edge


def test_confidence_is_lower_at_label_boundaries_than_inside_on_a_phantom() -> None:
    """A linear classifier of the four BraTS contrasts: partial-volume voxels at boundaries are ambiguous."""
    case = make_phantom((48, 48, 32), seed=1)
    images = [case.images[m] for m in MODALITIES]
    stack = np.stack([sitk.GetArrayFromImage(i) for i in images])
    reference = sitk.GetArrayFromImage(case.seg)
    content = (stack != 0).any(0)
    box = tuple(slice(int(c.min()), int(c.max()) + 1) for c in np.nonzero(content))
    weight, bias = _linear_discriminant(_zscore_crop(stack, box), reference[box])
    result = segment(images, toy_card(channels=4, labels=3, roi=32), WITH_CONFIDENCE,
                     network=PointwiseNet(weight, bias))
    assert (sitk.GetArrayFromImage(result.labelmap) == reference)[content].mean() > 0.95  # a sound classifier
    conf = sitk.GetArrayFromImage(result.confidence)
    edge = _label_boundaries(reference) & content
    inside = np.zeros_like(content)
    for value in range(4):
        inside |= ndimage.binary_erosion(reference == value, iterations=2)
    inside &= content
    assert conf[edge].mean() < conf[inside].mean() - 0.03
    assert (conf[edge] < 0.9).mean() > 10 * (conf[inside] < 0.9).mean()


# --- the nnU-Net recipe: nnU-Net's probability export -------------------------------------------------


@pytest.fixture(scope="module")
def cases():
    """The nnunetv2 reference cases of fixtures_nnunet/make_reference.py (as test_nnunet_reference uses)."""
    pytest.importorskip("nibabel", reason="the reference volumes are nibabel's test data")
    path = NNUNET_FIXTURES / "make_reference.py"
    spec = importlib.util.spec_from_file_location("nnunet_reference_cases", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    module.REF = np.load(NNUNET_FIXTURES / "reference.npz")
    return module


def _label_values(cases, case: str) -> tuple[int, ...]:
    return (0, 1, 2, 3) if cases.CASES[case].get("regions") else tuple(range(cases.num_outputs(case)))


def _nnunet_probability_confidence(cases, case: str, logits: np.ndarray) -> np.ndarray:
    """nnU-Net's export with probabilities, then the measure: resample the logits back, softmax or sigmoid,
    revert cropping (background probability 1 / regions 0 outside the box), transpose back."""
    data, spacing = cases.case_input(case)
    settings = settings_from_plans(cases.plans_for(case), cases.dataset_for(case), "3d_fullres")
    _, geometry = preprocess_nnunet(data, spacing, settings)
    resampled = resample_to_shape(
        logits, geometry.cropped_shape, settings.spacing, geometry.spacing, settings.probabilities_resampling
    ).astype(np.float64)
    probs = _sigmoid(resampled) if settings.regions else _softmax(resampled)
    full = np.zeros((len(probs), *geometry.box.full_shape))
    if not settings.regions:
        full[0] = 1.0
    full[(slice(None), *geometry.box.slices)] = probs
    full = np.transpose(full, (0, *(a + 1 for a in settings.transpose_backward)))
    return _confidence_of_probabilities(full, settings.regions)


@pytest.mark.parametrize("case", ["anat_ct", "moved_sepz", "moved_forced", "ex4d_transposed", "anat_rgb"])
def test_nnunet_restore_confidence_is_that_of_the_exported_probabilities(cases, case: str) -> None:
    """Every export geometry of the reference cases, the sigmoid-region one (moved_sepz) included."""
    data, spacing = cases.case_input(case)
    settings = settings_from_plans(cases.plans_for(case), cases.dataset_for(case), "3d_fullres")
    _, geometry = preprocess_nnunet(data, spacing, settings)
    logits = cases.synthetic_logits(cases.REF[f"{case}__data"].shape[1:], cases.num_outputs(case))
    values = _label_values(cases, case)
    restored = nnunet_restore(logits, geometry, settings, values, confidence=True)
    np.testing.assert_array_equal(restored.labels, cases.REF[f"{case}__export"])
    np.testing.assert_array_equal(restored.labels, nnunet_export(logits, geometry, settings, values))
    assert restored.confidence is not None and restored.confidence.dtype == np.float32
    assert restored.confidence.shape == restored.labels.shape == data.shape[1:]
    expected = _nnunet_probability_confidence(cases, case, logits)
    np.testing.assert_allclose(restored.confidence, expected, atol=1e-5)
    outside = np.ones(geometry.box.full_shape, bool)
    outside[geometry.box.slices] = False
    outside = np.transpose(outside, settings.transpose_backward)
    np.testing.assert_array_equal(restored.confidence[outside], 1.0)
    assert nnunet_restore(logits, geometry, settings, values, confidence=False).confidence is None


def test_nnunet_region_confidence_on_a_cropped_transposed_grid() -> None:
    """Region model by hand: inside the crop the worst region's entropy, outside certain background."""
    data = np.zeros((1, 6, 7, 8), dtype=np.float32)
    data[0, 1:5, 2:6, 3:7] = np.arange(64, dtype=np.float32).reshape(4, 4, 4) + 1
    settings = NnunetSettings(
        transpose_forward=(2, 0, 1),
        spacing=(1.0, 1.0, 1.0),
        channels=(NnunetChannel("NoNormalization"),),
        regions=True,
    )
    out, geometry = preprocess_nnunet(data, (1.0, 1.0, 1.0), settings)
    logits = np.stack([(out[0] - 20.0) / 4.0, (out[0] - 40.0) / 8.0])  # two nested regions
    restored = nnunet_restore(logits, geometry, settings, (0, 1, 2), confidence=True)
    inside = data[0, 1:5, 2:6, 3:7].astype(np.float64)
    expected = np.ones(data.shape[1:])
    probs = _sigmoid(np.stack([(inside - 20.0) / 4.0, (inside - 40.0) / 8.0]))
    expected[1:5, 2:6, 3:7] = _confidence_of_probabilities(probs, True)
    np.testing.assert_allclose(restored.confidence, expected, atol=1e-6)
    np.testing.assert_array_equal(restored.labels, np.where(data[0] > 40, 2, np.where(data[0] > 20, 1, 0)))


def _check_on_file_grid(image: sitk.Image, path: Path) -> None:
    source = sitk.ReadImage(str(path))
    assert image.GetSize() == source.GetSize() and image.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_allclose(image.GetDirection(), source.GetDirection(), atol=1e-7)
    np.testing.assert_allclose(image.GetOrigin(), source.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(image.GetSpacing(), source.GetSpacing(), atol=1e-6)


def test_nnunet_segment_with_mirroring_matches_nnunet_predictor_logits(cases, tmp_path: Path) -> None:
    """Real file, 2 folds, mirroring, separate-z export: confidence from nnunetv2's own logits."""
    case = "e2e_moved"
    card = nnunet_result_card(cases, case, tmp_path)
    path = cases.nibabel_data(cases.CASES[case]["input"])
    options = SegmentOptions(device="cpu", tta=True, sw_batch_size=8, confidence=True)
    result = segment([path], card, options, network=FoldEnsemble(cases.toy_folds(case)))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(result.labelmap), cases.REF[f"{case}__labels32"])
    _check_on_file_grid(result.confidence, path)
    expected = _nnunet_probability_confidence(cases, case, cases.REF[f"{case}__logits32"])
    np.testing.assert_allclose(sitk.GetArrayFromImage(result.confidence), expected, atol=1e-4)


def test_nnunet_sigmoid_region_model_through_segment(cases, tmp_path: Path) -> None:
    """A region card end to end: the worst region's binary entropy, on the file's grid."""
    case = "moved_sepz"
    card = nnunet_result_card(cases, case, tmp_path)
    assert card.inference.output == "sigmoid_regions"
    path = cases.nibabel_data(cases.CASES[case]["input"])
    network = FoldEnsemble(cases.toy_folds(case))
    plain = segment([path], card, CPU, network=network)
    result = segment([path], card, WITH_CONFIDENCE, network=network)
    labels = sitk.GetArrayFromImage(result.labelmap)
    np.testing.assert_array_equal(labels, sitk.GetArrayFromImage(plain.labelmap))
    _check_on_file_grid(result.confidence, path)

    data, spacing = cases.case_input(case)
    settings = settings_from_plans(cases.plans_for(case), cases.dataset_for(case), "3d_fullres")
    net_input, _ = preprocess_nnunet(data, spacing, settings)
    windows = window_settings(card, CPU)
    logits = predict_logits(network, torch.from_numpy(net_input)[None], windows, torch.device("cpu"))
    conf = sitk.GetArrayFromImage(result.confidence)
    expected = _nnunet_probability_confidence(cases, case, logits[0].numpy())
    np.testing.assert_allclose(conf, expected, atol=1e-5)
    assert conf.min() >= 0.0 and conf.max() <= 1.0 and len(np.unique(labels)) > 1


# ---------------------------------------------------------------- front ends: the command line and the worker


def test_predict_writes_the_confidence_map_the_pipeline_computes(tmp_path: Path, capsys) -> None:
    """``predict --confidence``: the same values as segment() in process, float32 on the input grid."""
    from SegMambaSlicerLib.cli import main
    from SegMambaSlicerLib.evaluation.phantom import write_brats_case
    from SegMambaSlicerLib.models.cards import load_card
    from toy_models import write_tiny_brats_card

    card_path = write_tiny_brats_card(tmp_path)
    case = write_brats_case(make_phantom(shape=(40, 36, 24), seed=3), tmp_path / "in", "Case")
    inputs = [str(case[key]) for key in MODALITIES]
    out = tmp_path / "out"
    argv = ["predict", "-m", str(card_path), "-i", *inputs, "-o", str(out / "seg.nii.gz"), "--device", "cpu",
            "--quiet", "--confidence", str(out / "confidence.nii.gz")]
    assert main(argv) == 0
    assert f"confidence: {out / 'confidence.nii.gz'}" in capsys.readouterr().out
    written = sitk.ReadImage(str(out / "confidence.nii.gz"))
    direct = segment(inputs, load_card(card_path), SegmentOptions(device="cpu", confidence=True)).confidence
    assert written.GetPixelID() == sitk.sitkFloat32 and written.GetSize() == (40, 36, 24)
    assert written.GetOrigin() == sitk.ReadImage(inputs[0]).GetOrigin()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(direct))
    values = sitk.GetArrayFromImage(written)
    assert values.min() >= 0.0 and values.max() <= 1.0 and values.min() < 1.0
    argv[-1] = inputs[0]  # a confidence map may not replace an input either
    assert main(argv) == 1 and "would destroy the input" in capsys.readouterr().err

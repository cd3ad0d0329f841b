"""Reference outputs of the nnunetv2 package for our nnU-Net preprocessing, tiling and export.

Run once, in a scratch environment that has nnunetv2 (it is a test-only dependency and pulls
packages we do not want in the project's venv), from the repository root::

    python Testing/fixtures_nnunet/make_reference.py

It writes ``reference.npz`` beside this file. The tests import the case definitions and helpers
below (this module does not import nnunetv2 at import time) and compare our implementation with
the stored results, so they need neither nnunetv2 nor this script to run.

Inputs are real NIfTI volumes shipped with nibabel (``nibabel/tests/data``): a 2 mm isotropic
anatomical image with a flipped axis, a 4×4×8 mm anisotropic volume with zero background, and both
frames of an oblique 4-D image, read as nnU-Net's SimpleITKIO reads them.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
REFERENCE = HERE / "reference.npz"
TRAINER = "nnUNetTrainerMambaClinix"
CT_INTENSITY = {
    "mean": 5000.0,
    "std": 3000.0,
    "percentile_00_5": -200.0,
    "percentile_99_5": 20000.0,
    "median": 4000.0,
    "min": -610.0,
    "max": 30393.0,
}


def nibabel_data(name: str) -> Path:
    """A test file shipped with nibabel."""
    import nibabel

    return Path(nibabel.__file__).parent / "tests" / "data" / name


def read_volume(name: str, frame: int | None = None) -> tuple[np.ndarray, tuple[float, float, float]]:
    """(z, y, x) float32 array and (z, y, x) spacing, as nnU-Net's SimpleITKIO returns them."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(nibabel_data(name)))
    if frame is not None:
        image = image[:, :, :, frame]
    spacing = tuple(float(s) for s in image.GetSpacing()[::-1])
    return sitk.GetArrayFromImage(image).astype(np.float32), spacing  # type: ignore[return-value]


def case_input(case: str) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The (C, z, y, x) input and spacing of a preprocessing case."""
    source = CASES[case]["input"]
    if source == "anat_rgb":
        anat, spacing = read_volume("anatomical.nii")
        return np.stack([anat, np.round(np.clip(anat / 120.0, 0, 255))]), spacing
    if source == "example4d":
        frames = [read_volume("example4d.nii.gz", t) for t in (0, 1)]
        return np.stack([f[0] for f in frames]), frames[0][1]
    data, spacing = read_volume(source)
    return data[None], spacing


def plans_for(case: str) -> dict[str, Any]:
    """A complete nnU-Net v2 plans.json for the case (one 3d_fullres configuration)."""
    spec = CASES[case]
    n = len(spec["schemes"])
    transpose = spec.get("transpose", [0, 1, 2])
    resampling = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    probabilities = {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None}
    return {
        "dataset_name": f"Dataset990_{case}",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": spec["spacing"],
        "original_median_shape_after_transp": [32, 32, 32],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": transpose,
        "transpose_backward": [int(i) for i in np.argsort(transpose)],
        "configurations": {
            "3d_fullres": {
                "data_identifier": "nnUNetPlans_3d_fullres",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": spec.get("patch", [16, 16, 16]),
                "median_image_size_in_voxels": [32, 32, 32],
                "spacing": spec["spacing"],
                "normalization_schemes": spec["schemes"],
                "use_mask_for_norm": spec.get("use_mask", [False] * n),
                "UNet_class_name": "PlainConvUNet",
                "UNet_base_num_features": 8,
                "n_conv_per_stage_encoder": [2, 2],
                "n_conv_per_stage_decoder": [2],
                "num_pool_per_axis": [1, 1, 1],
                "pool_op_kernel_sizes": [[1, 1, 1], [2, 2, 2]],
                "conv_kernel_sizes": [[3, 3, 3], [3, 3, 3]],
                "unet_max_num_features": 16,
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": {**resampling, **spec.get("data_kwargs", {})},
                "resampling_fn_seg_kwargs": {
                    "is_seg": True,
                    "order": 1,
                    "order_z": 0,
                    "force_separate_z": None,
                },
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {**probabilities, **spec.get("prob_kwargs", {})},
                "batch_dice": False,
            }
        },
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {str(c): dict(CT_INTENSITY) for c in range(n)},
    }


def dataset_for(case: str) -> dict[str, Any]:
    """dataset.json: softmax labels, or BraTS-like nested regions painted 1, 2, 3."""
    spec = CASES[case]
    names = {str(c): ("CT" if s == "CTNormalization" else f"MR{c}") for c, s in enumerate(spec["schemes"])}
    if spec.get("regions"):
        labels: dict[str, Any] = {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": [3]}
        extra: dict[str, Any] = {"regions_class_order": [1, 2, 3]}
    else:
        labels = {"background": 0, **{f"organ_{k}": k for k in range(1, spec.get("classes", 3))}}
        extra = {}
    return {
        "name": case,
        "channel_names": names,
        "labels": labels,
        "numTraining": 1,
        "file_ending": ".nii.gz",
        **extra,
    }


def num_outputs(case: str) -> int:
    return 3 if CASES[case].get("regions") else CASES[case].get("classes", 3)


#: Preprocessing / export cases. ``spacing`` is the target spacing in transposed axis order.
CASES: dict[str, dict[str, Any]] = {
    # isotropic upsampling and downsampling, CT clipping with the plans' foreground statistics
    "anat_ct": {"input": "anatomical.nii", "schemes": ["CTNormalization"], "spacing": [3.0, 2.5, 1.7]},
    # 8 mm slices to 10 mm: anisotropic target → in-plane order 3, across slices order 0; masked z-score;
    # sigmoid regions on export (separate z again, probabilities order 1)
    "moved_sepz": {
        "input": "resampled_anat_moved.nii",
        "schemes": ["ZScoreNormalization"],
        "use_mask": [True],
        "spacing": [10.0, 2.0, 2.0],
        "regions": True,
    },
    # forced separate z with order_z 1, unmasked z-score; export with separate z forced off
    "moved_forced": {
        "input": "resampled_anat_moved.nii",
        "schemes": ["ZScoreNormalization"],
        "spacing": [5.0, 3.0, 3.0],
        "classes": 2,
        "data_kwargs": {"order": 1, "order_z": 1, "force_separate_z": True},
        "prob_kwargs": {"force_separate_z": False},
    },
    # oblique 4-D frames as two channels, transpose_forward (x, z, y), masked z-score and rescale-to-[0, 1]
    "ex4d_transposed": {
        "input": "example4d",
        "schemes": ["ZScoreNormalization", "RescaleTo01Normalization"],
        "use_mask": [True, False],
        "transpose": [2, 0, 1],
        "spacing": [7.0, 2.2, 6.0],
    },
    # no normalisation and RGB-to-[0, 1], transpose (y, x, z), 2× downsampling
    "anat_rgb": {
        "input": "anat_rgb",
        "schemes": ["NoNormalization", "RGBTo01Normalization"],
        "transpose": [1, 2, 0],
        "spacing": [4.0, 4.0, 4.0],
        "classes": 4,
    },
    # end to end through nnU-Net's predictor: padding (patch z 4 > 2 slices), 2 folds, mirroring
    "e2e_moved": {
        "input": "resampled_anat_moved.nii",
        "schemes": ["ZScoreNormalization"],
        "use_mask": [True],
        "spacing": [10.0, 2.0, 2.0],
        "patch": [4, 16, 16],
        "mirror": [0, 1, 2],
    },
    # end to end: transposed CT, odd patch, 2 folds, no mirroring
    "e2e_anat": {
        "input": "anatomical.nii",
        "schemes": ["CTNormalization"],
        "transpose": [2, 0, 1],
        "spacing": [2.6, 3.0, 2.2],
        "patch": [16, 8, 12],
        "mirror": None,
    },
}
PREPROCESSING_CASES = ("anat_ct", "moved_sepz", "moved_forced", "ex4d_transposed", "anat_rgb")
E2E_CASES = ("e2e_moved", "e2e_anat")
#: (image size, tile, step fraction) triples for nnU-Net's window starts.
STEP_CASES = (
    (128, 128, 0.5),
    (110, 64, 0.5),
    (155, 128, 0.5),
    (240, 128, 0.5),
    (37, 16, 0.5),
    (97, 24, 0.3),
    (50, 7, 0.5),
    (301, 96, 1.0),
)
GAUSSIAN_TILES = ((16, 16, 16), (4, 16, 16), (16, 8, 12), (20, 24, 28))


def synthetic_logits(shape: tuple[int, ...], classes: int) -> np.ndarray:
    """Smooth, non-separable float32 logits on the preprocessed grid (same on every machine)."""
    grids = np.meshgrid(*[np.linspace(-1.0, 1.0, n) for n in shape], indexing="ij")
    out = []
    for k in range(classes):
        phase = 0.7 * k
        value = (
            np.sin(3.1 * grids[0] + 1.7 * k)
            + np.cos(2.3 * grids[1] - phase) * np.sin(1.9 * grids[2] + phase)
            + 0.4 * k * grids[2]
            - 0.3
        )
        out.append(value)
    return np.stack(out).astype(np.float32)


class ToyNet(nn.Module):
    """A small conv net whose outputs depend on window position (zero padding) and flips."""

    def __init__(self, channels: int, classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(channels, 6, 3, padding=1)
        self.conv2 = nn.Conv3d(6, classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.nn.functional.leaky_relu(self.conv1(x), 0.01))


def toy_state_dict(channels: int, classes: int, seed: int) -> dict[str, torch.Tensor]:
    """Deterministic fold weights for :class:`ToyNet`."""
    gen = torch.Generator().manual_seed(seed)
    net = ToyNet(channels, classes)
    return {
        k: torch.randn(v.shape, generator=gen) * (0.5 if k.endswith("weight") else 0.2)
        for k, v in net.state_dict().items()
    }


def toy_folds(case: str) -> list[ToyNet]:
    """The two fold networks of an end-to-end case."""
    channels, classes = len(CASES[case]["schemes"]), num_outputs(case)
    nets = []
    for seed in (11, 12):
        net = ToyNet(channels, classes)
        net.load_state_dict(toy_state_dict(channels, classes, seed))
        nets.append(net.eval())
    return nets


def _managers(case: str):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(plans_for(case))
    return plans_manager, plans_manager.get_configuration("3d_fullres")


def _preprocess(case: str, out: dict[str, np.ndarray]) -> None:
    from nnunetv2.inference.export_prediction import (
        convert_predicted_logits_to_segmentation_with_correct_shape,
    )
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

    data, spacing = case_input(case)
    plans_manager, config = _managers(case)
    properties: dict[str, Any] = {"spacing": list(spacing)}
    pre = DefaultPreprocessor(verbose=False)
    result = pre.run_case_npy(data, None, properties, plans_manager, config, dataset_for(case))[0]
    out[f"{case}__data"] = result.astype(np.float32)
    out[f"{case}__bbox"] = np.asarray(properties["bbox_used_for_cropping"], dtype=np.int64)
    logits = synthetic_logits(result.shape[1:], num_outputs(case))
    label_manager = plans_manager.get_label_manager(dataset_for(case))
    seg = convert_predicted_logits_to_segmentation_with_correct_shape(
        torch.from_numpy(logits), plans_manager, config, label_manager, copy.deepcopy(properties)
    )
    out[f"{case}__export"] = np.asarray(seg, dtype=np.uint8)


def _predictor(case: str):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    mirror = CASES[case]["mirror"]
    kwargs = {
        "tile_step_size": 0.5,
        "use_gaussian": True,
        "use_mirroring": mirror is not None,
        "device": torch.device("cpu"),
        "verbose": False,
        "allow_tqdm": False,
    }
    params = inspect.signature(nnUNetPredictor).parameters
    kwargs[
        "perform_everything_on_device"
        if "perform_everything_on_device" in params
        else "perform_everything_on_gpu"
    ] = False
    predictor = nnUNetPredictor(**kwargs)
    plans_manager, config = _managers(case)
    folds = toy_folds(case)
    predictor.manual_initialization(
        ToyNet(len(CASES[case]["schemes"]), num_outputs(case)),
        plans_manager,
        config,
        [f.state_dict() for f in folds],
        dataset_for(case),
        TRAINER,
        tuple(mirror) if mirror else None,
    )
    return predictor


@contextlib.contextmanager
def _float32_buffers():
    """nnU-Net's predictor with float32 instead of float16 accumulation buffers (everything else as is).

    Its half-precision buffers round the blended logits by up to ~1 %; with float32 buffers its
    output is the exact target for our float32 implementation.
    """
    import nnunetv2.inference.predict_from_raw_data as predictor_module

    proxy = types.SimpleNamespace(**{k: getattr(torch, k) for k in dir(torch) if not k.startswith("__")})
    proxy.half = torch.float32
    predictor_module.torch = proxy
    try:
        yield
    finally:
        predictor_module.torch = torch


def _end_to_end(case: str, out: dict[str, np.ndarray]) -> None:
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

    data, properties = SimpleITKIO().read_images([str(nibabel_data(CASES[case]["input"]))])
    out[f"{case}__labels"] = np.asarray(
        _predictor(case).predict_single_npy_array(data, copy.deepcopy(properties)), dtype=np.uint8
    )
    plans_manager, config = _managers(case)
    pre = DefaultPreprocessor(verbose=False).run_case_npy(
        data, None, copy.deepcopy(properties), plans_manager, config, dataset_for(case)
    )[0]
    out[f"{case}__input"] = pre.astype(np.float32)
    with _float32_buffers():
        predictor = _predictor(case)
        out[f"{case}__labels32"] = np.asarray(
            predictor.predict_single_npy_array(data, copy.deepcopy(properties)), dtype=np.uint8
        )
        logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(out[f"{case}__input"]))
    out[f"{case}__logits32"] = logits.numpy().astype(np.float32)


def main() -> None:
    from importlib.metadata import version

    import nnunetv2
    from nnunetv2.inference.sliding_window_prediction import (
        compute_gaussian,
        compute_steps_for_sliding_window,
    )

    torch.set_num_threads(2)
    out: dict[str, np.ndarray] = {"nnunetv2_version": np.asarray(version("nnunetv2"))}
    for case in PREPROCESSING_CASES:
        _preprocess(case, out)
    for case in E2E_CASES:
        _end_to_end(case, out)
    for i, (size, tile, step) in enumerate(STEP_CASES):
        out[f"steps__{i}"] = np.asarray(compute_steps_for_sliding_window((size,), (tile,), step)[0])
    for tile in GAUSSIAN_TILES:
        gaussian = compute_gaussian(
            tile, sigma_scale=1.0 / 8, value_scaling_factor=10, device=torch.device("cpu")
        )
        out["gaussian__" + "x".join(map(str, tile))] = gaussian.numpy()
    np.savez_compressed(REFERENCE, **out)
    print(f"nnunetv2 {nnunetv2.__file__} -> {REFERENCE} ({REFERENCE.stat().st_size} bytes)")


if __name__ == "__main__":
    main()

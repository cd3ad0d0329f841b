"""nnU-Net result folders as models: recognition, safe checkpoints, cards, MambaClinix end to end, CLI."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from SegMambaSlicerLib.engine.pipeline import SegmentOptions, segment
from SegMambaSlicerLib.errors import CheckpointError
from SegMambaSlicerLib.models.cards import load_card
from SegMambaSlicerLib.models.nnunet import (
    FoldEnsemble,
    NnunetModelError,
    card_for_nnunet_folder,
    find_result_folder,
    load_ensemble,
    model_for_card,
    nnunet_card_data,
    read_nnunet_checkpoint,
    settings_from_plans,
)
from SegMambaSlicerLib.networks.mambaclinix import mambaclinix_from_plans

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
MODEL_DIR = "nnUNetTrainerMambaClinix__nnUNetPlans__3d_fullres"
CPU = SegmentOptions(device="cpu")


def _fixture_json(name: str) -> dict[str, Any]:
    path = FIXTURES / name
    if not path.is_file():
        pytest.skip(f"shared fixtures not found ({path})")
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def official_weights() -> dict[str, torch.Tensor]:
    """The official-format MambaClinix state dict (582 entries incl. aliases) of fixture mambaclinix_tiny."""
    path = FIXTURES / "mambaclinix_tiny.pt"
    if not path.is_file():
        pytest.skip(f"shared fixtures not found ({path})")
    return torch.load(path, weights_only=True)["state_dict"]


def _fold_weights(weights: dict[str, torch.Tensor], fold: int) -> dict[str, torch.Tensor]:
    """Fold 1 differs from fold 0 in its output layer so that the ensemble mean is visible."""
    out = dict(weights)
    if fold:
        out["decoder.seg_layers.3.bias"] = weights["decoder.seg_layers.3.bias"] + torch.tensor(
            [0.0, -1.5, 1.0]
        )
    return out


def nnunet_checkpoint(
    weights: dict[str, torch.Tensor],
    plans: dict,
    dataset: dict,
    fold: int,
    trainer: str = "nnUNetTrainerMambaClinix",
) -> dict[str, Any]:
    """A checkpoint shaped like nnU-Net's: numpy floats in the log, a torch.device in init_args."""
    return {
        "network_weights": weights,
        "optimizer_state": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
        "grad_scaler_state": None,
        "logging": {
            "mean_fg_dice": [np.float64(0.41), np.float64(0.52)],
            "ema_fg_dice": [np.float32(0.5)],
            "epoch_start_timestamps": [1.7e9, 1.7e9 + 60],
            "dice_per_class_or_region": [[np.float64(0.4)]],
        },
        "_best_ema": np.float64(0.52),
        "current_epoch": 1000,
        "init_args": {
            "plans": plans,
            "configuration": "3d_fullres",
            "fold": fold,
            "dataset_json": dataset,
            "unpack_dataset": True,
            "device": torch.device("cpu"),
        },
        "trainer_name": trainer,
        "inference_allowed_mirroring_axes": (0, 1, 2),
    }


def write_result_folder(
    root: Path,
    weights: dict[str, torch.Tensor],
    folds=(0, 1),
    checkpoint="checkpoint_final.pth",
    trainer: str = "nnUNetTrainerMambaClinix",
    dataset: dict | None = None,
) -> Path:
    plans = _fixture_json("mambaclinix_tiny_plans.json")
    dataset = dataset or _fixture_json("mambaclinix_small_dataset.json")
    folder = root / "Dataset999_MambaClinixFixture" / MODEL_DIR
    for fold in folds:
        (folder / f"fold_{fold}").mkdir(parents=True)
        state = nnunet_checkpoint(_fold_weights(weights, fold), plans, dataset, fold, trainer)
        torch.save(state, folder / f"fold_{fold}" / checkpoint)
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(dataset))
    return folder


def test_result_folder_becomes_a_card(tmp_path: Path, official_weights) -> None:
    folder = write_result_folder(tmp_path, official_weights)
    card = card_for_nnunet_folder(tmp_path / "Dataset999_MambaClinixFixture")  # the dataset folder is enough
    assert card.preprocessing.scheme == "nnunet" and card.architecture == "mambaclinix"
    assert card.weights.file == str(folder)
    assert card.architecture_kwargs == {
        "configuration": "3d_fullres",
        "folds": ["0", "1"],
        "checkpoint": "checkpoint_final.pth",
    }
    assert [(c.key, c.display_name) for c in card.channels] == [("0000", "CT")]
    assert [(lab.value, lab.name) for lab in card.labels] == [(1, "organ_a"), (2, "organ_b")]
    assert len({lab.color for lab in card.labels}) == 2
    assert card.inference.roi_size == (32, 32, 32) and card.inference.mirror_axes == (0, 1, 2)
    assert card.inference.output == "softmax_labels"


def test_card_is_plain_json_that_can_be_saved_and_reloaded(tmp_path: Path, official_weights) -> None:
    folder = write_result_folder(tmp_path, official_weights)
    plans, dataset = (
        _fixture_json("mambaclinix_tiny_plans.json"),
        _fixture_json("mambaclinix_small_dataset.json"),
    )
    card_file = tmp_path / "card.json"
    card_file.write_text(
        json.dumps(nnunet_card_data(plans, dataset, "3d_fullres", folder, ["1"], "checkpoint_final.pth"))
    )
    card = load_card(card_file)
    assert card.preprocessing.scheme == "nnunet" and card.channels[0].synonyms == ("ct",)
    model = model_for_card(card)
    assert (
        model.folder == folder
        and model.folds == ("1",)
        and model.settings.channels[0].scheme == "CTNormalization"
    )


def test_fold_and_checkpoint_selection(tmp_path: Path, official_weights) -> None:
    write_result_folder(tmp_path, official_weights, folds=(0, 1, 3), checkpoint="checkpoint_best.pth")
    card = card_for_nnunet_folder(tmp_path, folds=[3, "1"])
    assert card.architecture_kwargs["folds"] == ["3", "1"]
    assert card.architecture_kwargs["checkpoint"] == "checkpoint_best.pth"  # no checkpoint_final anywhere
    with pytest.raises(NnunetModelError, match="Fold.s. 2 requested but this model has folds: 0, 1, 3"):
        card_for_nnunet_folder(tmp_path, folds=[2])
    with pytest.raises(NnunetModelError, match="checkpoint_final.pth"):
        card_for_nnunet_folder(tmp_path, checkpoint="checkpoint_final.pth")


def test_zip_of_a_result_folder(tmp_path: Path, official_weights) -> None:
    source = write_result_folder(tmp_path / "src", official_weights, folds=(0,))
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in source.parent.rglob("*"):
            zf.write(path, path.relative_to(source.parent.parent))
        zf.writestr("Dataset999_MambaClinixFixture/README.txt", "not extracted")
    card = card_for_nnunet_folder(archive, cache=tmp_path / "cache")
    unpacked = Path(card.weights.file)
    assert unpacked.name == MODEL_DIR and (tmp_path / "cache" / "nnunet") in unpacked.parents
    assert not list(unpacked.parent.rglob("README.txt"))
    assert card_for_nnunet_folder(archive, cache=tmp_path / "cache").weights.file == str(unpacked)  # reused


def test_zip_with_unsafe_names_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../outside/plans.json", "{}")
    with pytest.raises(NnunetModelError, match="unsafe file name"):
        find_result_folder(archive, cache=tmp_path / "cache")
    assert not (tmp_path / "outside").exists()


def test_anything_else_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "weights.pt").write_bytes(b"")
    with pytest.raises(
        NnunetModelError, match="not an nnU-Net result folder: expected dataset.json, plans.json"
    ):
        find_result_folder(tmp_path)
    with pytest.raises(NnunetModelError, match="neither a folder nor a .zip"):
        find_result_folder(tmp_path / "weights.pt")
    (tmp_path / "broken.zip").write_bytes(b"not a zip")
    with pytest.raises(NnunetModelError, match="not a readable .zip"):
        find_result_folder(tmp_path / "broken.zip", cache=tmp_path / "cache")


def test_other_trainers_are_refused_naming_the_supported_ones(tmp_path: Path, official_weights) -> None:
    write_result_folder(tmp_path, official_weights, folds=(0,), trainer="nnUNetTrainer")
    with pytest.raises(NnunetModelError, match="trained with nnUNetTrainer. .*nnUNetTrainerMambaClinixTRS"):
        card_for_nnunet_folder(tmp_path)


def test_checkpoint_with_numpy_scalars_loads_without_full_unpickling(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint_final.pth"
    torch.save(nnunet_checkpoint({"w": torch.ones(2)}, {}, {}, 0), path)
    checkpoint = read_nnunet_checkpoint(path)
    assert checkpoint["_best_ema"] == np.float64(0.52) and checkpoint["init_args"]["device"] == torch.device(
        "cpu"
    )
    assert torch.equal(checkpoint["network_weights"]["w"], torch.ones(2))


def test_checkpoint_pickled_by_numpy_1_loads(tmp_path: Path) -> None:
    """numpy 1.x pickles scalars as numpy.core.multiarray.scalar; that name is allowed too."""
    path = tmp_path / "new.pth"
    torch.save({"network_weights": {"w": torch.ones(1)}, "_best_ema": np.float64(0.25)}, path)
    old = tmp_path / "old.pth"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(old, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            dst.writestr(info, data)
    assert read_nnunet_checkpoint(old)["_best_ema"] == 0.25


class _Payload:
    """Stands for an arbitrary pickled object; unpickling it would run ``__setstate__``."""

    ran = False

    def __setstate__(self, state: dict) -> None:
        _Payload.ran = True


def test_checkpoint_with_an_arbitrary_class_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": {"w": torch.ones(1)}, "extra": _Payload()}, path)
    with pytest.raises(CheckpointError, match="_Payload.*refused because loading them could run code"):
        read_nnunet_checkpoint(path)
    assert not _Payload.ran


def test_region_dataset_card(tmp_path: Path, official_weights) -> None:
    dataset = {
        "channel_names": {"0": "T1", "1": "FLAIR"},
        "name": "Regions",
        "labels": {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": 3},
        "regions_class_order": [1, 2, 3],
    }
    plans = _fixture_json("mambaclinix_tiny_plans.json")
    folder = tmp_path / MODEL_DIR
    (folder / "fold_0").mkdir(parents=True)
    torch.save(
        nnunet_checkpoint({"w": torch.ones(1)}, plans, dataset, 0), folder / "fold_0" / "checkpoint_final.pth"
    )
    plans["configurations"]["3d_fullres"]["normalization_schemes"] = ["ZScoreNormalization"] * 2
    plans["configurations"]["3d_fullres"]["use_mask_for_norm"] = [True, True]
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(dataset))
    card = card_for_nnunet_folder(folder)
    assert [c.display_name for c in card.channels] == ["T1", "FLAIR"]
    assert [(lab.value, lab.name) for lab in card.labels] == [
        (1, "whole tumor (excluding tumor core, enhancing tumor)"),
        (2, "tumor core (excluding enhancing tumor)"),
        (3, "enhancing tumor"),
    ]
    assert {r.name: r.labels for r in card.regions} == {
        "whole tumor": (1, 2, 3),
        "tumor core": (2, 3),
        "enhancing tumor": (3,),
    }
    assert card.inference.output == "sigmoid_regions"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"normalization_schemes": ["MyNorm"]}, "normalises channel 0 with 'MyNorm'"),
        ({"resampling_fn_data": "resample_torch_fornnunet"}, "only nnU-Net's default"),
        ({"previous_stage": "3d_lowres"}, "cascade"),
        ({"patch_size": [32, 32]}, "not 3-D"),
    ],
)
def test_unsupported_plans_are_named(change: dict, message: str) -> None:
    plans = _fixture_json("mambaclinix_tiny_plans.json")
    plans["configurations"]["3d_fullres"].update(change)
    with pytest.raises(NnunetModelError, match=message):
        settings_from_plans(plans, _fixture_json("mambaclinix_small_dataset.json"), "3d_fullres")


def _ct_volume() -> sitk.Image:
    """A CT-like volume (HU) whose preprocessed grid fits one 32³ window (spacing 1 mm as the plans)."""
    rng = np.random.default_rng(5)
    z, y, x = np.meshgrid(np.arange(30), np.arange(32), np.arange(28), indexing="ij")
    body = ((z - 15) / 13.0) ** 2 + ((y - 16) / 14.0) ** 2 + ((x - 14) / 12.0) ** 2 < 1
    organ = ((z - 12) / 6.0) ** 2 + ((y - 18) / 5.0) ** 2 + ((x - 10) / 5.0) ** 2 < 1
    hu = np.where(body, 40.0, -1000.0) + np.where(organ, 300.0, 0.0) + rng.normal(0, 30, body.shape)
    image = sitk.GetImageFromArray(hu.astype(np.float32))
    image.SetOrigin((-20.0, 3.5, 100.0))
    image.SetDirection((1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    return image


def _fold_logits(image: sitk.Image, weights: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """By hand: CT normalisation with the plans' statistics, zero-pad to 32³, each fold's logits."""
    plans, dataset = (
        _fixture_json("mambaclinix_tiny_plans.json"),
        _fixture_json("mambaclinix_small_dataset.json"),
    )
    props = plans["foreground_intensity_properties_per_channel"]["0"]
    hu = sitk.GetArrayFromImage(image).astype(np.float64)
    normalised = (np.clip(hu, props["percentile_00_5"], props["percentile_99_5"]) - props["mean"]) / props[
        "std"
    ]
    padded = np.pad(normalised, ((1, 1), (0, 0), (2, 2)))  # 30 → 32 (1 before), 28 → 32 (2 before)
    x = torch.from_numpy(padded.astype(np.float32))[None, None]
    logits = []
    for fold in (0, 1):
        net = mambaclinix_from_plans(plans, dataset).eval()
        net.load_state_dict(_fold_weights(weights, fold), strict=True)
        with torch.no_grad():
            logits.append(net(x)[0, :, 1:-1, :, 2:-2])
    return logits


def test_mambaclinix_folder_segments_with_the_mean_of_two_folds(tmp_path: Path, official_weights) -> None:
    torch.set_num_threads(2)
    folder = write_result_folder(tmp_path, official_weights)
    card = card_for_nnunet_folder(folder)
    network = load_ensemble(model_for_card(card))
    assert isinstance(network, FoldEnsemble) and len(network.folds) == 2
    image = _ct_volume()
    seen: list[float] = []
    result = segment([image], card, CPU, progress=lambda f, m: seen.append(f), network=network)
    labels = sitk.GetArrayFromImage(result.labelmap)
    folds = _fold_logits(image, official_weights)
    np.testing.assert_array_equal(labels, ((folds[0] + folds[1]) / 2).argmax(0).numpy())
    assert set(np.unique(labels)) == {0, 1, 2}
    for alone in folds:  # the mean differs from either fold on its own
        assert (alone.argmax(0).numpy() != labels).any()
    assert result.windows == 1 and seen[-1] == pytest.approx(1.0)
    assert (
        result.labelmap.GetOrigin() == image.GetOrigin()
        and result.labelmap.GetDirection() == image.GetDirection()
    )
    assert set(result.volumes) == {"organ_a", "organ_b"}


def test_cli_predict_with_a_result_folder(tmp_path: Path, official_weights, capsys) -> None:
    """``predict --model <folder>``: the registry hands result folders to card_for_nnunet_folder."""
    from SegMambaSlicerLib import cli

    folder = write_result_folder(tmp_path / "results", official_weights, folds=(0,))
    image_path = tmp_path / "case_0000.nii.gz"
    sitk.WriteImage(_ct_volume(), str(image_path))
    out = tmp_path / "labels.nii.gz"
    assert (
        cli.main(
            ["predict", "-m", str(folder), "-i", str(image_path), "-o", str(out), "--device", "cpu", "-q"]
        )
        == 0
    )
    written = sitk.ReadImage(str(out))
    assert written.GetSize() == (28, 32, 30)
    assert set(np.unique(sitk.GetArrayFromImage(written))) <= {0, 1, 2}
    assert "label map" in capsys.readouterr().out


def test_weights_override_and_folds_option(tmp_path: Path, official_weights) -> None:
    folder = write_result_folder(tmp_path / "a", official_weights)
    card = card_for_nnunet_folder(folder)
    other = write_result_folder(tmp_path / "b", official_weights, folds=(4,))
    with pytest.raises(NnunetModelError, match="Fold.s. 0, 1 requested but this model has folds: 4"):
        model_for_card(card, weights=other)
    model = model_for_card(card, weights=other, folds=[4])
    assert model.folder == other and model.folds == ("4",) and model.checkpoint == "checkpoint_final.pth"
    assert model_for_card(card, folds=["1"]).folds == ("1",)


def test_state_dict_mismatch_names_the_checkpoint(tmp_path: Path, official_weights) -> None:
    broken = {k: v for k, v in official_weights.items() if not k.startswith("decoder.seg_layers")}
    folder = write_result_folder(tmp_path, broken, folds=(0,))
    with pytest.raises(CheckpointError, match=r"fold_0/checkpoint_final.pth does not fit.*missing keys"):
        load_ensemble(model_for_card(card_for_nnunet_folder(folder)))

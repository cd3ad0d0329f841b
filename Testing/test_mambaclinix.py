"""MambaClinix against the official state-dict listings and the official-code logit fixtures."""

from __future__ import annotations

import copy
import json
import sys
import time

import pytest
import torch
from SegMambaSlicerLib.errors import InputImageError, ModelCardError
from SegMambaSlicerLib.networks import build_network
from SegMambaSlicerLib.networks.mambaclinix import (
    HGCNBlock,
    MambaClinix,
    MambaLayer,
    PlansError,
    mambaclinix_from_plans,
    mambaclinix_stage_types,
    num_segmentation_heads,
    resolve_configuration,
)
from shared_data import FIXTURES, RECIPE_SUM_RTOL, read_listing


def _plans(kernels, strides, base=32, cap=320, encoder=None, decoder=None) -> dict:
    """A minimal nnU-Net v2.1 plans dict with one 3d_fullres configuration."""
    n = len(kernels)
    return {
        "configurations": {
            "3d_fullres": {
                "conv_kernel_sizes": kernels,
                "pool_op_kernel_sizes": strides,
                "UNet_base_num_features": base,
                "unet_max_num_features": cap,
                "n_conv_per_stage_encoder": encoder if encoder is not None else [2] * n,
                "n_conv_per_stage_decoder": decoder if decoder is not None else [2] * (n - 1),
            }
        }
    }


DATASET_14 = {"channel_names": {"0": "CT"}, "labels": {f"organ{i}": i for i in range(14)}}
EXAMPLE6 = _plans([[3, 3, 3]] * 6, [[1, 1, 1]] + [[2, 2, 2]] * 5)
EXAMPLE5 = _plans([[1, 3, 3]] + [[3, 3, 3]] * 4, [[1, 1, 1], [1, 2, 2]] + [[2, 2, 2]] * 3)


@pytest.mark.parametrize(
    ("plans", "listing", "n_unique", "n_params"),
    [
        (EXAMPLE5, "mambaclinix_example5.txt", 245, 28_275_914),
        (EXAMPLE6, "mambaclinix_example6.txt", 289, 48_883_849),
    ],
)
def test_state_dict_matches_official_listing(plans, listing, n_unique, n_params):
    with torch.device("meta"):
        model = mambaclinix_from_plans(plans, DATASET_14, deep_supervision=True)
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert ours == read_listing(listing)
    assert len({id(p) for p in model.state_dict(keep_vars=True).values()}) == n_unique
    assert sum(p.numel() for p in model.parameters()) == n_params


@pytest.mark.parametrize(
    ("n_stages", "types", "conn_pos"),
    [
        (4, [2, 2, 1, 1], 1),
        (5, [2, 2, 2, 1, 1], 2),
        (6, [2, 2, 2, 1, 1, 1], 2),
        (7, [2, 2, 2, 2, 1, 1, 1], 3),
    ],
)
def test_stage_type_rule(n_stages, types, conn_pos):
    assert mambaclinix_stage_types([2] * n_stages) == types
    features = [8 * 2**s for s in range(n_stages)]
    strides = [[1, 1, 1]] + [[2, 2, 2]] * (n_stages - 1)
    with torch.device("meta"):
        model = MambaClinix(1, features, [[3, 3, 3]] * n_stages, strides, types, num_classes=2)
    kinds = [HGCNBlock if t == 2 else MambaLayer for t in types]
    assert [type(m) for m in model.encoder.encoder_layers] == kinds
    assert model.encoder.conn_pos == conn_pos


def test_plans_rewritten_by_training_build_the_same_network_and_ours_are_not_mutated():
    """Upstream mutates the plans list in place, so saved plans may hold [2, 2, 2, 1, 1] already."""
    rewritten = copy.deepcopy(EXAMPLE5)
    rewritten["configurations"]["3d_fullres"]["n_conv_per_stage_encoder"] = [2, 2, 2, 1, 1]
    original = copy.deepcopy(EXAMPLE5)
    with torch.device("meta"):
        a = mambaclinix_from_plans(original, DATASET_14)
        b = mambaclinix_from_plans(rewritten, DATASET_14)
    assert original == EXAMPLE5
    assert [(k, v.shape) for k, v in a.state_dict().items()] == [
        (k, v.shape) for k, v in b.state_dict().items()
    ]


def test_value_based_stage_types_follow_the_plans_values():
    """A shallow stage whose plans value is 1 becomes a Mamba stage; conn_pos is the last value-2 stage."""
    plans = _plans([[3, 3, 3]] * 5, [[1, 1, 1]] + [[2, 2, 2]] * 4, base=8, cap=64, encoder=[2, 1, 2, 2, 2])
    with torch.device("meta"):
        model = mambaclinix_from_plans(plans, DATASET_14)
    kinds = [type(m) for m in model.encoder.encoder_layers]
    assert kinds == [HGCNBlock, MambaLayer, HGCNBlock, MambaLayer, MambaLayer]
    assert model.encoder.conn_pos == 2


@pytest.mark.parametrize(
    ("labels", "heads"),
    [
        ({"background": 0, "a": 1, "b": 2}, 3),
        ({"background": 0, "a": 1, "b": 2, "ignore": 3}, 3),
        ({"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": 3}, 3),
        ({"background": 0, "a": [1], "b": 2}, 3),
    ],
)
def test_num_segmentation_heads(labels, heads):
    assert num_segmentation_heads({"labels": labels}) == heads


def test_configuration_inheritance():
    plans = copy.deepcopy(EXAMPLE5)
    plans["configurations"]["3d_lowres_x"] = {"inherits_from": "3d_fullres", "UNet_base_num_features": 16}
    config = resolve_configuration(plans, "3d_lowres_x")
    assert config["UNet_base_num_features"] == 16
    assert config["conv_kernel_sizes"] == EXAMPLE5["configurations"]["3d_fullres"]["conv_kernel_sizes"]
    plans["configurations"]["3d_fullres"]["inherits_from"] = "3d_lowres_x"
    with pytest.raises(PlansError, match="circle"):
        resolve_configuration(plans, "3d_lowres_x")


@pytest.mark.parametrize(
    ("plans", "dataset", "match"),
    [
        (
            _plans([[3, 3, 3]] * 5, [[1, 1, 1]] + [[2, 2, 2]] * 4, encoder=[1, 3, 4, 6, 6]),
            DATASET_14,
            "stage 1 has 3",
        ),
        ({"configurations": {"3d_fullres": {"conv_kernel_sizes": [[3, 3, 3]]}}}, DATASET_14, "lacks"),
        (EXAMPLE5, {"channel_names": {"0": "CT"}}, "labels"),
        (_plans([[3, 3, 3]] * 5, [[1, 1, 1]] + [[2, 2, 2]] * 4, decoder=[2, 2]), DATASET_14, "4 entries"),
        (_plans([[3, 3, 3]] * 5, [[1, 1, 1]] + [[2, 2, 2]] * 4, base=10), DATASET_14, "multiple of 4"),
        (_plans([[3, 3]] * 5, [[1, 1]] + [[2, 2]] * 4), DATASET_14, "3-D only"),
    ],
)
def test_unbuildable_plans_raise_plans_error(plans, dataset, match):
    with pytest.raises(PlansError, match=match), torch.device("meta"):
        mambaclinix_from_plans(plans, dataset)
    assert issubclass(PlansError, ModelCardError)


def test_input_channels_default_to_dataset_channels_and_registry_entry():
    dataset = {"channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "lesion": 1}}
    with torch.device("meta"):
        model = build_network("mambaclinix", plans=EXAMPLE5, dataset_json=dataset)
        forced = mambaclinix_from_plans(EXAMPLE5, dataset, num_input_channels=1)
    assert model.encoder.stem.convs[0].conv.weight.shape[:2] == (32, 2)
    assert forced.encoder.stem.convs[0].conv.weight.shape[:2] == (32, 1)
    assert model.decoder.seg_layers[-1].weight.shape[0] == 2


def _fixture_weights():
    if not FIXTURES.is_dir():
        pytest.skip(f"reference fixtures not found at {FIXTURES}")
    sys.path.insert(0, str(FIXTURES))
    import fixture_weights

    return fixture_weights


def _check_fixture(fx: dict, model: torch.nn.Module, weights: dict) -> tuple[float, float]:
    """Strict load, compare logits and deep-supervision shapes; returns (max |Δ|, forward seconds)."""
    fw = _fixture_weights()
    model.load_state_dict(weights, strict=True)
    model.eval()
    x = fw.fixture_input(fx["input_shape"], seed=fx["input_seed"])
    torch.set_num_threads(2)
    start = time.perf_counter()
    with torch.no_grad():
        y = model(x)
    elapsed = time.perf_counter() - start
    expected = fx["output"].float()
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
    model.decoder.deep_supervision = True
    with torch.no_grad():
        outputs = model(x)
    assert [list(o.shape) for o in outputs] == fx["deep_supervision_output_shapes"]
    assert torch.equal(outputs[0], y)
    return (y - expected).abs().max().item(), elapsed


def test_tiny_fixture_official_state_dict_loads_strictly():
    _fixture_weights()
    fx = torch.load(FIXTURES / "mambaclinix_tiny.pt", weights_only=True)
    plans = json.loads((FIXTURES / fx["config"]["plans_file"]).read_text(encoding="utf-8"))
    dataset = json.loads((FIXTURES / fx["config"]["dataset_json_file"]).read_text(encoding="utf-8"))
    model = mambaclinix_from_plans(plans, dataset)
    assert list(model.state_dict()) == fx["state_dict_keys"] == list(fx["state_dict"])
    assert sum(p.numel() for p in model.parameters()) == fx["n_params"]
    diff, seconds = _check_fixture(fx, model, fx["state_dict"])
    print(f"mambaclinix_tiny: max|Δ| {diff:.2e}, forward {seconds:.2f} s")


def test_small_fixture_recipe_weights():
    fw = _fixture_weights()
    fx = torch.load(FIXTURES / "mambaclinix_small.pt", weights_only=True)
    plans = json.loads((FIXTURES / fx["config"]["plans_file"]).read_text(encoding="utf-8"))
    dataset = json.loads((FIXTURES / fx["config"]["dataset_json_file"]).read_text(encoding="utf-8"))
    model = mambaclinix_from_plans(plans, dataset)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert list(shapes) == fx["state_dict_keys"]
    assert [list(s) for s in shapes.values()] == fx["state_dict_shapes"]
    weights = fw.fixture_state_dict(shapes, seed=fx["weight_seed"])
    sums = torch.tensor([w.double().sum().item() for w in weights.values()], dtype=torch.float64)
    torch.testing.assert_close(
        sums, torch.tensor(fx["state_dict_sum"], dtype=torch.float64), rtol=RECIPE_SUM_RTOL, atol=1e-9
    )
    diff, seconds = _check_fixture(fx, model, weights)
    print(f"mambaclinix_small: max|Δ| {diff:.2e}, forward {seconds:.2f} s")


def test_rejects_input_sizes_not_divisible_by_the_pooling_strides():
    plans = _plans(
        [[1, 3, 3]] + [[3, 3, 3]] * 3, [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]], base=8, cap=32
    )
    model = mambaclinix_from_plans(plans, DATASET_14)
    with pytest.raises(InputImageError, match=r"divisible by \(4, 8, 8\)"):
        model(torch.zeros(1, 1, 4, 8, 12))

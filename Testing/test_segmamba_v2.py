"""SegMamba-V2 against the official state-dict listing and the official-code logit fixtures."""

from __future__ import annotations

import sys
import time

import pytest
import torch
from SegMambaSlicerLib.errors import InputImageError, ModelCardError
from SegMambaSlicerLib.networks import build_network
from SegMambaSlicerLib.networks.segmamba_encoder_decoder import NetworkConfigError
from SegMambaSlicerLib.networks.segmamba_v2 import SegMambaV2
from shared_data import FIXTURES, RECIPE_SUM_RTOL, read_listing


def _fixture_weights():
    if not FIXTURES.is_dir():
        pytest.skip(f"reference fixtures not found at {FIXTURES}")
    sys.path.insert(0, str(FIXTURES))
    import fixture_weights

    return fixture_weights


def _run_fixture(name: str) -> tuple[float, float]:
    """Build the fixture's model with regenerated weights; returns (max |Δ| of the logits, forward seconds)."""
    fw = _fixture_weights()
    fx = torch.load(FIXTURES / f"{name}.pt", weights_only=True)
    cfg = fx["config"]
    model = SegMambaV2(*cfg["constructor_args"], **cfg["constructor_kwargs"]).eval()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert list(shapes) == fx["state_dict_keys"]
    assert [list(s) for s in shapes.values()] == fx["state_dict_shapes"]
    weights = fw.fixture_state_dict(shapes, seed=fx["weight_seed"])
    sums = torch.tensor([w.double().sum().item() for w in weights.values()], dtype=torch.float64)
    torch.testing.assert_close(
        sums, torch.tensor(fx["state_dict_sum"], dtype=torch.float64), rtol=RECIPE_SUM_RTOL, atol=1e-9
    )
    model.load_state_dict(weights, strict=True)
    x = fw.fixture_input(fx["input_shape"], seed=fx["input_seed"])
    torch.set_num_threads(2)
    start = time.perf_counter()
    with torch.no_grad():
        y = model(x)
    elapsed = time.perf_counter() - start
    expected = fx["output"].float()
    assert y.shape == expected.shape
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
    return (y - expected).abs().max().item(), elapsed


def test_default_state_dict_matches_official_listing():
    with torch.device("meta"):
        model = SegMambaV2(4, 4)
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert ours == read_listing("segmamba_v2_default.txt")
    assert len(ours) == 215
    assert sum(p.numel() for p in model.parameters()) == 138_776_824


def test_colorectal_configuration_parameter_count():
    """SegMamba(1, 2), the official colorectal CT call."""
    with torch.device("meta"):
        model = SegMambaV2(1, 2)
    assert sum(p.numel() for p in model.parameters()) == 138_772_694


def test_registry_builds_v2():
    with torch.device("meta"):
        model = build_network(
            "segmamba_v2", in_chans=4, out_chans=4, feat_size=[48, 64, 96, 128], hidden_size=256
        )
    assert isinstance(model, SegMambaV2)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"feat_size": (32, 64, 128, 256)},
        {"feat_size": (48, 96, 192)},
        {"depths": (2, 0, 2, 2)},
        {"spatial_dims": 2},
    ],
)
def test_rejects_configurations_the_official_code_cannot_build(kwargs):
    with pytest.raises(NetworkConfigError):
        SegMambaV2(4, 4, **kwargs)
    assert issubclass(NetworkConfigError, ModelCardError)


def test_small_fixture_logits():
    diff, seconds = _run_fixture("segmamba_v2_small")
    print(f"segmamba_v2_small: max|Δ| {diff:.2e}, forward {seconds:.2f} s")


@pytest.mark.slow
def test_default_64_fixture_logits():
    diff, seconds = _run_fixture("segmamba_v2_default_64")
    print(f"segmamba_v2_default_64: max|Δ| {diff:.2e}, forward {seconds:.2f} s")


def test_rejects_input_sizes_not_divisible_by_16():
    model = SegMambaV2(1, 2, depths=(1, 1, 1, 1), feat_size=(48, 16, 16, 16), hidden_size=16)
    with pytest.raises(InputImageError, match="multiple of 16"):
        model(torch.zeros(1, 1, 16, 16, 24))

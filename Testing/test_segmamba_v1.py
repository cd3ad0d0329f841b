"""SegMamba V1: official key listing, parameter count and logits of the official code on fixture weights."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import pytest
import torch
from SegMambaSlicerLib.errors import ModelCardError
from SegMambaSlicerLib.networks import build_network
from SegMambaSlicerLib.networks.ops.mixers import set_scan_backend
from SegMambaSlicerLib.networks.segmamba_v1 import InputSizeError, SegMambaV1
from shared_data import RECIPE_SUM_RTOL

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURES = SHARED / "fixtures"
LISTING = SHARED / "reference" / "state_dicts" / "segmamba_v1_default.txt"

needs_fixtures = pytest.mark.skipif(not (FIXTURES / "fixture_weights.py").exists(),
                                    reason=f"reference fixtures not found at {FIXTURES}")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fixture_weights():  # noqa: ANN201 - the helper module from the shared fixtures folder
    sys.path.insert(0, str(FIXTURES))
    try:
        import fixture_weights
    finally:
        sys.path.remove(str(FIXTURES))
    return fixture_weights


@pytest.mark.skipif(not LISTING.exists(), reason=f"state-dict listing not found at {LISTING}")
def test_state_dict_matches_official_listing() -> None:
    model = SegMambaV1(in_chans=4, out_chans=4)
    expected = [line.split("\t")[:2] for line in LISTING.read_text(encoding="utf-8").splitlines()]
    assert [[k, str(tuple(v.shape))] for k, v in model.state_dict().items()] == expected
    assert sum(p.numel() for p in model.parameters()) == 67_416_196
    assert all(v.dtype == torch.float32 for v in model.state_dict().values())


def test_registry_and_official_constructor_arguments() -> None:
    model = build_network("segmamba_v1", in_chans=4, out_chans=3, depths=[1, 1, 1, 1], feat_size=[48, 8, 8, 8],
                          hidden_size=16, drop_path_rate=0, layer_scale_init_value=1e-6, conv_block=True)
    assert isinstance(model, SegMambaV1) and model.out.conv.conv.out_channels == 3
    with pytest.raises(TypeError, match="bogus"):
        SegMambaV1(bogus=1)
    with pytest.raises(ModelCardError, match="48"):
        SegMambaV1(feat_size=(32, 64, 128, 256))


def test_input_size_is_checked_before_any_work() -> None:
    model = SegMambaV1(in_chans=1, out_chans=2, depths=(1, 1, 1, 1), feat_size=(48, 8, 8, 8), hidden_size=16)
    with pytest.raises(InputSizeError, match="multiple of 16"):
        model(torch.zeros(1, 1, 16, 16, 24))
    with pytest.raises(InputSizeError, match="stage 2 sees a 6x6x6 grid"):  # 216 tokens, 16 slices
        model(torch.zeros(1, 1, 48, 48, 48))


def test_torch_backend_matches_reference_backend_on_tiny_network() -> None:
    torch.manual_seed(0)
    model = SegMambaV1(in_chans=2, out_chans=3, depths=(1, 1, 1, 1), feat_size=(48, 16, 16, 16),
                       hidden_size=16).eval()  # 32^3 input: stage lengths 4096, 512, 64, 8
    x = torch.randn(1, 2, 32, 32, 32)
    with torch.no_grad():
        set_scan_backend(model, "reference")
        ref = model(x)
        set_scan_backend(model, "torch")
        got = model(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ official outputs


def load_fixture(name: str, fixture_weights) -> tuple[dict, dict[str, torch.Tensor]]:  # noqa: ANN001
    fx = torch.load(FIXTURES / f"{name}.pt", weights_only=True)
    if "state_dict" in fx:
        return fx, fx["state_dict"]
    shapes = dict(zip(fx["state_dict_keys"], map(tuple, fx["state_dict_shapes"]), strict=True))
    state = fixture_weights.fixture_state_dict(shapes, seed=fx["weight_seed"])
    for key, want in zip(fx["state_dict_keys"], fx["state_dict_sum"], strict=True):
        got = state[key].double().sum().item()
        assert math.isclose(got, want, rel_tol=RECIPE_SUM_RTOL, abs_tol=1e-9), f"regenerated weight {key} differs"
    return fx, state


def check_fixture(name: str, fixture_weights, residual: bool = True) -> float:  # noqa: ANN001
    fx, state = load_fixture(name, fixture_weights)
    model = SegMambaV1(**fx["config"]["constructor"], mamba_residual=residual).eval()
    model.load_state_dict(state, strict=True)
    set_scan_backend(model, "torch")
    x = fixture_weights.fixture_input(fx["input_shape"], seed=fx["input_seed"])
    start = time.perf_counter()
    with torch.no_grad():
        y = model(x)
    elapsed = time.perf_counter() - start
    torch.testing.assert_close(y, fx["output"].float(), rtol=1e-4, atol=1e-4)
    return elapsed


@needs_fixtures
def test_tiny_fixture_embedded_official_state_dict(fixture_weights) -> None:  # noqa: ANN001
    check_fixture("segmamba_v1_tiny", fixture_weights)


@needs_fixtures
def test_small_fixture(fixture_weights) -> None:  # noqa: ANN001
    check_fixture("segmamba_v1_small", fixture_weights)


@needs_fixtures
def test_small_fixture_without_mamba_residual(fixture_weights) -> None:  # noqa: ANN001
    check_fixture("segmamba_v1_noresidual_small", fixture_weights, residual=False)


@needs_fixtures
def test_residual_variants_are_distinguishable(fixture_weights) -> None:  # noqa: ANN001
    """The no-residual fixture must not pass with the residual model (guards the two tests above)."""
    fx, state = load_fixture("segmamba_v1_noresidual_small", fixture_weights)
    model = SegMambaV1(**fx["config"]["constructor"]).eval()
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        y = model(fixture_weights.fixture_input(fx["input_shape"], seed=fx["input_seed"]))
    assert (y - fx["output"]).abs().max() > 0.1


@needs_fixtures
@pytest.mark.slow
def test_default_64_fixture(fixture_weights) -> None:  # noqa: ANN001
    check_fixture("segmamba_v1_default_64", fixture_weights)

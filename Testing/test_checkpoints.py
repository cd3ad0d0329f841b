"""Checkpoint reading: official wrappings, pickle refusal, key reports, architecture detection."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from SegMambaSlicerLib.errors import CheckpointError
from SegMambaSlicerLib.models.checkpoints import (
    compare_keys,
    detect_architecture,
    extract_state_dict,
    load_into,
    load_state_dict_file,
)
from shared_data import read_listing
from torch import nn


def _listing(name: str) -> dict[str, torch.Tensor]:
    """Meta tensors with the official key list and shapes (no memory, shapes only)."""
    return {key: torch.empty(shape, device="meta") for key, shape in read_listing(name)}


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 2)
        self.b = nn.Conv3d(2, 4, 1)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"module": sd},
        lambda sd: {"state_dict": sd, "epoch": 3},
        lambda sd: {f"module.{k}": v for k, v in sd.items()},
        lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
    ],
    ids=["bare", "module-dict", "state_dict", "ddp-prefix", "nested"],
)
def test_official_wrappings_load_strictly(wrap, tmp_path: Path) -> None:
    src = Small()
    path = tmp_path / "ckpt.pt"
    torch.save(wrap(src.state_dict()), path)
    dst = load_into(Small(), load_state_dict_file(path))
    for (k, v), (k2, v2) in zip(src.state_dict().items(), dst.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)


class _Evil:
    def __reduce__(self):
        return (print, ("this would run code",))


class _Custom:
    """A plain class of the training code: unpickling it would import and run that code."""

    def __init__(self) -> None:
        self.epoch = 3


@pytest.mark.parametrize(("extra", "needed"), [(_Evil(), "print"), (_Custom(), "_Custom")], ids=["reduce", "class"])
def test_pickled_code_is_refused_and_named(tmp_path: Path, extra: object, needed: str) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": Small().state_dict(), "extra": extra}, path)
    with pytest.raises(CheckpointError) as caught:
        load_state_dict_file(path)
    message = str(caught.value)
    assert message.startswith(f"{path} contains Python objects (") and needed in message
    assert "could run code when loaded, so it was refused" in message
    assert "weights_only" not in message and "safe_globals" not in message and "\n" not in message


def _truncated_zip(path: Path) -> bytes:
    torch.save(Small().state_dict(), path)
    return path.read_bytes()[:300]


@pytest.mark.parametrize(
    "content",
    [
        lambda path: b"",
        lambda path: b"hello, these are notes\n",
        lambda path: b"checkpoint of epoch 3\nloss 0.1\n",  # starts like a pickled GLOBAL that is no Python name
        lambda path: bytes(range(256)) * 16,
        _truncated_zip,
    ],
    ids=["empty", "text", "text-like-global", "binary", "truncated-zip"],
)
def test_a_file_that_is_not_a_checkpoint_is_called_unreadable(tmp_path: Path, content) -> None:
    path = tmp_path / "weights.pt"
    path.write_bytes(content(path))
    with pytest.raises(CheckpointError) as caught:
        load_state_dict_file(path, shown_as="my model.pt")
    message = str(caught.value)
    assert message.startswith("my model.pt is not a readable PyTorch checkpoint (it may be damaged or not a checkpoint)")
    assert "could run code" not in message and "weights_only" not in message and "\n" not in message


def test_non_state_dict_content_is_refused() -> None:
    with pytest.raises(CheckpointError, match="does not hold a network state dict"):
        extract_state_dict({"epoch": 3, "lr": 0.1})


def test_key_report_names_missing_unexpected_and_mismatched() -> None:
    sd = Small().state_dict()
    sd.pop("a.bias")
    sd["extra.weight"] = torch.zeros(1)
    sd["b.weight"] = torch.zeros(4, 2, 3, 3, 3)
    report = compare_keys(Small(), sd)
    assert report.missing == ["a.bias"] and report.unexpected == ["extra.weight"]
    assert report.mismatched == [("b.weight", (4, 2, 3, 3, 3), (4, 2, 1, 1, 1))]
    with pytest.raises(CheckpointError, match=r"1 missing keys \(a\.bias\).*1 unexpected.*b\.weight: file"):
        load_into(Small(), sd)


def test_legacy_slice_attns_is_renamed_to_gscs() -> None:
    sd = extract_state_dict({"vit.slice_attns.0.proj.weight": torch.zeros(1), "out.conv.conv.bias": torch.zeros(1)})
    assert set(sd) == {"vit.gscs.0.proj.weight", "out.conv.conv.bias"}


def test_detects_segmamba_v1_default_from_official_listing() -> None:
    found = detect_architecture(_listing("segmamba_v1_default.txt"))
    assert found.name == "segmamba_v1"
    assert found.kwargs == dict(in_chans=4, out_chans=4, depths=[2, 2, 2, 2], feat_size=[48, 96, 192, 384],
                                hidden_size=768)


def test_detects_segmamba_v2_default_from_official_listing() -> None:
    found = detect_architecture(_listing("segmamba_v2_default.txt"))
    assert found.name == "segmamba_v2"
    assert found.kwargs == dict(in_chans=4, out_chans=4, depths=[2, 2, 2, 2], feat_size=[48, 96, 192, 384],
                                hidden_size=768)


def test_mambaclinix_checkpoint_asks_for_the_result_folder() -> None:
    with pytest.raises(CheckpointError, match="nnU-Net result folder"):
        detect_architecture(_listing("mambaclinix_example5.txt"))


def test_unknown_network_is_refused() -> None:
    with pytest.raises(CheckpointError, match="not a SegMamba"):
        detect_architecture(Small().state_dict())

"""Model registry: cache location, built-in and user cards, checkpoint import, downloaded weights, sample case."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from SegMambaSlicerLib.engine.pipeline import load_network
from SegMambaSlicerLib.errors import CheckpointError, ModelCardError
from SegMambaSlicerLib.models.cache import (
    ENV_VAR,
    cache_dir,
    default_cache_dir,
    downloaded_weights_path,
)
from SegMambaSlicerLib.models.registry import (
    MANUAL,
    MISSING,
    READY,
    RegistryError,
    all_cards,
    import_weights,
    resolve_model,
    user_cards,
    weights_state,
)
from SegMambaSlicerLib.models.resources import models_dir

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "segmamba_v1_tiny.pt"
BRATS = "segmamba-brats2023"


@pytest.fixture(scope="module")
def tiny_state_dict() -> dict[str, torch.Tensor]:
    """The official-format state dict of the tiny SegMamba V1 fixture (all 291 official key names)."""
    if not FIXTURE.is_file():
        pytest.skip(f"{FIXTURE} not available (needs ../shared/fixtures)")
    return torch.load(FIXTURE, map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture
def tiny_checkpoint(tmp_path: Path, tiny_state_dict: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / "incoming" / "Tiny SegMamba.pt"
    path.parent.mkdir()
    torch.save(tiny_state_dict, path)
    return path


def _write_user_card(home: Path, folder: str, card_id: str | None = None, **changes: object) -> Path:
    """A user card copied from the BraTS card (so it is valid) with some fields changed."""
    data = json.loads((models_dir() / f"{BRATS}.json").read_text(encoding="utf-8"))
    data.update(id=card_id or folder, **changes)
    path = home / "models" / folder / "card.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(data))
    return path


def _cache_files(home: Path) -> list[Path]:
    return sorted(p for p in home.rglob("*") if p.is_file())


# ---------------------------------------------------------------- cache location


def test_cache_dir_prefers_argument_then_environment_then_default(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "env"))
    assert cache_dir(tmp_path / "setting") == tmp_path / "setting"
    assert cache_dir("") == tmp_path / "env"  # an unsaved Qt setting reads as ""
    assert cache_dir(None) == tmp_path / "env"
    monkeypatch.delenv(ENV_VAR)
    assert cache_dir(None) == default_cache_dir()


def test_default_cache_dir_follows_each_platform_convention() -> None:
    home = Path.home()
    assert default_cache_dir("linux", {"XDG_CACHE_HOME": "/x/cache"}) == Path("/x/cache/segmamba-slicer")
    assert default_cache_dir("linux", {"XDG_CACHE_HOME": "relative"}) == home / ".cache" / "segmamba-slicer"
    assert default_cache_dir("linux", {}) == home / ".cache" / "segmamba-slicer"
    assert default_cache_dir("darwin", {}) == home / "Library" / "Caches" / "segmamba-slicer"
    assert default_cache_dir("win32", {"LOCALAPPDATA": "C:/Users/u/AppData/Local"}) == Path(
        "C:/Users/u/AppData/Local/segmamba-slicer"
    )


# ---------------------------------------------------------------- listing


def test_user_cards_are_listed_beside_builtin_cards_and_clashes_are_ignored(home, caplog) -> None:
    mine = _write_user_card(home, "mine", weights={"kind": "file", "file": "w.pt"})
    (mine.parent / "w.pt").write_bytes(b"weights")
    _write_user_card(home, BRATS)  # same id as a built-in card
    _write_user_card(home, "folder-name", card_id="other-id")
    cards = all_cards()
    assert set(user_cards()) == {"mine"}
    assert {"mine", BRATS} <= set(cards)
    assert cards[BRATS].source_path == (models_dir() / f"{BRATS}.json").resolve()  # the built-in one wins
    assert cards["mine"].weights_path() == mine.parent / "w.pt"
    assert weights_state(cards["mine"]) == READY and weights_state(cards[BRATS]) == MANUAL
    assert "is the id of a built-in model" in caplog.text
    assert "differs from its folder name" in caplog.text


def test_downloaded_weights_are_found_by_checksum(home) -> None:
    sha = hashlib.sha256(b"downloaded").hexdigest()
    _write_user_card(home, "remote", weights={"kind": "url", "url": "https://example.org/w.pt", "sha256": sha})
    assert weights_state(all_cards()["remote"]) == MISSING and all_cards()["remote"].weights_path() is None
    target = downloaded_weights_path(sha.upper())  # checksums compare case-insensitively
    target.parent.mkdir(parents=True)
    target.write_bytes(b"downloaded")
    card = resolve_model("remote")
    assert card.weights_path() == home / "weights" / f"{sha}.pt"
    assert weights_state(card) == READY


def test_bare_checkpoint_gets_a_card_from_detection_and_its_template(home, tiny_checkpoint) -> None:
    card = resolve_model(tiny_checkpoint)
    assert card.id == f"{BRATS}:Tiny SegMamba" and card.source_path is None
    assert card.weights_path() == tiny_checkpoint and card.weights.sha256 is None
    assert card.architecture_kwargs["feat_size"] == [48, 50, 52, 54]
    assert card.architecture_kwargs["nslices"] == [64, 32, 16, 8]
    assert card.labels == all_cards()[BRATS].labels


# ---------------------------------------------------------------- import


def test_import_registers_a_validated_copy_that_the_pipeline_loads(home, tiny_checkpoint, tiny_state_dict) -> None:
    card = import_weights(tiny_checkpoint)
    assert card.id == "tiny-segmamba"  # from the file name
    folder = home / "models" / "tiny-segmamba"
    assert card.source_path == folder / "card.json" and card.weights_path() == folder / "weights.pt"
    assert card.weights_path().read_bytes() == tiny_checkpoint.read_bytes()
    assert card.weights.sha256 == hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    assert card.architecture == "segmamba_v1"
    kwargs = card.architecture_kwargs
    assert kwargs["feat_size"] == [48, 50, 52, 54] and kwargs["hidden_size"] == 56  # detected
    assert kwargs["nslices"] == [64, 32, 16, 8] and kwargs["mamba_residual"] is True  # from the BraTS card
    assert [c.key for c in card.channels] == ["t2w", "t2f", "t1n", "t1c"]
    assert sorted(p.name for p in (home / "models").iterdir()) == ["tiny-segmamba"]  # no staging left

    listed = resolve_model("tiny-segmamba")
    assert weights_state(listed) == READY
    network = load_network(listed, None, torch.device("cpu"))
    key = "vit.stages.3.1.mamba.A_s_log"
    assert torch.equal(network.state_dict()[key], tiny_state_dict[key])


def test_import_refuses_builtin_and_taken_ids(home, tiny_checkpoint) -> None:
    with pytest.raises(RegistryError, match="id of a built-in model"):
        import_weights(tiny_checkpoint, model_id=BRATS)
    with pytest.raises(RegistryError, match="not valid"):
        import_weights(tiny_checkpoint, model_id="../escape")
    import_weights(tiny_checkpoint, model_id="first", display_name="My first")
    before = _cache_files(home)
    with pytest.raises(RegistryError, match="already exists"):
        import_weights(tiny_checkpoint, model_id="first")
    assert _cache_files(home) == before
    assert all_cards()["first"].display_name == "My first"


@pytest.mark.parametrize(
    ("mutation", "message"),
    [
        ("drop", r"1 missing keys \(decoder2.conv_block.conv3.conv.weight\)"),
        ("rename", r"1 unexpected keys \(out.conv.conv.renamed\)"),
        ("reshape", r"1 keys with other shapes \(encoder2.layer.conv1.conv.weight"),
        ("foreign", "not a SegMamba, SegMamba-V2 or MambaClinix"),
    ],
)
def test_import_of_a_checkpoint_that_does_not_fit_leaves_nothing(home, tmp_path, tiny_state_dict, mutation,
                                                                 message) -> None:
    sd = dict(tiny_state_dict)
    if mutation == "drop":
        del sd["decoder2.conv_block.conv3.conv.weight"]
    elif mutation == "rename":
        sd["out.conv.conv.renamed"] = sd.pop("out.conv.conv.bias")
    elif mutation == "reshape":
        sd["encoder2.layer.conv1.conv.weight"] = torch.zeros(50, 48, 1, 1, 1)
    else:
        sd = {"classifier.weight": torch.zeros(3, 3)}
    bad = tmp_path / "bad.pth"
    torch.save(sd, bad)
    with pytest.raises(CheckpointError, match=message):
        import_weights(bad)
    assert _cache_files(home) == []
    assert user_cards() == {}


def test_import_from_a_folder_needs_exactly_one_checkpoint(home, tiny_checkpoint) -> None:
    folder = tiny_checkpoint.parent
    assert import_weights(folder, model_id="from-folder").weights_path().is_file()
    (folder / "sub").mkdir()
    (folder / "sub" / "other.pth").write_bytes(b"x")
    with pytest.raises(RegistryError, match=r"2 checkpoints \(Tiny SegMamba.pt, sub/other.pth\)"):
        import_weights(folder, model_id="second")
    (folder / "notes.txt").write_text("not weights")
    with pytest.raises(RegistryError, match="not a PyTorch checkpoint"):
        import_weights(folder / "notes.txt")


def test_import_like_a_card_with_other_outputs_is_refused(home, tiny_checkpoint) -> None:
    data = json.loads((models_dir() / f"{BRATS}.json").read_text(encoding="utf-8"))
    _write_user_card(home, "two-labels", labels=data["labels"][:2], regions=[])
    with pytest.raises(ModelCardError, match="4 inputs and 4 outputs but model two-labels has 4 inputs and 3"):
        import_weights(tiny_checkpoint, like="two-labels")
    assert set(user_cards()) == {"two-labels"}



"""Weights are what their card says (SHA-256, hashed once per file version); import errors name the user's file."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from local_http import serve_folder
from SegMambaSlicerLib.cli import EXIT_USER_ERROR, main
from SegMambaSlicerLib.errors import CheckpointError
from SegMambaSlicerLib.models import cache as cache_module
from SegMambaSlicerLib.models import downloads
from SegMambaSlicerLib.models.cache import VERIFIED_FILE, file_sha256
from SegMambaSlicerLib.models.cards import builtin_cards, load_card
from SegMambaSlicerLib.models.checkpoints import WeightsChangedError, verified_weights_path
from SegMambaSlicerLib.models.registry import (
    CHANGED,
    READY,
    all_cards,
    download_weights,
    import_weights,
    weights_state,
)
from SegMambaSlicerLib.models.resources import models_dir

BRATS = "segmamba-brats2023"
#: A small SegMamba V1 with BraTS inputs and outputs, so an import takes the BraTS card as its template.
TINY_KWARGS = {"in_chans": 4, "out_chans": 4, "feat_size": [48, 16, 16, 16], "hidden_size": 32}


@pytest.fixture(scope="module")
def tiny_state_dict() -> dict[str, torch.Tensor]:
    segmamba_v1 = pytest.importorskip("SegMambaSlicerLib.networks.segmamba_v1")
    torch.manual_seed(0)
    return segmamba_v1.SegMambaV1(**TINY_KWARGS).state_dict()


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every file the cache hashes, in order (the real hash is still computed)."""
    seen: list[Path] = []

    def counting(path: Path) -> str:
        seen.append(Path(path))
        return downloads.sha256_file(path)

    monkeypatch.setattr(cache_module, "sha256_file", counting)
    return seen


def _one_line_error(text: str) -> str:
    assert text.startswith("error: ") and text.count("\n") == 1, text
    return text


def _damage(path: Path) -> None:
    """Flip one byte in place: same size; the mtime is moved on explicitly (coarse clocks)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stat = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))


def _file_card(folder: Path, payload: bytes, sha256: str) -> Path:
    data = json.loads((models_dir() / f"{BRATS}.json").read_text(encoding="utf-8"))
    data.update(id="local", weights={"kind": "file", "file": "w.pt", "sha256": sha256})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "w.pt").write_bytes(payload)
    (folder / "card.json").write_text(json.dumps(data))
    return folder / "card.json"


# ---------------------------------------------------------------- verification before loading


def test_the_shipped_cards_load_and_the_demo_weights_match_their_card(home, hashes) -> None:
    cards = builtin_cards()
    assert set(cards) == {BRATS, "segmamba-demo", "segmamba-v2-brats2023"}
    demo = cards["segmamba-demo"]
    assert demo.weights.sha256 == "3fe6780faf52ce92245a827c09b5f5a163da3c7ffc13b6a357fd408f40ef3d76"
    assert verified_weights_path(demo) == models_dir().resolve() / "segmamba-demo.pt"
    assert weights_state(demo) == READY
    assert hashes == [demo.weights_path()]  # hashed once, then remembered


def test_changed_weights_are_refused_with_both_checksums_and_what_to_do(home, tmp_path) -> None:
    expected = hashlib.sha256(b"original weights").hexdigest()
    card_file = _file_card(tmp_path / "model", b"other weights", expected)
    with pytest.raises(WeightsChangedError) as caught:
        verified_weights_path(load_card(card_file))
    message = str(caught.value)
    assert isinstance(caught.value, CheckpointError) and "\n" not in message
    assert f"The weights file {tmp_path / 'model' / 'w.pt'} has SHA-256 {hashlib.sha256(b'other weights').hexdigest()}" \
        in message
    assert f"but the card of local expects {expected}" in message
    assert "Reinstall the extension (or restore the original w.pt)" in message


def test_a_verified_file_is_not_hashed_again_until_it_changes(home, tmp_path, hashes) -> None:
    payload = b"weights" * 1000
    card = load_card(_file_card(tmp_path / "model", payload, hashlib.sha256(payload).hexdigest()))
    weights = card.weights_path()
    for _ in range(3):
        assert verified_weights_path(card) == weights
    assert hashes == [weights]
    record = json.loads((home / VERIFIED_FILE).read_text(encoding="utf-8"))
    assert record[str(weights.resolve())]["sha256"] == hashlib.sha256(payload).hexdigest()
    assert sorted(p.name for p in home.iterdir()) == [VERIFIED_FILE]  # no temporary file left behind

    _damage(weights)  # same size, new mtime: hashed again and refused
    with pytest.raises(WeightsChangedError):
        verified_weights_path(card)
    assert weights_state(card) == CHANGED
    assert hashes == [weights, weights]


def test_a_damaged_or_unwritable_record_only_costs_a_new_hash(home, tmp_path, hashes) -> None:
    payload = b"weights"
    card = load_card(_file_card(tmp_path / "model", payload, hashlib.sha256(payload).hexdigest()))
    home.mkdir()
    (home / VERIFIED_FILE).write_text("{ not json")
    assert verified_weights_path(card) == card.weights_path()
    assert json.loads((home / VERIFIED_FILE).read_text(encoding="utf-8"))  # rewritten whole
    (home / VERIFIED_FILE).write_text(json.dumps({str(card.weights_path().resolve()): {"sha256": 5}}))
    assert verified_weights_path(card) == card.weights_path()
    assert len(hashes) == 2

    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder should be")
    assert file_sha256(card.weights_path(), cache=blocked) == hashlib.sha256(payload).hexdigest()
    assert verified_weights_path(card, cache=blocked) == card.weights_path()
    assert blocked.read_text() == "a file where the cache folder should be"


def test_an_imported_model_whose_weights_changed_is_listed_as_such(home, tmp_path, tiny_state_dict, hashes,
                                                                   capsys) -> None:
    checkpoint = tmp_path / "tiny.pt"
    torch.save(tiny_state_dict, checkpoint)
    card = import_weights(checkpoint, model_id="tiny")
    assert weights_state(card) == READY and hashes == []  # hashed while it was copied in
    _damage(card.weights_path())

    assert main(["models", "list"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("tiny "))
    assert "checksum mismatch" in row and "ready" not in row
    assert main(["models", "show", "tiny"]) == 0
    out = capsys.readouterr().out
    assert f"weights: checksum mismatch (file) {card.weights_path()}" in out
    assert f"Delete the folder {card.source_path.parent} and import the original checkpoint again" in out
    with pytest.raises(WeightsChangedError, match=f"expects {card.weights.sha256}"):
        verified_weights_path(card)


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Base URL of a 127.0.0.1 server whose /w.pt holds b"remote weights"; no proxy."""
    root = tmp_path / "www"
    root.mkdir()
    (root / "w.pt").write_bytes(b"remote weights")
    with serve_folder(root, monkeypatch) as url:
        yield url


def test_a_changed_download_is_reported_and_downloaded_again(home, served, hashes, capsys) -> None:
    sha = hashlib.sha256(b"remote weights").hexdigest()
    data = json.loads((models_dir() / f"{BRATS}.json").read_text(encoding="utf-8"))
    data.update(id="remote", weights={"kind": "url", "url": f"{served}/w.pt", "sha256": sha})
    (home / "models" / "remote").mkdir(parents=True)
    (home / "models" / "remote" / "card.json").write_text(json.dumps(data))
    path = download_weights("remote")
    assert weights_state(all_cards()["remote"]) == READY and hashes == []  # download_file's check is remembered

    _damage(path)
    card = all_cards()["remote"]
    assert weights_state(card) == CHANGED
    with pytest.raises(WeightsChangedError, match="Download it again with: segmamba-slicer models download remote"):
        verified_weights_path(card)
    assert main(["models", "download", "remote", "--quiet"]) == 0
    assert path.read_bytes() == b"remote weights" and weights_state(all_cards()["remote"]) == READY
    assert f"weights of remote: {path}" in capsys.readouterr().out


# ---------------------------------------------------------------- import errors name the user's file


@pytest.mark.parametrize(
    "content",
    [b"", b"these are my notes, not weights\n", bytes(range(256)) * 8],
    ids=["empty", "text", "binary"],
)
def test_import_of_a_file_that_is_not_a_checkpoint_names_that_file(home, tmp_path, capsys, content) -> None:
    bad = tmp_path / "incoming" / "scan model.pt"
    bad.parent.mkdir()
    bad.write_bytes(content)
    assert main(["models", "import", str(bad)]) == EXIT_USER_ERROR
    err = _one_line_error(capsys.readouterr().err)
    assert f"error: {bad} is not a readable PyTorch checkpoint (it may be damaged or not a checkpoint)" in err
    assert ".import-" not in err and "weights_only" not in err and "could run code" not in err
    assert not (home / "models").exists() or list((home / "models").iterdir()) == []


@pytest.mark.parametrize("mutation", ["drop", "foreign"])
def test_import_of_a_checkpoint_that_does_not_fit_names_that_file(home, tmp_path, tiny_state_dict, capsys,
                                                                  mutation) -> None:
    sd = dict(tiny_state_dict)
    if mutation == "drop":
        del sd["out.conv.conv.bias"]
        expected = "does not fit the selected network: 1 missing keys (out.conv.conv.bias)"
    else:
        sd = {"classifier.weight": torch.zeros(3, 3)}
        expected = "is not a SegMamba, SegMamba-V2 or MambaClinix network"
    bad = tmp_path / "incoming" / "other net.pth"
    bad.parent.mkdir()
    torch.save(sd, bad)
    assert main(["models", "import", str(bad)]) == EXIT_USER_ERROR
    err = _one_line_error(capsys.readouterr().err)
    assert str(bad) in err and expected in err and ".import-" not in err
    assert list((home / "models").iterdir()) == []

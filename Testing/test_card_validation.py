"""Malformed model cards and downloads are one-line user errors (exit 1) that name the file and the field."""

from __future__ import annotations

import hashlib
import inspect
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from SegMambaSlicerLib.cli import EXIT_USER_ERROR, main
from SegMambaSlicerLib.errors import ModelCardError
from SegMambaSlicerLib.models.cache import downloaded_weights_path
from SegMambaSlicerLib.models.cards import load_card
from SegMambaSlicerLib.models.resources import models_dir
from SegMambaSlicerLib.networks import ARCHITECTURES, CARD_KWARGS

BRATS = "segmamba-brats2023"
SHA = hashlib.sha256(b"weights").hexdigest()


def _brats() -> dict:
    return json.loads((models_dir() / f"{BRATS}.json").read_text(encoding="utf-8"))


def _one_line_error(text: str) -> str:
    assert text.startswith("error: ") and text.count("\n") == 1, text
    return text


def _set(path: str, value: object) -> Callable[[dict], object]:
    """Set a dotted entry of the card (``inference.roi_size``; ``labels.0`` indexes a list)."""

    def change(data: dict) -> object:
        *parents, last = path.split(".")
        target = data
        for key in parents:
            target = target[int(key)] if isinstance(target, list) else target.setdefault(key, {})
        if isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value
        return data

    return change


MALFORMED = [
    ("top-level-list", lambda d: [d], "the card must be a JSON object"),
    ("channels-text", _set("channels", "t1"), "channels must be a list"),
    ("channel-key-number", _set("channels.0.key", 3), "channels[0].key must be text"),
    ("synonyms-text", _set("channels.1.synonyms", "flair"), "channels[1].synonyms must be a list of texts"),
    ("label-not-object", _set("labels.0", "necrosis"), "labels[0] must be a JSON object"),
    ("label-value-text", _set("labels.1.value", "x"), 'labels[1].value must be a whole number >= 0, got "x"'),
    ("label-value-fraction", _set("labels.1.value", 1.5), "labels[1].value must be a whole number"),
    ("label-colour-text", _set("labels.2.color", "red"), "labels[2].color must be a colour"),
    ("region-labels-text", _set("regions.0.labels", "1,3"), "regions[0].labels must be a non-empty list"),
    ("roi-two-axes", _set("inference.roi_size", [128, 128]), "inference.roi_size must be three positive whole"),
    ("roi-fraction", _set("inference.roi_size", [128, 127.5, 128]), "inference.roi_size must be three positive"),
    ("overlap-text", _set("inference.overlap", "half"), 'inference.overlap must be a number, got "half"'),
    ("batch-zero", _set("inference.sw_batch_size", 0), "inference.sw_batch_size must be a whole number >= 1"),
    ("mirror-axis-3", _set("inference.mirror_axes", [0, 3]), "inference.mirror_axes must be a list of axes"),
    ("blend-unknown", _set("inference.blend_mode", "mean"), "inference.blend_mode must be one of"),
    ("blend-number", _set("inference.blend_mode", 1),
     "inference.blend_mode must be one of 'gaussian', 'constant', got 1"),
    ("output-typo", _set("inference.output", "softmax_label"),
     "inference.output must be one of 'softmax_labels', 'sigmoid_regions', got \"softmax_label\""),
    ("scheme-unknown", _set("preprocessing.scheme", "zscore"),
     "preprocessing.scheme must be one of 'crop_nonzero_zscore', 'nnunet', got \"zscore\""),
    ("weights-kind-unknown", _set("weights.kind", "http"),
     "weights.kind must be one of 'manual', 'url', 'file', 'nnunet', got \"http\""),
    ("inference-list", _set("inference", [128, 128, 128]), "inference must be a JSON object"),
    ("fill-holes-text", _set("preprocessing.fill_holes", "yes"), "preprocessing.fill_holes must be true or false"),
    ("spacing-negative", _set("preprocessing.spacing", [2, 2, -1]),
     "preprocessing.spacing must be null or three positive voxel sizes in mm (x, y, z), got [2, 2, -1]"),
    ("spacing-scalar", _set("preprocessing.spacing", 2), "preprocessing.spacing must be null or three positive"),
    ("kwargs-list", _set("architecture.kwargs", [4, 4]), "architecture.kwargs must be a JSON object"),
    ("architecture-unknown", _set("architecture.name", "segmamba_v3"),
     "architecture.name 'segmamba_v3' is not a network of this version; use one of: mambaclinix, segmamba_v1"),
    ("kwarg-unknown", _set("architecture.kwargs.dropout", 0.1),
     "architecture.kwargs dropout is not an argument of segmamba_v1; it takes: conv_block, depths"),
    ("orientation-repeated-axis", _set("orientation", "LLS"), "orientation must be three letters"),
    ("orientation-unknown-letter", _set("orientation", "LPX"), "orientation must be three letters"),
    ("orientation-two-letters", _set("orientation", "LP"), "orientation must be three letters"),
    ("sha256-short", _set("weights.sha256", "abc123"), 'weights.sha256 must be a SHA-256 checksum (64 hexadecimal'),
    ("sha256-path", _set("weights.sha256", "../" * 21 + "x"), "weights.sha256 must be a SHA-256 checksum"),
    ("file-parent", _set("weights.file", "../elsewhere/w.pt"), "weights.file \"../elsewhere/w.pt\" must name a file in"),
    ("file-absolute", _set("weights.file", "/etc/hostname"), "weights.file \"/etc/hostname\" must name a file in"),
    ("file-home", _set("weights.file", "~/w.pt"), "weights.file \"~/w.pt\" must name a file in the card's folder"),
]


@pytest.mark.parametrize(("change", "message"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_models_show_of_a_malformed_card_names_the_file_and_the_field(home, tmp_path, capsys, change,
                                                                       message) -> None:
    card = tmp_path / "my card.json"
    card.write_text(json.dumps(change(_brats())), encoding="utf-8")
    assert main(["models", "show", str(card)]) == EXIT_USER_ERROR
    err = _one_line_error(capsys.readouterr().err)
    assert f"error: {card}: " in err and message in err


def test_a_card_that_is_not_utf8_text_is_a_card_error(home, tmp_path, capsys) -> None:
    card = tmp_path / "latin1.json"
    card.write_bytes(json.dumps(_brats()).replace("Peritumoral", "P\u00e9ritumoral").encode("latin-1"))
    assert main(["models", "show", str(card)]) == EXIT_USER_ERROR
    assert f"Model card {card} cannot be read (it is not UTF-8 text)" in _one_line_error(capsys.readouterr().err)


def test_nnunet_cards_keep_their_result_folder_and_settings(tmp_path) -> None:
    """nnU-Net cards name a result folder anywhere (absolute) and nnU-Net settings as kwargs; both stay valid.

    (test_nnunet.py saves and reloads a card made by nnunet_card_data from a real result folder.)
    """
    data = _brats()
    data.update(
        architecture={"name": "mambaclinix",
                      "kwargs": {"configuration": "3d_fullres", "folds": ["0"], "checkpoint": "checkpoint_final.pth"}},
        preprocessing={"scheme": "nnunet"},
        weights={"kind": "nnunet", "file": str(tmp_path / "elsewhere")},
    )
    path = tmp_path / "cards" / "nnunet.json"
    path.parent.mkdir()
    path.write_text(json.dumps(data))
    assert load_card(path).weights_path() == tmp_path / "elsewhere"
    data["weights"]["kind"] = "file"  # a weights file, unlike a result folder, must lie beside the card
    path.write_text(json.dumps(data))
    with pytest.raises(ModelCardError, match="must name a file in the card's folder"):
        load_card(path)


@pytest.mark.parametrize("architecture", ["segmamba_v1", "segmamba_v2"])
def test_card_kwargs_are_the_constructor_arguments(architecture: str) -> None:
    """The torch-free table that cards are checked against matches the real constructors."""
    module_name, _, attr = ARCHITECTURES[architecture].partition(":")
    constructor = getattr(__import__(module_name, fromlist=[attr]), attr)
    parameters = inspect.signature(constructor).parameters.values()
    named = {p.name for p in parameters if p.kind is not inspect.Parameter.VAR_KEYWORD}
    official_extras = {"drop_path_rate", "layer_scale_init_value", "conv_block"}  # V1 takes and ignores them
    assert CARD_KWARGS[architecture] == (named | official_extras if architecture == "segmamba_v1" else named)
    assert set(CARD_KWARGS) == set(ARCHITECTURES)


def test_cards_are_checked_without_importing_torch(tmp_path) -> None:
    """The Slicer module lists cards before PyTorch is installed, so checking them must not need it."""
    data = _brats()
    data["architecture"]["kwargs"]["dropout"] = 0.1
    card = tmp_path / "card.json"
    card.write_text(json.dumps(data))
    script = (
        "import sys\n"
        "from SegMambaSlicerLib.models.cards import builtin_cards, load_card\n"
        "from SegMambaSlicerLib.errors import ModelCardError\n"
        "builtin_cards()\n"
        f"try:\n    load_card({str(card)!r})\nexcept ModelCardError as exc:\n    print(exc)\n"
        "print('torch imported' if 'torch' in sys.modules else 'torch not imported')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert "architecture.kwargs dropout is not an argument of segmamba_v1" in out
    assert out.splitlines()[-1] == "torch not imported"


# ---------------------------------------------------------------- user cards and downloads


def _user_card(home: Path, model_id: str, weights: dict) -> Path:
    data = _brats()
    data.update(id=model_id, weights=weights)
    path = home / "models" / model_id / "card.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(data))
    return path


def test_download_for_a_broken_user_card_reports_the_card_error(home, capsys) -> None:
    card = _user_card(home, "remote", {"kind": "url", "url": "https://example.org/w.pt", "sha256": "not-a-checksum"})
    assert main(["models", "list"]) == 0  # the broken card is skipped, the listing still works
    assert "remote" not in capsys.readouterr().out
    assert main(["models", "download", "remote"]) == EXIT_USER_ERROR
    err = _one_line_error(capsys.readouterr().err)
    assert f"error: {card}: weights.sha256 must be a SHA-256 checksum" in err
    assert not (home / "weights").exists()


@pytest.mark.parametrize("url", ["file:///etc/hostname", "ftp://example.org/w.pt", "/etc/hostname"])
def test_download_from_a_non_http_address_is_refused(home, capsys, url: str) -> None:
    _user_card(home, "remote", {"kind": "url", "url": url, "sha256": SHA})
    assert main(["models", "download", "remote", "--quiet"]) == EXIT_USER_ERROR
    err = _one_line_error(capsys.readouterr().err)
    assert f"Cannot download {url!r}: only http:// and https:// addresses can be downloaded" in err
    assert not (home / "weights").exists()


@pytest.mark.parametrize("sha256", ["../../card", "abc", SHA[:-1] + "g"])
def test_a_malformed_checksum_never_becomes_a_path(home, sha256: str) -> None:
    with pytest.raises(ModelCardError, match="is not a SHA-256 checksum"):
        downloaded_weights_path(sha256)
    assert downloaded_weights_path(SHA.upper()) == home / "weights" / f"{SHA}.pt"

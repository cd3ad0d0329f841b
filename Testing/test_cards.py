"""Model cards: the shipped BraTS card, validation errors, channel name matching."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
from SegMambaSlicerLib.errors import ModelCardError
from SegMambaSlicerLib.models.cards import (
    BlendMode,
    OutputKind,
    PreprocessingScheme,
    WeightsKind,
    builtin_cards,
    card_from_dict,
    card_to_dict,
    find_card,
    load_card,
    match_channels,
)
from toy_models import toy_card


def test_official_segmamba_card_states_the_brats_pipeline() -> None:
    card = builtin_cards()["segmamba-brats2023"]
    assert [c.key for c in card.channels] == ["t2w", "t2f", "t1n", "t1c"]  # official channel order
    assert card.architecture == "segmamba_v1"
    assert card.architecture_kwargs["feat_size"] == [48, 96, 192, 384]
    assert card.inference.roi_size == (128, 128, 128) and card.inference.overlap == 0.5
    assert card.inference.sw_batch_size == 2 and card.inference.mirror_axes == (0, 1, 2)
    assert [(lab.value, lab.abbreviation) for lab in card.labels] == [(1, "NCR"), (2, "ED"), (3, "ET")]
    regions = {r.name: r.labels for r in card.regions}
    assert regions == {"TC": (1, 3), "WT": (1, 2, 3), "ET": (3,)}
    assert all(lab.terminology and lab.terminology.count("~") == 6 for lab in card.labels)
    assert card.weights.kind == "manual" and card.weights.url


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["case-t2w", "case-t2f", "case-t1n", "case-t1c"], {"t2w": 0, "t2f": 1, "t1n": 2, "t1c": 3}),
        (["T1Gd", "FLAIR", "T2", "T1"], {"t2w": 2, "t2f": 1, "t1n": 3, "t1c": 0}),
        (["t1ce", "t1", "flair", "t2"], {"t2w": 3, "t2f": 2, "t1n": 1, "t1c": 0}),
        (["T1 post", "T2_FLAIR", "T1 native"], {"t2w": None, "t2f": 1, "t1n": 2, "t1c": 0}),
    ],
)
def test_channel_matching_by_synonyms(names: list[str], expected: dict) -> None:
    assert match_channels(builtin_cards()["segmamba-brats2023"], names) == expected


def _minimal() -> dict:
    return {
        "id": "x", "architecture": {"name": "segmamba_v1"},
        "channels": [{"key": "ct"}], "labels": [{"value": 1, "name": "organ", "color": [1, 0, 0]}],
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("channels"), "'channels' is missing"),
        (lambda d: d.update(labels=[{"value": 0, "name": "bg", "color": [0, 0, 0]}]), "distinct integers"),
        (lambda d: d.update(labels=[{"value": 1, "name": "a", "color": [2, 0, 0]}]), "between 0 and 1"),
        (lambda d: d.update(regions=[{"name": "R", "labels": [5], "color": [1, 1, 1]}]), "unknown labels"),
        (lambda d: d.update(inference={"overlap": 1.0}), "overlap"),
        (lambda d: d.update(schema=7), "schema 7"),
    ],
)
def test_invalid_cards_name_the_problem(change, message: str) -> None:
    data = _minimal()
    change(data)
    with pytest.raises(ModelCardError, match=message):
        card_from_dict(data)


def test_card_file_weights_resolve_next_to_the_card(tmp_path: Path) -> None:
    data = _minimal() | {"weights": {"kind": "file", "file": "w.pt"}}
    path = tmp_path / "card.json"
    path.write_text(json.dumps(data))
    assert load_card(path).weights_path() == tmp_path / "w.pt"
    assert find_card(path).id == "x"


def test_unknown_card_lists_known_ones() -> None:
    with pytest.raises(ModelCardError, match="segmamba-brats2023"):
        find_card("no-such-model")


def test_closed_card_options_are_enums_that_read_as_their_json_text() -> None:
    """The pipeline compares these options with plain strings and writes them into JSON and messages."""
    card = card_from_dict(_minimal() | {
        "preprocessing": {"scheme": "nnunet"},
        "inference": {"output": "sigmoid_regions", "blend_mode": "constant"},
        "weights": {"kind": "url"},
    })
    assert card.preprocessing.scheme is PreprocessingScheme.NNUNET and card.preprocessing.scheme == "nnunet"
    assert card.inference.output is OutputKind.SIGMOID_REGIONS
    assert card.inference.blend_mode is BlendMode.CONSTANT
    assert card.weights.kind is WeightsKind.URL and {"url": "found"}[card.weights.kind] == "found"
    assert f"{card.weights.kind} {card.inference.output}" == "url sigmoid_regions"
    assert json.loads(json.dumps(dataclasses.asdict(card.inference)))["output"] == "sigmoid_regions"
    defaults = card_from_dict(_minimal())
    chosen = (defaults.preprocessing.scheme, defaults.inference.blend_mode, defaults.inference.output,
              defaults.weights.kind)
    assert chosen == ("crop_nonzero_zscore", "gaussian", "softmax_labels", "manual")
    again = card_from_dict(_minimal() | {"weights": {"kind": WeightsKind.FILE}})  # as cards built in code
    assert again.weights.kind is WeightsKind.FILE


@pytest.mark.parametrize(("section", "key", "value"), [
    ("inference", "output", "softmax_label"),  # must not silently mean softmax_labels
    ("inference", "blend_mode", ["gaussian"]),
    ("preprocessing", "scheme", None),
    ("weights", "kind", "nnUNet"),
])
def test_an_option_outside_its_set_names_the_value_and_the_allowed_ones(section: str, key: str,
                                                                        value: object) -> None:
    expected = rf"{section}\.{key} must be one of '.*', got {re.escape(json.dumps(value))}"
    with pytest.raises(ModelCardError, match=expected):
        card_from_dict(_minimal() | {section: {key: value}})


def test_card_to_dict_is_the_inverse_of_card_from_dict() -> None:
    for card in [*builtin_cards().values(), toy_card(channels=3, labels=2)]:
        data = json.loads(json.dumps(card_to_dict(card)))  # through JSON, as the job file does
        assert card_from_dict(data, source_path=card.source_path) == card

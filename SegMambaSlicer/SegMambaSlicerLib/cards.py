"""Model cards: everything that makes one model behave the way it does.

A card is a JSON file. The pipeline, the CLI, the Slicer logic and the worker read a
model's channels, orientation, preprocessing, sliding-window settings, labels and
weights only from its card, so a new model is a new card rather than new branches.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelCardError
from .resources import models_dir

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class ChannelSpec:
    """One input channel: its key, how to show it, and names that identify it."""

    key: str
    display_name: str
    synonyms: tuple[str, ...] = ()


@dataclass(frozen=True)
class LabelSpec:
    """One output label value with its segment name, colour (0-1 RGB) and terminology."""

    value: int
    name: str
    color: tuple[float, float, float]
    terminology: str | None = None
    abbreviation: str = ""


@dataclass(frozen=True)
class RegionSpec:
    """A derived region (e.g. BraTS TC = labels 1 and 3) shown and measured like a label."""

    name: str
    display_name: str
    labels: tuple[int, ...]
    color: tuple[float, float, float]


@dataclass(frozen=True)
class Preprocessing:
    """How inputs are normalised before the network sees them."""

    scheme: str = "crop_nonzero_zscore"
    crop_nonzero: bool = True
    fill_holes: bool = True
    eps: float = 1e-8


@dataclass(frozen=True)
class InferenceSettings:
    """Sliding-window settings (MONAI SlidingWindowInferer) and test-time mirroring."""

    roi_size: tuple[int, int, int] = (128, 128, 128)
    overlap: float = 0.5
    sw_batch_size: int = 2
    blend_mode: str = "gaussian"
    sigma_scale: float = 0.125
    mirror_axes: tuple[int, ...] = (0, 1, 2)
    output: str = "softmax_labels"


@dataclass(frozen=True)
class WeightsSource:
    """Where the weights come from: a shipped/cached file, a URL with checksum, or a manual download."""

    kind: str = "manual"
    file: str | None = None
    url: str | None = None
    sha256: str | None = None
    instructions: str = ""


@dataclass(frozen=True)
class ModelCard:
    """A model: network, inputs, preprocessing, inference settings, labels and weights."""

    id: str
    display_name: str
    architecture: str
    architecture_kwargs: dict[str, Any]
    channels: tuple[ChannelSpec, ...]
    labels: tuple[LabelSpec, ...]
    description: str = ""
    orientation: str = "LPS"
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    inference: InferenceSettings = field(default_factory=InferenceSettings)
    regions: tuple[RegionSpec, ...] = ()
    weights: WeightsSource = field(default_factory=WeightsSource)
    intended_use: str = ""
    source_path: Path | None = None

    @property
    def label_values(self) -> tuple[int, ...]:
        """Label value of each output channel; channel 0 is background (value 0)."""
        return (0, *(label.value for label in self.labels))

    def weights_path(self) -> Path | None:
        """Absolute path of the weights file named by the card, resolved next to the card."""
        if not self.weights.file:
            return None
        path = Path(self.weights.file).expanduser()
        if not path.is_absolute() and self.source_path is not None:
            path = self.source_path.parent / path
        return path


def _rgb(value: Any, where: str) -> tuple[float, float, float]:
    if not (isinstance(value, Sequence) and len(value) == 3):
        raise ModelCardError(f"{where}: colour must be three numbers between 0 and 1, got {value!r}.")
    rgb = tuple(float(v) for v in value)
    if not all(0.0 <= v <= 1.0 for v in rgb):
        raise ModelCardError(f"{where}: colour values must lie between 0 and 1, got {value!r}.")
    return rgb  # type: ignore[return-value]


def _require(data: dict[str, Any], key: str, where: str) -> Any:
    if key not in data:
        raise ModelCardError(f"{where}: the required entry {key!r} is missing.")
    return data[key]


def card_from_dict(data: dict[str, Any], source_path: Path | None = None) -> ModelCard:
    """Validate a parsed card and build a :class:`ModelCard`; errors name the file and field."""
    where = str(source_path) if source_path else "model card"
    if data.get("schema", SCHEMA_VERSION) != SCHEMA_VERSION:
        raise ModelCardError(f"{where}: card schema {data.get('schema')} is not supported (expected 1).")
    arch = _require(data, "architecture", where)
    channels = tuple(
        ChannelSpec(
            key=_require(c, "key", f"{where} channel"),
            display_name=c.get("display_name", c["key"]),
            synonyms=tuple(s.lower() for s in c.get("synonyms", ())),
        )
        for c in _require(data, "channels", where)
    )
    if not channels:
        raise ModelCardError(f"{where}: a model needs at least one input channel.")
    labels = tuple(
        LabelSpec(
            value=int(_require(lab, "value", f"{where} label")),
            name=_require(lab, "name", f"{where} label"),
            color=_rgb(_require(lab, "color", f"{where} label"), f"{where} label {lab.get('name')}"),
            terminology=lab.get("terminology"),
            abbreviation=lab.get("abbreviation", ""),
        )
        for lab in _require(data, "labels", where)
    )
    values = [lab.value for lab in labels]
    if 0 in values or len(set(values)) != len(values) or any(v < 0 or v > 255 for v in values):
        raise ModelCardError(f"{where}: label values must be distinct integers 1..255 (0 is background).")
    known = set(values)
    regions = tuple(
        RegionSpec(
            name=r["name"],
            display_name=r.get("display_name", r["name"]),
            labels=tuple(int(v) for v in r["labels"]),
            color=_rgb(r["color"], f"{where} region {r['name']}"),
        )
        for r in data.get("regions", ())
    )
    for region in regions:
        if not set(region.labels) <= known:
            raise ModelCardError(f"{where}: region {region.name} refers to unknown labels {region.labels}.")
    inf = data.get("inference", {})
    infer = InferenceSettings(
        roi_size=tuple(int(v) for v in inf.get("roi_size", (128, 128, 128))),  # type: ignore[arg-type]
        overlap=float(inf.get("overlap", 0.5)),
        sw_batch_size=int(inf.get("sw_batch_size", 2)),
        blend_mode=inf.get("blend_mode", "gaussian"),
        sigma_scale=float(inf.get("sigma_scale", 0.125)),
        mirror_axes=tuple(int(a) for a in inf.get("mirror_axes", (0, 1, 2))),
        output=inf.get("output", "softmax_labels"),
    )
    if not 0.0 <= infer.overlap < 1.0:
        raise ModelCardError(f"{where}: overlap must be in [0, 1), got {infer.overlap}.")
    pre = data.get("preprocessing", {})
    weights = data.get("weights", {})
    return ModelCard(
        id=_require(data, "id", where),
        display_name=data.get("display_name", data["id"]),
        description=data.get("description", ""),
        intended_use=data.get("intended_use", ""),
        architecture=_require(arch, "name", f"{where} architecture"),
        architecture_kwargs=dict(arch.get("kwargs", {})),
        channels=channels,
        labels=labels,
        regions=regions,
        orientation=data.get("orientation", "LPS"),
        preprocessing=Preprocessing(
            scheme=pre.get("scheme", "crop_nonzero_zscore"),
            crop_nonzero=bool(pre.get("crop_nonzero", True)),
            fill_holes=bool(pre.get("fill_holes", True)),
            eps=float(pre.get("eps", 1e-8)),
        ),
        inference=infer,
        weights=WeightsSource(
            kind=weights.get("kind", "manual"),
            file=weights.get("file"),
            url=weights.get("url"),
            sha256=weights.get("sha256"),
            instructions=weights.get("instructions", ""),
        ),
        source_path=source_path,
    )


def load_card(path: str | Path) -> ModelCard:
    """Read and validate one card file."""
    path = Path(path).expanduser().resolve()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelCardError(f"Model card {path} does not exist.") from None
    except json.JSONDecodeError as exc:
        raise ModelCardError(f"Model card {path} is not valid JSON: {exc}.") from None
    return card_from_dict(data, source_path=path)


def builtin_cards() -> dict[str, ModelCard]:
    """The cards shipped in Resources/Models, by id."""
    cards = (load_card(p) for p in sorted(models_dir().glob("*.json")))
    return {card.id: card for card in cards}


def find_card(id_or_path: str | Path) -> ModelCard:
    """Resolve a card id (built-in) or a path to a card file."""
    candidate = Path(id_or_path).expanduser()
    if candidate.suffix == ".json" and candidate.is_file():
        return load_card(candidate)
    cards = builtin_cards()
    if str(id_or_path) in cards:
        return cards[str(id_or_path)]
    raise ModelCardError(
        f"No model card {str(id_or_path)!r}. Known models: {', '.join(sorted(cards)) or 'none'}; "
        "or give the path of a card .json file or a checkpoint."
    )


def _tokens(name: str) -> str:
    """Lower-case a node or file name with separators unified, for synonym matching."""
    return " " + re.sub(r"[\s_\-.]+", " ", name.lower()).strip() + " "


def match_channels(card: ModelCard, names: Sequence[str]) -> dict[str, int | None]:
    """Assign input names (volume node or file names) to the card's channels by synonyms.

    Each synonym must appear as a whole token sequence (so "t1" does not match "t1c");
    longer synonyms win, and each name is used at most once.
    """
    scored: list[tuple[int, str, int]] = []
    for index, name in enumerate(names):
        text = _tokens(name)
        for channel in card.channels:
            for syn in (channel.key, *channel.synonyms):
                if _tokens(syn) in text:
                    scored.append((len(syn), channel.key, index))
    result: dict[str, int | None] = {c.key: None for c in card.channels}
    used: set[int] = set()
    for _, key, index in sorted(scored, key=lambda s: -s[0]):
        if result[key] is None and index not in used:
            result[key] = index
            used.add(index)
    return result

"""Model cards: everything that makes one model behave the way it does.

A card is a JSON file. The pipeline, the CLI, the Slicer logic and the worker read a
model's channels, orientation, preprocessing, sliding-window settings, labels and
weights only from its card, so a new model is a new card rather than new branches.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path, PurePath
from typing import Any, TypeVar

from ..errors import ModelCardError
from ..networks import ARCHITECTURES, CARD_KWARGS
from .downloads import is_sha256
from .resources import models_dir

SCHEMA_VERSION = 1
#: The built-in card of the small demo model trained on phantoms (the README's main command runs it).
DEMO_MODEL_ID = "segmamba-demo"


class CardChoice(str, Enum):
    """A card entry with a closed set of values; each member behaves as its JSON text.

    The pipeline compares these entries with plain strings ("nnunet", "url") and writes them into JSON
    and messages, so a member equals, hashes and prints as its value. ``__str__`` is overridden because
    Python 3.11 prints members of mixed-in enums as ``Class.NAME`` (``StrEnum`` needs 3.11).
    """

    def __str__(self) -> str:
        return self.value


class PreprocessingScheme(CardChoice):
    """``preprocessing.scheme``: which normalisation recipe prepares the inputs."""

    #: SegMamba's: crop to the non-zero box of all channels, then z-score each channel over the crop.
    CROP_NONZERO_ZSCORE = "crop_nonzero_zscore"
    #: nnU-Net's plans-driven transpose, crop, normalisation and resampling (result-folder models).
    NNUNET = "nnunet"


class BlendMode(CardChoice):
    """``inference.blend_mode``: how overlapping sliding windows are weighted (MONAI's blend modes)."""

    GAUSSIAN = "gaussian"
    CONSTANT = "constant"


class OutputKind(CardChoice):
    """``inference.output``: what the network's output channels mean."""

    #: Background plus one channel per label; the label map is the argmax.
    SOFTMAX_LABELS = "softmax_labels"
    #: One channel per region (nnU-Net region training): sigmoid > 0.5, painted in channel order.
    SIGMOID_REGIONS = "sigmoid_regions"


class WeightsKind(CardChoice):
    """``weights.kind``: where the weights come from."""

    #: Downloaded by hand as ``instructions`` and ``url`` say, then registered with ``models import``.
    MANUAL = "manual"
    #: Downloaded by ``models download`` from ``url`` and checked against ``sha256``.
    URL = "url"
    #: A file beside the card (shipped, or copied there by ``models import``).
    FILE = "file"
    #: An nnU-Net result folder anywhere, named by ``file`` (read through its plans and folds).
    NNUNET = "nnunet"


_Choice = TypeVar("_Choice", bound=CardChoice)


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

    scheme: PreprocessingScheme = PreprocessingScheme.CROP_NONZERO_ZSCORE
    crop_nonzero: bool = True
    fill_holes: bool = True
    eps: float = 1e-8
    #: Voxel size (mm; x, y, z of the card's orientation) the network runs at, or None for the input's own.
    #: With a spacing the cropped, normalised image is resampled to it and the logits back to the crop.
    spacing: tuple[float, float, float] | None = None


@dataclass(frozen=True)
class InferenceSettings:
    """Sliding-window settings (MONAI SlidingWindowInferer) and test-time mirroring."""

    roi_size: tuple[int, int, int] = (128, 128, 128)
    overlap: float = 0.5
    sw_batch_size: int = 2
    blend_mode: BlendMode = BlendMode.GAUSSIAN
    sigma_scale: float = 0.125
    mirror_axes: tuple[int, ...] = (0, 1, 2)
    output: OutputKind = OutputKind.SOFTMAX_LABELS


@dataclass(frozen=True)
class WeightsSource:
    """Where the weights come from: a shipped/cached file, a URL with checksum, or a manual download."""

    kind: WeightsKind = WeightsKind.MANUAL
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


_REQUIRED: Any = object()


def _shown(value: Any) -> str:
    """A value as the card wrote it, short enough for a one-line message."""
    text = json.dumps(value) if isinstance(value, (dict, list, str, int, float, bool, type(None))) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_list(value: Any) -> bool:
    """JSON arrays, and tuples from cards built in code (e.g. nnU-Net colours)."""
    return isinstance(value, (list, tuple))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _Section:
    """One JSON object of a card with typed getters whose errors name the card file and the field.

    Cards are written by hand, so every wrong type must become a :class:`ModelCardError` that says
    where, rather than a TypeError deep inside the pipeline.
    """

    def __init__(self, value: Any, src: str, path: str = "") -> None:
        if not isinstance(value, dict):
            raise ModelCardError(f"{src}: {path or 'the card'} must be a JSON object ({{...}}), got {_shown(value)}.")
        self.data, self.src, self.path = value, src, path

    def field(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def fail(self, key: str, problem: str) -> ModelCardError:
        return ModelCardError(f"{self.src}: {self.field(key)} {problem}.")

    def get(self, key: str, default: Any = _REQUIRED) -> Any:
        if key in self.data:
            return self.data[key]
        if default is _REQUIRED:
            raise ModelCardError(f"{self.src}: the required entry {self.field(key)!r} is missing.")
        return default

    def _checked(self, key: str, default: Any, ok: Callable[[Any], bool], expected: str) -> Any:
        value = self.get(key, default)
        if not ok(value):
            raise self.fail(key, f"must be {expected}, got {_shown(value)}")
        return value

    def text(self, key: str, default: Any = _REQUIRED) -> str:
        return self._checked(key, default, lambda v: isinstance(v, str), "text")

    def optional_text(self, key: str) -> str | None:
        return self._checked(key, None, lambda v: v is None or isinstance(v, str), "text")

    def texts(self, key: str) -> tuple[str, ...]:
        ok = lambda v: _is_list(v) and all(isinstance(x, str) for x in v)  # noqa: E731
        return tuple(self._checked(key, [], ok, "a list of texts"))

    def integer(self, key: str, default: Any = _REQUIRED, minimum: int = 0) -> int:
        return self._checked(key, default, lambda v: _is_int(v) and v >= minimum, f"a whole number >= {minimum}")

    def integers(self, key: str, default: Sequence[int], ok: Callable[[list[int]], bool], expected: str
                 ) -> tuple[int, ...]:
        value = self._checked(key, list(default), lambda v: _is_list(v) and all(map(_is_int, v)) and ok(list(v)),
                              expected)
        return tuple(value)

    def number(self, key: str, default: float) -> float:
        return float(self._checked(key, default, _is_number, "a number"))

    def optional_sizes(self, key: str) -> tuple[float, float, float] | None:
        """Absent or null, or three positive sizes (a voxel size in mm, x, y, z)."""
        ok = lambda v: v is None or (_is_list(v) and len(v) == 3 and all(_is_number(x) and x > 0 for x in v))  # noqa: E731
        value = self._checked(key, None, ok, "null or three positive voxel sizes in mm (x, y, z)")
        return None if value is None else (float(value[0]), float(value[1]), float(value[2]))

    def flag(self, key: str, default: bool) -> bool:
        return self._checked(key, default, lambda v: isinstance(v, bool), "true or false")

    def choice(self, key: str, default: _Choice) -> _Choice:
        """A member of ``default``'s enum: a typo must fail here, not silently take another branch."""
        allowed = [member.value for member in type(default)]
        value = self._checked(key, default.value, lambda v: isinstance(v, str) and v in allowed,
                              "one of " + ", ".join(map(repr, allowed)))
        return type(default)(value)

    def color(self, key: str) -> tuple[float, float, float]:
        value = self._checked(key, _REQUIRED, lambda v: _is_list(v) and len(v) == 3 and all(map(_is_number, v)),
                              "a colour: three numbers between 0 and 1")
        if not all(0.0 <= v <= 1.0 for v in value):
            raise self.fail(key, f"values must lie between 0 and 1, got {_shown(value)}")
        return tuple(float(v) for v in value)  # type: ignore[return-value]

    def section(self, key: str, required: bool = False) -> _Section:
        return _Section(self.get(key, _REQUIRED if required else {}), self.src, self.field(key))

    def sections(self, key: str, required: bool = True) -> list[_Section]:
        items = self._checked(key, _REQUIRED if required else [], _is_list, "a list ([...])")
        return [_Section(item, self.src, f"{self.field(key)}[{i}]") for i, item in enumerate(items)]


def card_from_dict(data: Any, source_path: Path | None = None) -> ModelCard:
    """Validate a parsed card and build a :class:`ModelCard`; errors name the file and field."""
    card = _Section(data, str(source_path) if source_path else "model card")
    if card.get("schema", SCHEMA_VERSION) != SCHEMA_VERSION:
        raise ModelCardError(f"{card.src}: card schema {card.get('schema')} is not supported (expected 1).")
    arch = card.section("architecture", required=True)
    channels = tuple(_channel(c) for c in card.sections("channels"))
    if not channels:
        raise ModelCardError(f"{card.src}: a model needs at least one input channel.")
    labels = tuple(_label(lab) for lab in card.sections("labels"))
    values = [lab.value for lab in labels]
    if 0 in values or len(set(values)) != len(values) or any(v > 255 for v in values):
        raise ModelCardError(f"{card.src}: label values must be distinct integers 1..255 (0 is background).")
    regions = tuple(_region(r) for r in card.sections("regions", required=False))
    for region in regions:
        if not set(region.labels) <= set(values):
            raise ModelCardError(f"{card.src}: region {region.name} refers to unknown labels {region.labels}.")
    model_id = card.text("id")
    return ModelCard(
        id=model_id,
        display_name=card.text("display_name", model_id),
        description=card.text("description", ""),
        intended_use=card.text("intended_use", ""),
        architecture=arch.text("name"),
        architecture_kwargs=dict(arch.section("kwargs").data),
        channels=channels,
        labels=labels,
        regions=regions,
        orientation=_orientation(card),
        preprocessing=_preprocessing(card.section("preprocessing")),
        inference=_inference(card.section("inference")),
        weights=_weights(card.section("weights")),
        source_path=source_path,
    )


def _channel(channel: _Section) -> ChannelSpec:
    key = channel.text("key")
    return ChannelSpec(key=key, display_name=channel.text("display_name", key),
                       synonyms=tuple(s.lower() for s in channel.texts("synonyms")))


def _label(label: _Section) -> LabelSpec:
    return LabelSpec(
        value=label.integer("value"),
        name=label.text("name"),
        color=label.color("color"),
        terminology=label.optional_text("terminology"),
        abbreviation=label.text("abbreviation", ""),
    )


def _region(region: _Section) -> RegionSpec:
    name = region.text("name")
    return RegionSpec(
        name=name,
        display_name=region.text("display_name", name),
        labels=region.integers("labels", (), bool, "a non-empty list of label values"),
        color=region.color("color"),
    )


def _orientation(card: _Section) -> str:
    """The card's orientation code, checked by the parser that reorientation uses."""
    from ..io.geometry import orientation_axes

    code = card.text("orientation", "LPS")
    try:
        orientation_axes(code)
    except ValueError:
        raise card.fail("orientation", f"must be three letters, one per axis from L/R, P/A and S/I (e.g. LPS or "
                                       f"RAS), got {_shown(code)}") from None
    return code


def _preprocessing(pre: _Section) -> Preprocessing:
    return Preprocessing(
        scheme=pre.choice("scheme", PreprocessingScheme.CROP_NONZERO_ZSCORE),
        crop_nonzero=pre.flag("crop_nonzero", True),
        fill_holes=pre.flag("fill_holes", True),
        eps=pre.number("eps", 1e-8),
        spacing=pre.optional_sizes("spacing"),
    )


def _inference(inf: _Section) -> InferenceSettings:
    overlap = inf.number("overlap", 0.5)
    if not 0.0 <= overlap < 1.0:
        raise inf.fail("overlap", f"must be in [0, 1), got {overlap}")
    return InferenceSettings(
        roi_size=inf.integers("roi_size", (128, 128, 128), lambda v: len(v) == 3 and min(v) > 0,
                              "three positive whole numbers (the window size per axis)"),  # type: ignore[arg-type]
        overlap=overlap,
        sw_batch_size=inf.integer("sw_batch_size", 2, minimum=1),
        blend_mode=inf.choice("blend_mode", BlendMode.GAUSSIAN),
        sigma_scale=inf.number("sigma_scale", 0.125),
        mirror_axes=inf.integers("mirror_axes", (0, 1, 2), lambda v: set(v) <= {0, 1, 2},
                                 "a list of axes 0, 1 and 2"),
        output=inf.choice("output", OutputKind.SOFTMAX_LABELS),
    )


def _weights(weights: _Section) -> WeightsSource:
    sha256 = weights.optional_text("sha256")
    if sha256 is not None and not is_sha256(sha256):
        raise weights.fail("sha256", f"must be a SHA-256 checksum (64 hexadecimal characters), got {_shown(sha256)}")
    return WeightsSource(
        kind=weights.choice("kind", WeightsKind.MANUAL),
        file=weights.optional_text("file"),
        url=weights.optional_text("url"),
        sha256=sha256.lower() if sha256 else None,
        instructions=weights.text("instructions", ""),
    )


def card_to_dict(card: ModelCard) -> dict[str, Any]:
    """The card as model-card JSON (inverse of :func:`card_from_dict`, without ``source_path``).

    The worker sends cards to its child process this way, and imports write new cards with it.
    """
    asdict = dataclasses.asdict
    return {
        "schema": SCHEMA_VERSION,
        "id": card.id,
        "display_name": card.display_name,
        "description": card.description,
        "intended_use": card.intended_use,
        "architecture": {"name": card.architecture, "kwargs": card.architecture_kwargs},
        "channels": [asdict(c) for c in card.channels],
        "labels": [asdict(label) for label in card.labels],
        "regions": [asdict(r) for r in card.regions],
        "orientation": card.orientation,
        "preprocessing": asdict(card.preprocessing),
        "inference": asdict(card.inference),
        "weights": asdict(card.weights),
    }


def load_card(path: str | Path) -> ModelCard:
    """Read and validate one card file.

    Beyond what :func:`card_from_dict` checks, a card file must name an architecture this version
    builds, with arguments its constructor takes, and a weights file inside the card's own folder: a
    card from elsewhere must not make the pipeline read (or the registry hash) arbitrary files.
    """
    path = Path(path).expanduser().resolve()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelCardError(f"Model card {path} does not exist.") from None
    except json.JSONDecodeError as exc:
        raise ModelCardError(f"Model card {path} is not valid JSON: {exc}.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelCardError(f"Model card {path} cannot be read ({_reason(exc)}).") from None
    card = card_from_dict(data, source_path=path)
    _check_architecture(card, str(path))
    _check_weights_file(card, str(path))
    return card


def _reason(exc: OSError | UnicodeDecodeError) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return "it is not UTF-8 text"
    return exc.strerror or str(exc)


def _check_architecture(card: ModelCard, src: str) -> None:
    """A misspelt network or argument name would otherwise only fail when a segmentation starts."""
    if card.architecture not in ARCHITECTURES:
        raise ModelCardError(
            f"{src}: architecture.name {card.architecture!r} is not a network of this version; use one of: "
            f"{', '.join(sorted(ARCHITECTURES))}."
        )
    accepted = CARD_KWARGS[card.architecture]
    unknown = sorted(set(card.architecture_kwargs) - accepted)
    if unknown:
        verb = "is not an argument" if len(unknown) == 1 else "are not arguments"
        raise ModelCardError(
            f"{src}: architecture.kwargs {', '.join(unknown)} {verb} of {card.architecture}; it takes: "
            f"{', '.join(sorted(accepted))}."
        )


def _check_weights_file(card: ModelCard, src: str) -> None:
    """A weights file must lie in the card's folder; an nnU-Net result folder may be anywhere.

    nnU-Net cards are saved with the absolute path of the result folder they were made from (see
    :func:`.nnunet.nnunet_card_data`), and that folder is only read through its plans, dataset and
    fold checkpoints.
    """
    name = card.weights.file
    if name is None or card.weights.kind == WeightsKind.NNUNET:
        return
    parts = PurePath(name).parts
    if not parts or PurePath(name).anchor or name.startswith("~") or ".." in parts:
        raise ModelCardError(
            f"{src}: weights.file {_shown(name)} must name a file in the card's folder (no absolute path, '~' or "
            "'..'); put the weights next to the card."
        )


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

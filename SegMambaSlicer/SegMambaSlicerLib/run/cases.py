"""Find the cases of a folder: one input file per model-card channel, named by a case id.

Two layouts are understood: the BraTS 2023 case folders ``<case>/<case>-{t2w,t2f,t1n,t1c}.nii.gz`` (channel
files named by the card's channel keys or synonyms), and any layout a pattern such as
``imagesTs/{case}_{index}.nii.gz`` describes (see :func:`discover_cases`). Kept apart from the runner in
:mod:`.batch` so that listing a cohort needs neither the network nor worker processes.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputImageError, SegMambaError
from ..io.images import find_case_channels, is_image_file
from ..models.cards import ModelCard

PathLike = str | os.PathLike[str]


class BatchError(SegMambaError):
    """The batch as a whole cannot run (no cases, bad pattern, bad device list, no worker could start).

    Defined with discovery, the first step that can refuse a batch; :mod:`.batch` raises it too.
    """


@dataclass(frozen=True)
class Case:
    """One case to segment: its id and one input file per card channel, or why they could not be found."""

    case_id: str
    inputs: tuple[Path, ...] = ()
    problem: str = ""


def discover_cases(input_dir: PathLike, card: ModelCard, pattern: str | None = None,
                   skip: PathLike | None = None) -> list[Case]:
    """Find the cases in ``input_dir`` with one input file per channel of ``card``, sorted by id.

    Without ``pattern``: every sub-folder that holds image files is a case named after the folder, with
    channel files named ``<anything>-<key>.nii.gz`` (BraTS 2023). With ``pattern``: a path relative to
    ``input_dir`` in which ``{case}`` stands for the case id, ``{channel}`` for a channel key or synonym
    (``t2f``, ``flair`` ...), ``{index}`` for the channel's position in the card counted from 0 (nnU-Net's
    ``_0000``), ``*`` for any characters within one folder name and ``**/`` for any sub-folders; e.g.
    ``{case}/{case}_{channel}.nii.gz`` (BraTS 2021) or ``imagesTs/{case}_{index}.nii.gz`` (nnU-Net); a
    pattern may also name folders, e.g. ``{case}/{channel}`` for one DICOM series folder per channel.
    Matching ignores upper/lower case. A case whose files do not fit the card is returned with its
    ``problem`` set, so that it fails visibly instead of disappearing. Files in the folder ``skip`` (the
    output folder, when it lies inside the input folder) are ignored.
    """
    root = Path(input_dir).expanduser()
    if not root.is_dir():
        raise BatchError(f"The input folder {root} does not exist.")
    skipped = Path(skip).expanduser().resolve() if skip is not None else None
    cases = _cases_by_pattern(root, card, pattern, skipped) if pattern else _brats_cases(root, card, skipped)
    if not cases:
        how = f"matching the pattern {pattern!r}" if pattern else "(expected <case>/<case>-t2w.nii.gz ...)"
        raise BatchError(f"No cases found in {root} {how}; use --pattern to describe another layout.")
    return sorted(cases, key=lambda c: c.case_id)


def _has_image_files(folder: Path) -> bool:
    return any(is_image_file(p) for p in folder.iterdir())


def _brats_cases(root: Path, card: ModelCard, skip: Path | None) -> list[Case]:
    cases = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if folder.resolve() == skip or not _has_image_files(folder):
            continue
        try:
            cases.append(Case(folder.name, tuple(find_case_channels(folder, card))))
        except InputImageError as exc:
            cases.append(Case(folder.name, problem=str(exc)))
    return cases


def pattern_regex(pattern: str, card: ModelCard) -> re.Pattern[str]:
    """Compile a case pattern (see :func:`discover_cases`) into a regular expression over relative paths."""
    if "{case}" not in pattern:
        raise BatchError(f"The pattern {pattern!r} must contain {{case}} where the case id appears.")
    if len(card.channels) > 1 and "{channel}" not in pattern and "{index}" not in pattern:
        raise BatchError(
            f"The pattern {pattern!r} must contain {{channel}} or {{index}}: {card.display_name} needs "
            f"{len(card.channels)} input images per case."
        )
    names = sorted(_channel_names(card), key=len, reverse=True)
    parts = {
        "{case}": r"(?P<case>[^/]+?)",
        "{channel}": "(?P<channel>" + "|".join(re.escape(n) for n in names) + ")",
        "{index}": r"(?P<index>\d+)",
        "**/": r"(?:[^/]+/)*",
        "*": r"[^/]*",
        "?": r"[^/]",
    }
    seen: set[str] = set()
    regex = []
    for token in re.split(r"(\{case\}|\{channel\}|\{index\}|\*\*/|\*|\?)", pattern.replace("\\", "/")):
        if token in ("{case}", "{channel}", "{index}") and token in seen:
            regex.append(f"(?P={token[1:-1]})")
        elif token in parts:
            regex.append(parts[token])
            seen.add(token)
        else:
            regex.append(re.escape(token))
    return re.compile("".join(regex), re.IGNORECASE)


def _channel_names(card: ModelCard) -> dict[str, int]:
    """Lower-case channel key or synonym → channel position (the first channel wins a shared synonym)."""
    names: dict[str, int] = {}
    for index, channel in enumerate(card.channels):
        for name in (channel.key, *channel.synonyms):
            names.setdefault(name.lower(), index)
    return names


def _cases_by_pattern(root: Path, card: ModelCard, pattern: str, skip: Path | None) -> list[Case]:
    regex, names = pattern_regex(pattern, card), _channel_names(card)
    found: dict[str, list[list[Path]]] = {}
    for path in sorted(p for p in root.rglob("*") if not p.name.startswith(".")):  # files and series folders
        if skip is not None and path.resolve().is_relative_to(skip):
            continue
        match = regex.fullmatch(path.relative_to(root).as_posix())
        if match is None:
            continue
        groups = match.groupdict()
        if groups.get("channel") is not None:
            index = names[groups["channel"].lower()]
        elif groups.get("index") is not None:
            index = int(groups["index"])
        else:
            index = 0
        if index < len(card.channels):
            found.setdefault(groups["case"], [[] for _ in card.channels])[index].append(path)
    return [_case_from_files(case_id, files, card) for case_id, files in found.items()]


def _case_from_files(case_id: str, files: list[list[Path]], card: ModelCard) -> Case:
    for channel, hits in zip(card.channels, files):
        if len(hits) != 1:
            what = "no file" if not hits else f"{len(hits)} files ({', '.join(p.name for p in hits)})"
            return Case(case_id, problem=f"Case {case_id}: {what} for channel {channel.display_name}.")
    return Case(case_id, tuple(hits[0] for hits in files))

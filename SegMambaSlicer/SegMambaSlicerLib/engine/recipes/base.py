"""What a recipe is: the model-specific steps around the network, chosen by a card's preprocessing scheme."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from torch import nn

from ...models.cards import ModelCard

#: Turns the network's logits (classes, ...) back into a label map on the input's array grid.
Restore = Callable[[np.ndarray], np.ndarray]
Weights = str | Path | None
Folds = Sequence[str | int] | None


@dataclass(frozen=True)
class Recipe:
    """The steps of one family of models; the pipeline runs any of them the same way.

    ``prepare(data, reference, card, weights, folds)`` takes the (C, z, y, x) input on the first
    channel's grid and returns the network input and the function that maps logits back; ``load``
    builds the network with its weights; ``tiling`` names the sliding-window scheme of
    :mod:`..inference` the family was trained with.
    """

    scheme: str
    tiling: str
    prepare: Callable[[np.ndarray, sitk.Image, ModelCard, Weights, Folds], tuple[np.ndarray, Restore]]
    load: Callable[[ModelCard, Weights, Folds], nn.Module]

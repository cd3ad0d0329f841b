"""Recipes: one module per family of models, each holding every step that is particular to it.

:mod:`.segmamba` (SegMamba V1 and V2: reorient, crop, z-score) and :mod:`.nnunet` (MambaClinix result
folders: nnU-Net's plans-driven preprocessing, tiling, fold ensembles and export). The card's
``preprocessing.scheme`` chooses; the pipeline has no branch per family.
"""

from __future__ import annotations

from ...errors import ModelCardError
from ...models.cards import ModelCard
from . import nnunet, segmamba
from .base import Recipe, Restore, Restored

RECIPES: dict[str, Recipe] = {recipe.scheme: recipe for recipe in (segmamba.RECIPE, nnunet.RECIPE)}

__all__ = ["RECIPES", "Recipe", "Restore", "Restored", "recipe_for"]


def recipe_for(card: ModelCard) -> Recipe:
    """The recipe of the card's preprocessing scheme."""
    scheme = str(card.preprocessing.scheme)
    if scheme not in RECIPES:
        raise ModelCardError(
            f"Model {card.id}: preprocessing scheme {scheme!r} is not supported; supported: "
            f"{', '.join(sorted(RECIPES))}."
        )
    return RECIPES[scheme]

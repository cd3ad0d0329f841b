"""Network registry: architecture name -> constructor, and the keyword arguments a card may give it.

Model cards name an architecture and its constructor arguments; the pipeline builds
networks only through :func:`build_network`, so adding an architecture means adding a
module and one entry in each table here. Entries are import paths, and torch is only
imported when a network is built, so that cards can be checked against these tables
before PyTorch is installed (the Slicer module lists the built-in cards then).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ..errors import ModelCardError

if TYPE_CHECKING:
    from torch import nn

ARCHITECTURES: dict[str, str] = {
    "segmamba_v1": "SegMambaSlicerLib.networks.segmamba_v1:SegMambaV1",
    "segmamba_v2": "SegMambaSlicerLib.networks.segmamba_v2:SegMambaV2",
    "mambaclinix": "SegMambaSlicerLib.networks.mambaclinix:mambaclinix_from_plans",
}

#: ``architecture.kwargs`` names a card may use, per architecture. For SegMamba V1/V2 these are the
#: constructor's arguments (V1 also takes the three official arguments it ignores); Testing/
#: test_card_validation.py keeps them equal to the signatures. A MambaClinix card describes an nnU-Net
#: result folder, so its kwargs choose what :func:`..nnunet.model_for_card` reads from that folder.
CARD_KWARGS: dict[str, frozenset[str]] = {
    "segmamba_v1": frozenset({
        "in_chans", "out_chans", "depths", "feat_size", "hidden_size", "norm_name", "res_block", "spatial_dims",
        "nslices", "mamba_residual", "drop_path_rate", "layer_scale_init_value", "conv_block",
    }),
    "segmamba_v2": frozenset({
        "in_chans", "out_chans", "depths", "feat_size", "drop_path_rate", "layer_scale_init_value", "hidden_size",
        "norm_name", "conv_block", "res_block", "spatial_dims",
    }),
    "mambaclinix": frozenset({"configuration", "folds", "checkpoint"}),
}


class UnknownArchitectureError(ModelCardError, ValueError):
    """Raised when a card or checkpoint names an architecture we do not implement."""


def build_network(architecture: str, **kwargs: Any) -> nn.Module:
    """Build an (untrained) network by registry name with the card's constructor arguments."""
    try:
        target = ARCHITECTURES[architecture]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise UnknownArchitectureError(
            f"Unknown network architecture {architecture!r}; this version supports: {known}."
        ) from None
    module_name, _, attr = target.partition(":")
    factory = getattr(importlib.import_module(module_name), attr)
    return factory(**kwargs)

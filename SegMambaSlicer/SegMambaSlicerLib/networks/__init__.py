"""Network registry: architecture name -> constructor.

Model cards name an architecture and its constructor arguments; the pipeline builds
networks only through :func:`build_network`, so adding an architecture means adding a
module and one entry here. Entries are import paths so that importing the registry
does not import every network (and MONAI / dynamic-network-architectures) up front.
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

ARCHITECTURES: dict[str, str] = {
    "segmamba_v1": "SegMambaSlicerLib.networks.segmamba_v1:SegMambaV1",
    "segmamba_v2": "SegMambaSlicerLib.networks.segmamba_v2:SegMambaV2",
    "mambaclinix": "SegMambaSlicerLib.networks.mambaclinix:mambaclinix_from_plans",
}


class UnknownArchitectureError(ValueError):
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

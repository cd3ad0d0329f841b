"""Qt-free segmentation logic on an MRML scene (the Slicer module's Logic delegates here).

It turns the selected volume nodes into images with their exact world geometry, runs the
one shared pipeline, and writes the label map into a segmentation node on the first
input's grid. It works in the Slicer application and on a headless slicer-core scene.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from . import mrml
from .cards import ModelCard
from .devices import resolve_device
from .errors import InputImageError
from .inference import CancelCallback, ProgressCallback
from .pipeline import SegmentationResult, SegmentOptions, load_network, segment


@dataclass
class SegmentationLogic:
    """Segments volume nodes of one scene; keeps the last loaded network for repeated runs."""

    scene: object
    _cache_key: tuple | None = field(default=None, repr=False)
    _network: nn.Module | None = field(default=None, repr=False)

    def network_for(self, card: ModelCard, options: SegmentOptions) -> nn.Module:
        """Load (or reuse) the card's network on the requested device."""
        device = resolve_device(options.device)
        weights = Path(options.weights).expanduser() if options.weights else card.weights_path()
        key = (card.id, card.architecture, str(weights), str(device))
        if key != self._cache_key or self._network is None:
            self._network = load_network(card, weights, device)
            self._cache_key = key
        return self._network

    def segment_nodes(
        self,
        input_nodes: Sequence[object],
        card: ModelCard,
        options: SegmentOptions | None = None,
        segmentation_node: object | None = None,
        progress: ProgressCallback | None = None,
        cancel: CancelCallback | None = None,
        network: nn.Module | None = None,
    ) -> tuple[object, SegmentationResult]:
        """Segment one case given as volume nodes (card channel order); returns (segmentation node, result)."""
        options = options or SegmentOptions()
        if len(input_nodes) != len(card.channels) or any(n is None for n in input_nodes):
            names = ", ".join(c.display_name for c in card.channels)
            raise InputImageError(f"Select one volume for each input of {card.display_name}: {names}.")
        images = [mrml.image_from_volume_node(node) for node in input_nodes]
        network = network or self.network_for(card, options)
        result = segment(images, card, options, progress=progress, cancel=cancel, network=network)
        node = mrml.import_labelmap_to_segmentation(
            result.labelmap, card.labels, self.scene, segmentation_node=segmentation_node,
            reference_volume_node=input_nodes[0], name=f"{input_nodes[0].GetName()} {card.id} segmentation",
        )
        return node, result

"""3D Slicer module: SegMamba, SegMamba-V2 and MambaClinix segmentation.

Thin by design: the GUI gathers choices and shows results; all work happens in the
Qt-free SegMambaSlicerLib (tested headless with pytest), through SegmentationLogic.
"""

from __future__ import annotations

import os
import sys

import qt
import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

sys.path.insert(0, os.path.dirname(__file__))

from SegMambaSlicerLib.cards import builtin_cards, match_channels  # noqa: E402
from SegMambaSlicerLib.errors import SegMambaError  # noqa: E402


class SegMambaSlicer(ScriptedLoadableModule):
    """Module description shown in Slicer."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        parent.title = "SegMamba"
        parent.categories = ["Segmentation"]
        parent.contributors = ["SegMambaSlicer contributors"]
        parent.helpText = (
            "Segment brain tumors and other structures with SegMamba, SegMamba-V2 and MambaClinix "
            "networks on this computer (GPU if available, CPU otherwise). Research use only."
        )
        parent.acknowledgementText = (
            "Networks: SegMamba (Xing et al., MICCAI 2024), SegMamba-V2 (Xing et al., IEEE TMI 2025), "
            "MambaClinix (Bian et al., 2024). Reimplemented in pure PyTorch from their published descriptions."
        )


class SegMambaSlicerWidget(ScriptedLoadableModuleWidget):
    """Model choice, one input selector per model channel, and a Segment button."""

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        self.logic = SegMambaSlicerLogic()
        self.cards = builtin_cards()
        form = qt.QFormLayout()
        self.layout.addLayout(form)
        self.modelSelector = qt.QComboBox()
        for card in self.cards.values():
            self.modelSelector.addItem(card.display_name, card.id)
        form.addRow("Model:", self.modelSelector)
        self.inputSelectors = []
        for channel in self._card().channels:
            selector = slicer.qMRMLNodeComboBox()
            selector.nodeTypes = ["vtkMRMLScalarVolumeNode"]
            selector.noneEnabled = True
            selector.setMRMLScene(slicer.mrmlScene)
            form.addRow(f"{channel.display_name}:", selector)
            self.inputSelectors.append(selector)
        self.segmentButton = qt.QPushButton("Segment")
        form.addRow(self.segmentButton)
        self.segmentButton.connect("clicked(bool)", self.onSegment)
        self._autoFillInputs()
        self.layout.addStretch(1)

    def _card(self):
        return self.cards[self.modelSelector.currentData]

    def _autoFillInputs(self):
        nodes = list(slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"))
        matches = match_channels(self._card(), [n.GetName() for n in nodes])
        for selector, channel in zip(self.inputSelectors, self._card().channels):
            if matches[channel.key] is not None:
                selector.setCurrentNode(nodes[matches[channel.key]])

    def onSegment(self):
        nodes = [s.currentNode() for s in self.inputSelectors]
        with slicer.util.tryWithErrorDisplay("Segmentation failed.", waitCursor=True):
            try:
                self.logic.segment(nodes, self._card())
            except SegMambaError as exc:
                raise RuntimeError(str(exc)) from exc


class SegMambaSlicerLogic(ScriptedLoadableModuleLogic):
    """Facade over SegMambaSlicerLib.logic.SegmentationLogic for the GUI and the Python console."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        from SegMambaSlicerLib.logic import SegmentationLogic

        self._impl = SegmentationLogic(slicer.mrmlScene)

    def segment(self, inputNodes, card, options=None, segmentationNode=None, progress=None, cancel=None, network=None):
        """Segment volume nodes (in the card's channel order); returns the segmentation node."""
        node, _ = self._impl.segment_nodes(inputNodes, card, options, segmentationNode, progress, cancel, network)
        return node


class SegMambaSlicerTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer: a synthetic case through the real logic with a small fixed-weight network."""

    def runTest(self):
        slicer.mrmlScene.Clear()
        self.test_logic_writes_named_segments_on_input_grid()

    def test_logic_writes_named_segments_on_input_grid(self):
        import dataclasses

        import numpy as np
        import torch

        card = builtin_cards()["segmamba-brats2023"]
        card = dataclasses.replace(card, inference=dataclasses.replace(card.inference, roi_size=(16, 16, 16)))
        volumes = []
        for index, channel in enumerate(card.channels):
            array = np.zeros((20, 24, 22), dtype=np.float32)
            array[4:16, 5:20, 3:18] = 10.0 + index
            array[8:12, 9:14, 7:12] = 50.0
            volumes.append(slicer.util.addVolumeFromArray(array, name=channel.key))
        network = torch.nn.Conv3d(4, 4, 1)
        with torch.no_grad():
            network.weight.zero_()
            network.bias.copy_(torch.tensor([0.0, -1.0, -2.0, -3.0]))
            network.weight[3, 0] = 10.0  # label 3 where channel 0 is above its mean
        node = SegMambaSlicerLogic().segment(volumes, card, network=network.eval())
        segmentation = node.GetSegmentation()
        names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
        self.assertEqual(names, [label.name for label in card.labels])
        labels = slicer.util.arrayFromSegmentBinaryLabelmap(node, segmentation.GetNthSegmentID(2), volumes[0])
        self.assertEqual(int(labels.sum()), 4 * 5 * 5)
        self.delayDisplay("SegMamba self-test passed")

"""3D Slicer module: SegMamba, SegMamba-V2 and MambaClinix segmentation.

Thin by design: the widget gathers choices and shows results; all work and every decision that can
be made without Qt live in the SegMambaSlicerLib package (tested headless with pytest): the
segmentation logic and review helpers (logic.py), the background worker process (worker.py) and
the first-run dependency decisions (install.py). Nothing here imports torch at module load, so
the module opens even before PyTorch is installed and can offer to install it.

The per-channel input selectors are created in code inside ``inputVolumesWidget``, because their
number and labels come from the selected model card.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
import traceback
from typing import Annotated

import qt
import slicer
from slicer import vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

sys.path.insert(0, os.path.dirname(__file__))

from SegMambaSlicerLib.errors import SegMambaError  # noqa: E402
from SegMambaSlicerLib.models.cards import builtin_cards, match_channels  # noqa: E402
from SegMambaSlicerLib.slicer import install  # noqa: E402

REQUESTER = "SegMamba"
DEMO_MODEL_ID = "segmamba-demo"


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
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """Offer the synthetic BraTS-like case in the Sample Data module (generated on first use, then cached)."""
    import SampleData

    iconsPath = os.path.join(os.path.dirname(__file__), "Resources", "Icons")
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="SegMamba",
        sampleName="SegMambaPhantom",
        thumbnailFileName=os.path.join(iconsPath, "SegMambaSlicer.png"),
        customDownloader=lambda *source: SegMambaSlicerLogic().loadSampleCase(),
    )


@parameterNodeWrapper
class SegMambaSlicerParameterNode:
    """Choices kept in the scene; per-channel inputs are not kept (they are re-matched by name)."""

    outputSegmentation: vtkMRMLSegmentationNode
    modelId: str = ""
    device: str = "auto"
    overlap: Annotated[float, WithinRange(0.0, 0.9)] = 0.5
    swBatchSize: Annotated[int, WithinRange(1, 64)] = 2
    tta: bool = False
    mixedPrecision: bool = True
    fusedKernels: bool = True
    show3D: bool = True


class SegMambaSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Model and inputs, device, advanced options, Segment/Cancel with progress, and the review panel."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._cards = {}
        self._inputSelectors = []
        self._run = None
        self._result = None
        self._resultNode = None
        self._systemInfo = None

    # ------------------------------------------------------------------ setup and scene

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SegMambaSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SegMambaSlicerLogic()
        self.ui.inputVolumesWidget.setLayout(qt.QFormLayout())
        self.ui.volumesTable.setColumnCount(2)
        self.ui.volumesTable.setHorizontalHeaderLabels(["Segment", "Volume (mL)"])
        self.ui.volumesTable.horizontalHeader().setStretchLastSection(True)
        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.connect("timeout()", self._onTimer)

        self.ui.modelSelector.connect("currentIndexChanged(int)", self._onModelChanged)
        self.ui.deviceSelector.connect("currentIndexChanged(int)", self._onDeviceChanged)
        self.ui.loadCheckpointButton.connect("clicked(bool)", self._onLoadCheckpoint)
        self.ui.loadSampleButton.connect("clicked(bool)", self._onLoadSample)
        self.ui.installDependenciesButton.connect("clicked(bool)", self._ensureDependencies)
        self.ui.installKernelsButton.connect("clicked(bool)", self._onInstallKernels)
        self.ui.segmentButton.connect("clicked(bool)", self._onSegmentButton)
        self.ui.showRegionsRadioButton.connect("toggled(bool)", self._onDisplayModeChanged)
        self.ui.show3DCheckBox.connect("toggled(bool)", self._onShow3DChanged)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self._onNodeAdded)
        self.initializeParameterNode()
        self._refreshEnvironment()

    def cleanup(self):
        """Called when the application closes: stop a running worker, drop observers."""
        if self._run is not None:
            self._run.cancel()
            self._run = None
        self._timer.stop()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event):
        if self._run is not None:
            self._run.cancel()
            self._endRun("Cancelled: the scene was closed.")
        self.setParameterNode(None)
        self._result = self._resultNode = None

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onReload(self):
        """Developer reload: also reload the Lib package, which Slicer's reload would keep stale."""
        for name in [n for n in sys.modules if n == "SegMambaSlicerLib" or n.startswith("SegMambaSlicerLib.")]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, parameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self._selectData(self.ui.modelSelector, self._parameterNode.modelId)
            self._selectData(self.ui.deviceSelector, self._parameterNode.device)

    # ------------------------------------------------------------------ dependencies and environment

    def _plan(self):
        requirements = install.read_requirements()
        names = [r.name for r in requirements] + [*install.PROTECTED, install.TORCH]
        return install.plan_install(
            requirements,
            install.installed_versions(names),
            (slicer.app.majorVersion, slicer.app.minorVersion),
            pytorch_extension=hasattr(slicer.modules, "pytorchutils"),
            imported={name.split(".")[0] for name in sys.modules},
        )

    def _refreshEnvironment(self):
        """Show the install banner, or the models and devices once the packages are there."""
        plan = self._plan()
        self.ui.dependenciesFrame.setVisible(plan.needed)
        if plan.needed:
            self.ui.dependenciesLabel.text = (
                "SegMamba needs Python packages that are not installed yet: "
                + ", ".join(filter(None, [plan.torch, *plan.packages])) + ".")
        self._populateModels(ready=not plan.needed)
        self._populateDevices(ready=not plan.needed)

    def _ensureDependencies(self):
        """Ask once, then install torch and the other requirements; True when everything is in place."""
        plan = self._plan()
        if not plan.needed:
            return True
        if not slicer.util.confirmOkCancelDisplay(install.describe_plan(plan), f"{REQUESTER}: install packages"):
            self._log("Package installation declined; segmentation needs these packages.")
            return False
        self._log(install.describe_plan(plan))
        try:
            with slicer.util.WaitCursor():
                if plan.torch is not None:
                    self._installTorch(plan)
                    plan = self._plan()  # pins the torch just installed
                if plan.packages:
                    self._installPackages(plan)
        except Exception as exc:  # noqa: BLE001 - pip and PyTorchUtils raise many kinds; all are shown
            self._showError("Installing the Python packages failed. See the log for pip's output.", exc)
            return False
        self._log("Python packages installed.")
        if plan.restart_needed and plan.installer == install.PIP_INSTALLER:
            if slicer.util.confirmYesNoDisplay("Slicer must restart to use the updated packages. Restart now?"):
                slicer.util.restart()
        self._refreshEnvironment()
        return not self._plan().needed

    def _installTorch(self, plan):
        self._log(f"Installing PyTorch ({plan.torch}) with the {plan.torch_installer}…")
        if plan.torch_installer == install.PYTORCH_EXTENSION:
            import PyTorchUtils

            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                askConfirmation=False, torchVersionRequirement=plan.torch_specifier)
            if torch is None:
                raise SegMambaError("The PyTorch extension could not install PyTorch; see the Python console.")
        else:
            slicer.util.pip_install(install.pip_install_arguments([plan.torch], None))

    def _constraintsFile(self, plan):
        handle, path = tempfile.mkstemp(prefix="segmamba-constraints-", suffix=".txt")
        with os.fdopen(handle, "w") as stream:
            stream.write("\n".join(plan.constraints) + "\n")
        return path

    def _installPackages(self, plan):
        self._log("Installing " + ", ".join(plan.packages) + " (keeping " + ", ".join(plan.constraints) + ")…")
        constraints = self._constraintsFile(plan)
        try:
            if plan.installer == install.PACKAGING_INSTALLER:
                import slicer.packaging

                skipped = slicer.packaging.pip_ensure(
                    list(plan.packages), constraints=constraints, skip_packages=list(plan.skip_packages),
                    prompt_install=False, requester=REQUESTER)
                if skipped:
                    self._log("Left to Slicer: " + ", ".join(skipped))
            else:
                slicer.util.pip_install(install.pip_install_arguments(plan.packages, constraints))
        finally:
            os.remove(constraints)

    def _onInstallKernels(self):
        offer = self._kernelOffer()
        if not offer or not slicer.util.confirmOkCancelDisplay(
                "Install the optional fused CUDA kernels " + ", ".join(offer) + "? They compile against the installed "
                "PyTorch and need the CUDA toolkit; this can take a long time. Segmentation works without them.",
                f"{REQUESTER}: fast GPU kernels"):
            return
        plan = self._plan()
        constraints = self._constraintsFile(plan)
        try:
            with slicer.util.WaitCursor():
                slicer.util.pip_install(install.pip_install_arguments(
                    offer, constraints, install.FUSED_KERNEL_PIP_OPTIONS))
            if slicer.util.confirmYesNoDisplay("Restart Slicer now to use the fused kernels?"):
                slicer.util.restart()
        except Exception as exc:  # noqa: BLE001
            self._showError("Installing the fused kernels failed; the pure PyTorch scan is used.", exc)
        finally:
            os.remove(constraints)

    def _kernelOffer(self):
        info = self._systemInfo
        installed = install.installed_versions(install.FUSED_KERNELS)
        return install.fused_kernel_offer(info is not None and info.cuda_usable, sys.platform, installed)

    def _populateDevices(self, ready):
        self._systemInfo = None
        self.ui.deviceSelector.clear()
        if not ready:
            self.ui.deviceInfoLabel.text = "PyTorch is not installed yet."
            self.ui.installKernelsButton.setVisible(False)
            return
        from SegMambaSlicerLib.slicer.logic import describe_system, device_choices, system_info

        try:
            self._systemInfo = system_info()
        except Exception as exc:  # noqa: BLE001 - a broken PyTorch install must not stop the module from loading
            self.ui.deviceInfoLabel.text = f"PyTorch is installed but cannot be loaded: {exc}. Reinstall it."
            self.ui.installKernelsButton.setVisible(False)
            return
        for value, label in device_choices(self._systemInfo):
            self.ui.deviceSelector.addItem(label, value)
        self.ui.deviceInfoLabel.text = describe_system(self._systemInfo)
        self.ui.installKernelsButton.setVisible(bool(self._kernelOffer()))
        if self._parameterNode:
            self._selectData(self.ui.deviceSelector, self._parameterNode.device)

    # ------------------------------------------------------------------ model and inputs

    def _populateModels(self, ready):
        """All registered models once the packages are in place; the built-in cards before that."""
        self._cards = builtin_cards()
        if ready:
            try:
                from SegMambaSlicerLib.models.registry import all_cards

                self._cards = all_cards()
            except Exception as exc:  # noqa: BLE001 - e.g. a broken PyTorch; the built-in models still show
                self._log(f"Imported models cannot be listed: {exc}")
        wasBlocked = self.ui.modelSelector.blockSignals(True)
        self.ui.modelSelector.clear()
        for card in self._cards.values():
            self.ui.modelSelector.addItem(card.display_name, card.id)
        self.ui.modelSelector.blockSignals(wasBlocked)
        if self._parameterNode and self._parameterNode.modelId in self._cards:
            self._selectData(self.ui.modelSelector, self._parameterNode.modelId)
        self._onModelChanged()

    def _card(self):
        return self._cards.get(self.ui.modelSelector.currentData)

    def _onModelChanged(self, index=None):
        card = self._card()
        if card is None:
            return
        if self._parameterNode and self._parameterNode.modelId != card.id:
            self._parameterNode.modelId = card.id
            self._parameterNode.overlap = card.inference.overlap
            self._parameterNode.swBatchSize = card.inference.sw_batch_size
        weights = card.weights_path()
        state = "weights ready" if weights is not None and weights.is_file() else (
            card.weights.instructions or "no weights yet: use Load checkpoint…")
        self.ui.modelInfoLabel.text = f"{card.description}\n{card.intended_use}\n{state}".strip()
        self._buildInputSelectors(card)
        self._autoFillInputs(onlyEmpty=False)

    def _buildInputSelectors(self, card):
        layout = self.ui.inputVolumesWidget.layout()
        while layout.count():
            item = layout.takeAt(0)
            if item.widget():
                item.widget().deleteLater()
        self._inputSelectors = []
        for channel in card.channels:
            selector = slicer.qMRMLNodeComboBox()
            selector.nodeTypes = ["vtkMRMLScalarVolumeNode"]
            selector.noneEnabled = True
            selector.addEnabled = False
            selector.removeEnabled = False
            selector.showChildNodeTypes = False
            selector.setMRMLScene(slicer.mrmlScene)
            selector.toolTip = f"Volume for the model's {channel.display_name} input."
            layout.addRow(f"{channel.display_name}:", selector)
            self._inputSelectors.append(selector)

    def _autoFillInputs(self, onlyEmpty):
        card = self._card()
        if card is None:
            return
        nodes = list(slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"))
        matches = match_channels(card, [n.GetName() for n in nodes])
        for selector, channel in zip(self._inputSelectors, card.channels):
            if matches[channel.key] is not None and not (onlyEmpty and selector.currentNode()):
                selector.setCurrentNode(nodes[matches[channel.key]])

    def _onNodeAdded(self, caller, event):
        qt.QTimer.singleShot(0, lambda: self._autoFillInputs(onlyEmpty=True))  # after the node is named

    def _onDeviceChanged(self, index=None):
        if self._parameterNode and self.ui.deviceSelector.currentData:
            self._parameterNode.device = self.ui.deviceSelector.currentData

    def _onLoadCheckpoint(self):
        path = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(), "Load checkpoint", "", "PyTorch checkpoints (*.pt *.pth)")
        if not path or not self._ensureDependencies():
            return
        from SegMambaSlicerLib.models.registry import import_weights

        try:
            with slicer.util.WaitCursor():
                card = import_weights(path, like=self.ui.modelSelector.currentData)
        except SegMambaError as exc:
            self._showError(f"Cannot use {os.path.basename(path)}.", exc)
            return
        self._log(f"Imported {path} as model {card.id} ({card.display_name}).")
        self._parameterNode.modelId = card.id
        self._populateModels(ready=True)

    def _onLoadSample(self):
        with slicer.util.tryWithErrorDisplay("Cannot create the sample case.", waitCursor=True):
            self.logic.loadSampleCase()
        self._autoFillInputs(onlyEmpty=False)

    # ------------------------------------------------------------------ running

    def _options(self, card):
        from SegMambaSlicerLib.engine.pipeline import SegmentOptions

        p = self._parameterNode
        return SegmentOptions(
            device=p.device or "auto", overlap=p.overlap, sw_batch_size=p.swBatchSize, tta=p.tta,
            mixed_precision=p.mixedPrecision, scan_backend=None if p.fusedKernels else "torch")

    def _onSegmentButton(self):
        if self._run is not None:
            self._run.cancel()
            self._endRun("Cancelled.")
            return
        if not self._ensureDependencies():
            return
        card = self._card()
        nodes = [selector.currentNode() for selector in self._inputSelectors]
        try:
            self._run = self.logic.start(nodes, card, self._options(card), self._parameterNode.outputSegmentation)
        except Exception as exc:  # noqa: BLE001 - shown to the user, with the traceback when unexpected
            self._showError("Cannot start the segmentation.", exc)
            return
        self._log(f"Segmenting {', '.join(n.GetName() for n in nodes)} with {card.display_name}…")
        self.ui.segmentButton.text = "Cancel"
        self.ui.progressBar.value = 0
        self.ui.progressBar.setFormat("Starting…")
        self._timer.start()

    def _onTimer(self):
        from SegMambaSlicerLib.slicer.logic import progress_text

        for event in self._run.poll():
            if event.kind == "progress":
                secondsLeft = self._run.clock.update(event.fraction)
                self.ui.progressBar.value = int(round(1000 * event.fraction))
                self.ui.progressBar.setFormat(progress_text(event.message, secondsLeft))
            elif event.kind in ("log", "stderr") and event.message.strip():
                self._log(event.message)
            elif event.kind == "started":
                self._log(f"Worker process {event.data.get('pid')} started ({event.data.get('python')}).")
        if self._run.finished:
            self._finishRun()

    def _finishRun(self):
        run = self._run
        self._timer.stop()
        try:
            node, result = self.logic.finish(run)
        except Exception as exc:  # noqa: BLE001 - shown to the user, with the traceback when unexpected
            self._endRun("Failed.")
            self._showError("Segmentation failed.", exc)
            return
        windows = f"{result.windows} window{'s' if result.windows != 1 else ''}"
        for warning in result.warnings:
            self._log(f"Warning: {warning}")
        caveat = f" {len(result.warnings)} warning(s) about the inputs: see the log." if result.warnings else ""
        self._endRun(f"Done in {result.seconds:.0f} s on {result.device} ({windows}).{caveat}")
        self._parameterNode.outputSegmentation = node
        self._showResult(node, result, run.input_nodes[0])

    def _endRun(self, status):
        self._timer.stop()
        self._run = None
        self.ui.segmentButton.text = "Segment"
        self.ui.progressBar.setFormat(status)
        self.ui.statusLabel.text = status
        self._log(status)

    # ------------------------------------------------------------------ review

    def _showResult(self, node, result, referenceNode):
        from SegMambaSlicerLib.slicer.logic import show_regions, show_surfaces, volume_rows

        self._result, self._resultNode = result, node
        rows = volume_rows(result)
        table = self.ui.volumesTable
        table.setRowCount(len(rows))
        for index, row in enumerate(rows):
            name = qt.QTableWidgetItem(row.name if row.kind == "label" else f"{row.name} (region)")
            name.setBackground(qt.QBrush(qt.QColor.fromRgbF(*row.color)))
            table.setItem(index, 0, name)
            table.setItem(index, 1, qt.QTableWidgetItem(f"{row.volume_ml:.2f}"))
        show_regions(node, result.card, self.ui.showRegionsRadioButton.checked)
        show_surfaces(node, self._parameterNode.show3D)
        slicer.util.setSliceViewerLayers(background=referenceNode, fit=True)

    def _onDisplayModeChanged(self, regions):
        if self._resultNode is not None:
            from SegMambaSlicerLib.slicer.logic import show_regions

            show_regions(self._resultNode, self._result.card, regions)

    def _onShow3DChanged(self, visible):
        if self._resultNode is not None:
            from SegMambaSlicerLib.slicer.logic import show_surfaces

            show_surfaces(self._resultNode, visible)

    # ------------------------------------------------------------------ messages

    def _log(self, text):
        self.ui.logTextEdit.appendPlainText(text)
        logging.info(text)

    def _showError(self, message, exc):
        details = getattr(exc, "details", "") or ("" if isinstance(exc, SegMambaError) else traceback.format_exc())
        self._log(f"{message} {exc}\n{details}".strip())
        extra = {"detailedText": details} if details else {}
        slicer.util.errorDisplay(f"{message}\n\n{exc}", windowTitle=REQUESTER, **extra)

    @staticmethod
    def _selectData(combo, value):
        index = combo.findData(value)
        if index >= 0:
            combo.setCurrentIndex(index)


class SegMambaSlicerLogic(ScriptedLoadableModuleLogic):
    """Facade over SegMambaSlicerLib.slicer.logic.SegmentationLogic for the GUI and the Python console.

    Console use (blocks until done; ``inWorker=True`` runs the network in a separate process)::

        logic = SegMambaSlicer.SegMambaSlicerLogic()
        seg = logic.segment([t2w, t2f, t1n, t1c], find_card("segmamba-brats2023"), SegmentOptions(weights="x.pt"))
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self._impl = None

    def getParameterNode(self):
        return SegMambaSlicerParameterNode(super().getParameterNode())

    @property
    def impl(self):
        """The Qt-free logic; created on first use because importing it imports torch."""
        if self._impl is None:
            from SegMambaSlicerLib.slicer.logic import SegmentationLogic

            self._impl = SegmentationLogic(slicer.mrmlScene)
        return self._impl

    def segment(self, inputNodes, card, options=None, segmentationNode=None, progress=None, cancel=None,
                network=None, inWorker=False):
        """Segment volume nodes (in the card's channel order) and wait; returns the segmentation node."""
        node, _ = self.impl.segment_nodes(inputNodes, card, options, segmentationNode, progress, cancel, network,
                                          in_worker=inWorker)
        return node

    def loadSampleCase(self):
        """Load the synthetic BraTS-size case (written to the cache folder once); returns its volume nodes."""
        from SegMambaSlicerLib.evaluation.phantom import sample_case

        paths = sample_case()
        return [slicer.util.loadVolume(str(paths[key]), {"name": f"Sample {key}"}) for key in ("t2w", "t2f", "t1n", "t1c")]

    def segmentNodeGroups(self, groups, card, options=None, progress=None, cancel=None):
        """Segment several cases already loaded, e.g. ``[[t2w1, t2f1, t1n1, t1c1], [t2w2, ...]]``; returns nodes."""
        return [node for node, _ in self.impl.segment_node_groups(groups, card, options, progress, cancel)]

    def segmentFolder(self, inputDir, outputDir, model, options=None, **kwargs):
        """Segment every case of a folder to files (see docs/batch.md); returns the batch result."""
        from SegMambaSlicerLib.run.batch import segment_folder

        return segment_folder(inputDir, outputDir, model, options, **kwargs)

    def start(self, inputNodes, card, options=None, segmentationNode=None):
        """Start a background segmentation; poll the returned run, then call :meth:`finish`."""
        return self.impl.start_segmentation(inputNodes, card, options, segmentationNode)

    def finish(self, run):
        """Import a finished run's result; returns (segmentation node, result) or raises its error."""
        return self.impl.finish_segmentation(run)


class SegMambaSlicerTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer (and headless under pytest): a synthetic case through the real logic."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_logic_writes_named_segments_and_volumes()
        self.setUp()
        self.test_background_worker_matches_in_process_run()

    def test_logic_writes_named_segments_and_volumes(self):
        """A fixed-weight network whose answer is known: label 3 exactly where channel 0 is brightest."""
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
        node, result = SegMambaSlicerLogic().impl.segment_nodes(volumes, card, network=network.eval())
        segmentation = node.GetSegmentation()
        names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
        self.assertEqual(names, [label.name for label in card.labels] + [r.display_name for r in card.regions])
        expected_ml = {"Necrotic tumor core": 0.0, "Peritumoral edema": 0.0, "Enhancing tumor": 0.1,
                       "TC": 0.1, "WT": 0.1, "ET": 0.1}  # 4 x 5 x 5 voxels of 1 mm^3
        self.assertEqual(result.volumes.keys(), expected_ml.keys())
        for key, value in expected_ml.items():
            self.assertAlmostEqual(result.volumes[key], value, places=9)
        self._assertSegmentsMatchVolumes(node, result, volumes[0])
        self.delayDisplay("SegMamba in-process segmentation passed")

    def test_background_worker_matches_in_process_run(self):
        """The GUI's path (a worker process running Slicer's Python) gives the in-process result.

        Uses the demo model on a synthetic BraTS-like case when it is installed, else a small
        seeded SegMamba written to a temporary folder.
        """
        import numpy as np
        import torch
        from SegMambaSlicerLib.engine.pipeline import SegmentOptions
        from SegMambaSlicerLib.slicer.mrml import volume_node_from_image

        with tempfile.TemporaryDirectory() as folder:
            card, images = self._workerCase(folder)
            volumes = [volume_node_from_image(image, slicer.mrmlScene, channel.key)
                       for image, channel in zip(images, card.channels)]
            options = SegmentOptions(device="cpu", mixed_precision=False)
            logic = SegMambaSlicerLogic()
            run = logic.impl.start_segmentation(volumes, card, options, threads=torch.get_num_threads())
            while not run.finished:  # what the widget's timer does
                run.poll()
                time.sleep(0.05)
            node, result = logic.finish(run)
            reference_node, reference = logic.impl.segment_nodes(volumes, card, options)
        self.assertEqual(result.volumes, reference.volumes)
        segmentation = node.GetSegmentation()
        for index in range(segmentation.GetNumberOfSegments()):
            segment_id = segmentation.GetNthSegmentID(index)
            got = slicer.util.arrayFromSegmentBinaryLabelmap(node, segment_id, volumes[0])
            want = slicer.util.arrayFromSegmentBinaryLabelmap(reference_node, segment_id, volumes[0])
            np.testing.assert_array_equal(got, want)
        self._assertSegmentsMatchVolumes(node, result, volumes[0])
        self.delayDisplay(f"SegMamba background worker passed ({card.id}, {result.seconds:.1f} s)")

    def _workerCase(self, folder):
        """(card, images): the demo model and a phantom when available, else a tiny seeded SegMamba."""
        import json

        import numpy as np
        import SimpleITK as sitk
        import torch
        from SegMambaSlicerLib.evaluation.phantom import make_phantom
        from SegMambaSlicerLib.models.cards import load_card
        from SegMambaSlicerLib.networks import build_network

        demo = builtin_cards().get(DEMO_MODEL_ID)
        if demo is not None and demo.weights_path() is not None and demo.weights_path().is_file():
            case = make_phantom(shape=(64, 64, 48), seed=11)
            return demo, [case.images[channel.key] for channel in demo.channels]
        kwargs = {"in_chans": 1, "out_chans": 2, "depths": [1, 1, 1, 1], "feat_size": [48, 16, 16, 16],
                  "hidden_size": 32}
        torch.manual_seed(3)
        torch.save(build_network("segmamba_v1", **kwargs).state_dict(), os.path.join(folder, "tiny.pt"))
        with open(os.path.join(folder, "tiny.json"), "w") as stream:
            json.dump({"id": "tiny-segmamba", "architecture": {"name": "segmamba_v1", "kwargs": kwargs},
                       "channels": [{"key": "t1"}], "labels": [{"value": 1, "name": "Lesion", "color": [1, 0, 0]}],
                       "regions": [{"name": "ALL", "labels": [1], "color": [0, 0, 1]}],
                       "inference": {"roi_size": [32, 32, 32], "sw_batch_size": 1},
                       "weights": {"kind": "file", "file": "tiny.pt"}}, stream)
        image = sitk.GetImageFromArray((np.random.default_rng(0).random((20, 28, 30)) * 100 + 1).astype(np.float32))
        image.SetSpacing((0.9, 1.1, 1.7))
        return load_card(os.path.join(folder, "tiny.json")), [image]

    def _assertSegmentsMatchVolumes(self, node, result, referenceVolume):
        """Every segment's voxel count times the voxel volume equals the volumes table."""
        import numpy as np
        from SegMambaSlicerLib.slicer.logic import volume_rows

        voxel_ml = float(np.prod(referenceVolume.GetSpacing())) / 1000.0
        for row in volume_rows(result):
            mask = slicer.util.arrayFromSegmentBinaryLabelmap(node, row.segment_id, referenceVolume)
            self.assertAlmostEqual(int(np.count_nonzero(mask)) * voxel_ml, row.volume_ml, places=9)

"""3D Slicer module: SegMamba, SegMamba-V2 and MambaClinix segmentation.

Thin by design: the widget wires the .ui to the parameter node and copies results into widgets. Work
and every decision that can be made without Qt live in SegMambaSlicerLib.slicer (tested headless with
pytest): segmentation and review (logic.py), panel texts and lists (panels.py), and the first-run
install (install.py decides, install_flow.py asks and installs through Slicer's own calls), and the
self-test's cases and checks (self_test.py). Nothing here imports torch at module load, so the module
opens before PyTorch is installed and can offer to install it.

The per-channel input selectors are created in code inside ``inputVolumesWidget``, because their
number and labels come from the selected model card.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

try:
    from slicer.i18n import tr as _
except ImportError:  # slicer-core (the headless test environment) has no translations

    def _(text):
        return text


#: The user guide; the repository URL is EXTENSION_HOMEPAGE in CMakeLists.txt (the one place to fill it in).
DOCUMENTATION_URL = "https://github.com/SegMambaSlicer/SegMambaSlicer/blob/main/docs/user-guide.md"
#: Slicer 5.10 bundles Python 3.12; Slicer 5.8 and older (Python 3.9) cannot run the library.
MINIMUM_SLICER = (5, 10)
SUPPORTED = sys.version_info >= (3, 10)

sys.path.insert(0, os.path.dirname(__file__))

if SUPPORTED:  # the library needs Python 3.10; on an older Slicer the module says so instead of failing
    from SegMambaSlicerLib.errors import SegMambaError
    from SegMambaSlicerLib.models.cards import DEMO_MODEL_ID, match_channels
    from SegMambaSlicerLib.slicer import install, panels
    from SegMambaSlicerLib.slicer.install_flow import REQUESTER, InstallFlow, slicer_install_actions


def unsupportedSlicerMessage(slicerVersion, pythonVersion):
    """What the module shows on a Slicer too old for it (None when the Slicer is supported)."""
    if tuple(pythonVersion[:2]) >= (3, 10) and tuple(slicerVersion[:2]) >= MINIMUM_SLICER:
        return None
    return _("SegMamba needs 3D Slicer {minimum} or newer; this is Slicer {version}. Install a current Slicer "
             "from download.slicer.org.").format(minimum="{}.{}".format(*MINIMUM_SLICER),
                                                  version="{}.{}".format(*slicerVersion[:2]))


class SegMambaSlicer(ScriptedLoadableModule):
    """Module description shown in Slicer."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        parent.title = _("SegMamba")
        parent.categories = [_("Segmentation")]
        parent.contributors = ["SegMambaSlicer contributors"]
        parent.helpText = _(
            "Segment brain tumors and other structures with SegMamba, SegMamba-V2 and MambaClinix "
            "networks on this computer (GPU if available, CPU otherwise). Research use only."
        ) + f' <a href="{DOCUMENTATION_URL}">' + _("User guide") + "</a>"
        parent.acknowledgementText = _(
            "Networks: SegMamba (Xing et al., MICCAI 2024), SegMamba-V2 (Xing et al., IEEE TMI 2025), "
            "MambaClinix (Bian et al., 2024). Reimplemented in pure PyTorch from their published descriptions."
        )
        if SUPPORTED:
            slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """Offer the synthetic BraTS-like case in the Sample Data module (generated on first use, then cached)."""
    from SegMambaSlicerLib.slicer.sample_data import register_sample_data

    register_sample_data(os.path.join(os.path.dirname(__file__), "Resources", "Icons", "SegMambaSlicer.png"))


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
    cpuThreads: Annotated[int, WithinRange(0, 256)] = 0  # 0: all cores but one (the worker's default)
    workerIdleMinutes: Annotated[int, WithinRange(0, 1440)] = 10  # 0: the worker ends after each run
    lowMemory: bool = False
    show3D: bool = True
    showConfidence: bool = True
    confidenceThreshold: Annotated[float, WithinRange(0.0, 1.0)] = 0.5


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
        self._reportInputs = None
        self._comparison = None
        self._install = None
        self._cudaUsable = False
        self._kernelBuild = None
        self._ready = False

    # ------------------------------------------------------------------ setup and scene

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        message = unsupportedSlicerMessage((slicer.app.majorVersion, slicer.app.minorVersion), sys.version_info)
        if message:
            self.layout.addWidget(qt.QLabel(message))
            return
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SegMambaSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SegMambaSlicerLogic()
        self._install = InstallFlow(slicer_install_actions(self._log, self._showError),
                                    on_installed=self._refreshEnvironment)
        self.ui.inputVolumesWidget.setLayout(qt.QFormLayout())
        self.ui.volumesTable.horizontalHeader().setStretchLastSection(True)
        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.connect("timeout()", self._onTimer)
        self._kernelTimer = qt.QTimer()
        self._kernelTimer.setInterval(1000)
        self._kernelTimer.connect("timeout()", self._onKernelTimer)
        self._estimateTimer = qt.QTimer()  # one refresh after a burst of changes, once the parameter node has them
        self._estimateTimer.setSingleShot(True)
        self._estimateTimer.setInterval(100)
        self._estimateTimer.connect("timeout()", self._updateEstimate)

        self.ui.modelSelector.connect("currentIndexChanged(int)", self._onModelChanged)
        self.ui.deviceSelector.connect("currentIndexChanged(int)", self._onDeviceChanged)
        self.ui.loadCheckpointButton.connect("clicked(bool)", self._onLoadCheckpoint)
        self.ui.loadSampleButton.connect("clicked(bool)", self._onLoadSample)
        self.ui.installDependenciesButton.connect("clicked(bool)", self._install.ensure)
        self.ui.installKernelsButton.connect("clicked(bool)", self._onInstallKernels)
        self.ui.segmentButton.connect("clicked(bool)", self._onSegmentButton)
        self.ui.showRegionsRadioButton.connect("toggled(bool)", self._onDisplayModeChanged)
        self.ui.show3DCheckBox.connect("toggled(bool)", self._onShow3DChanged)
        self.ui.saveReportButton.connect("clicked(bool)", self._onSaveReport)
        self.ui.exportDicomSegButton.connect("clicked(bool)", self._onExportDicomSeg)
        self.ui.showConfidenceCheckBox.connect("toggled(bool)", self._onShowConfidenceChanged)
        self.ui.confidenceThresholdSpinBox.connect("valueChanged(double)", self._onConfidenceThresholdChanged)
        self.ui.priorSelector.connect("currentNodeChanged(vtkMRMLNode*)", self._onPriorChanged)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self._onNodeAdded)
        self.initializeParameterNode()
        self._refreshEnvironment()

    def cleanup(self):
        """Called when the application closes: stop a running worker, end the warm one, drop observers."""
        if self._run is not None:
            self._run.cancel()
            self._run = None
        if self.logic is None:  # an unsupported Slicer: setup() built nothing
            return
        self.logic.releaseWorker()
        self._timer.stop()
        self._kernelTimer.stop()
        self._estimateTimer.stop()
        self.removeObservers()

    def enter(self):
        if self.logic is not None:
            self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event):
        if self._run is not None:
            self._run.cancel()
            self._endRun(_("Cancelled: the scene was closed."))
        self.setParameterNode(None)
        self._result = self._resultNode = self._comparison = self._reportInputs = None
        self.ui.saveReportButton.enabled = self.ui.exportDicomSegButton.enabled = False

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
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._scheduleEstimate)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._scheduleEstimate)
            self._selectData(self.ui.modelSelector, self._parameterNode.modelId)
            self._selectData(self.ui.deviceSelector, self._parameterNode.device)

    def _scheduleEstimate(self, *unused):
        """An input, the model, the device or a run option changed: refresh the estimate shortly (once for a
        burst of changes, and after the parameter node has taken them)."""
        self._estimateTimer.start()

    # ------------------------------------------------------------------ dependencies and environment

    def _refreshEnvironment(self):
        """Show the install banner, or the models and devices once the packages are there."""
        plan = self._install.plan()
        self._ready = not plan.needed
        self.ui.dependenciesFrame.setVisible(plan.needed)
        if plan.needed:
            self.ui.dependenciesLabel.text = install.describe_missing(plan)
        self._populateModels(ready=not plan.needed)
        self._populateDevices(ready=not plan.needed)

    def _onInstallKernels(self):
        self._kernelBuild = self._install.install_kernels(self._cudaUsable)
        if self._kernelBuild is not None:  # pip runs in the background; poll it without blocking Slicer
            self.ui.installKernelsButton.enabled = False
            self._kernelTimer.start()

    def _onKernelTimer(self):
        if self._kernelBuild.poll() is None:
            return
        self._kernelTimer.stop()
        self._install.finish_kernels(self._kernelBuild)
        self._kernelBuild = None
        self.ui.installKernelsButton.enabled = True
        self._refreshEnvironment()

    def _populateDevices(self, ready):
        panel = panels.device_panel(ready)
        self._cudaUsable = panel.cuda_usable
        saved = self._parameterNode.device if self._parameterNode else None
        panels.refill_combo(self.ui.deviceSelector, panel.choices, saved)
        self.ui.deviceInfoLabel.text = panel.info
        self.ui.installKernelsButton.setVisible(bool(self._install.kernel_offer(panel.cuda_usable)))

    # ------------------------------------------------------------------ model and inputs

    def _populateModels(self, ready):
        """All registered models once the packages are in place; the built-in cards before that."""
        self._cards, warning = panels.model_cards(ready)
        if warning:
            self._log(warning)
        saved = self._parameterNode.modelId if self._parameterNode else None
        panels.refill_combo(self.ui.modelSelector, [(c.id, c.display_name) for c in self._cards.values()], saved)
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
        self.ui.modelInfoLabel.text = panels.model_info_text(card)
        self._buildInputSelectors(card)
        self._autoFillInputs(onlyEmpty=False)
        self._scheduleEstimate()

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
            selector.toolTip = _("Volume for the model's {channel} input.").format(channel=channel.display_name)
            layout.addRow(f"{channel.display_name}:", selector)
            selector.connect("currentNodeChanged(vtkMRMLNode*)", self._scheduleEstimate)
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
        self._scheduleEstimate()

    def _onLoadCheckpoint(self):
        path = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(), _("Load checkpoint"), "", _("PyTorch checkpoints") + " (*.pt *.pth)")
        if not path or not self._install.ensure():
            return
        from SegMambaSlicerLib.models.registry import import_weights

        try:
            with slicer.util.WaitCursor():
                card = import_weights(path, like=self.ui.modelSelector.currentData)
        except SegMambaError as exc:
            self._showError(_("Cannot use {file}.").format(file=os.path.basename(path)), exc)
            return
        self._log(_("Imported {path} as model {id} ({name}).").format(path=path, id=card.id, name=card.display_name))
        self._parameterNode.modelId = card.id
        self._populateModels(ready=True)

    def _onLoadSample(self):
        with slicer.util.tryWithErrorDisplay(_("Cannot create the sample case."), waitCursor=True):
            self.logic.loadSampleCase()
        self._autoFillInputs(onlyEmpty=False)

    # ------------------------------------------------------------------ running

    def _onSegmentButton(self):
        if self._run is not None:
            self._run.cancel()
            self._endRun(_("Cancelled."))
            return
        if not self._install.ensure():
            return
        card = self._card()
        nodes = [selector.currentNode() for selector in self._inputSelectors]
        estimate = self._updateEstimate()
        if estimate is not None and estimate.shortfall and not slicer.util.confirmOkCancelDisplay(
                _("{warning}\n\nSegment anyway?").format(warning=estimate.shortfall),
                windowTitle=_("Not enough memory")):
            return
        try:
            options = panels.segment_options(self._parameterNode)
            self._run = self.logic.start(nodes, card, options, self._parameterNode.outputSegmentation,
                                         threads=self._parameterNode.cpuThreads or None,
                                         idleTimeout=60.0 * self._parameterNode.workerIdleMinutes)
        except Exception as exc:  # noqa: BLE001 - shown to the user, with the traceback when unexpected
            self._showError(_("Cannot start the segmentation."), exc)
            return
        self._log(_("Segmenting {inputs} with {model}…").format(inputs=", ".join(n.GetName() for n in nodes), model=card.display_name))
        self.ui.segmentButton.text = _("Cancel")
        self.ui.progressBar.value = 0
        self.ui.progressBar.setFormat(_("Starting…"))
        self._timer.start()

    def _onTimer(self):
        for update in self._run.updates():
            if update.log:
                self._log(update.log)
            else:
                self.ui.progressBar.value = update.value
                self.ui.progressBar.setFormat(update.text)
        if self._run.finished:
            self._finishRun()

    def _finishRun(self):
        run = self._run
        self._timer.stop()
        try:
            node, result = self.logic.finish(run)
        except Exception as exc:  # noqa: BLE001 - shown to the user, with the traceback when unexpected
            self._endRun(_("Failed."))
            self._showError(_("Segmentation failed."), exc)
            return
        for warning in result.warnings:
            self._log(_("Warning: {warning}").format(warning=warning))
        self._endRun(panels.finished_status(result))
        self._parameterNode.outputSegmentation = node
        self._reportInputs = (list(run.input_nodes), run.worker.options)
        self.ui.saveReportButton.enabled = self.ui.exportDicomSegButton.enabled = True
        self._showResult(node, result, run.input_nodes[0])

    def _endRun(self, status):
        self._timer.stop()
        self._run = None
        self.ui.segmentButton.text = _("Segment")
        self.ui.progressBar.setFormat(status)
        self.ui.statusLabel.text = status
        self._log(status)
        self._scheduleEstimate()  # a finished run has measured this computer's speed

    def _updateEstimate(self):
        """Show the estimate of a run with the current inputs, model and options next to the Segment button."""
        if self._run is not None:  # the progress bar tells the time left; the estimate returns afterwards
            return None
        card = self._card()
        if not self._ready or card is None or self._parameterNode is None:
            self.ui.estimateLabel.text = ""
            return None
        nodes = [selector.currentNode() for selector in self._inputSelectors]
        parameters = self._parameterNode
        shown = panels.estimate_panel(lambda: self.logic.estimate(
            nodes, card, panels.segment_options(parameters), threads=parameters.cpuThreads or None))
        self.ui.estimateLabel.text = shown.text
        return shown

    # ------------------------------------------------------------------ review

    def _showResult(self, node, result, referenceNode):
        from SegMambaSlicerLib.slicer.logic import show_regions, show_surfaces

        self._result, self._resultNode = result, node
        show_regions(node, result.card, self.ui.showRegionsRadioButton.checked)
        show_surfaces(node, self._parameterNode.show3D)
        slicer.util.setSliceViewerLayers(background=referenceNode, fit=True)
        self._onShowConfidenceChanged(self._parameterNode.showConfidence)
        self._onPriorChanged(self.ui.priorSelector.currentNode())

    def _fillReviewTable(self):
        """Copy the review table (volumes, low confidence, change against the prior) and its notes."""
        if self._result is None:
            return
        from SegMambaSlicerLib.slicer.review import review_table

        shown = review_table(self._result, self.ui.confidenceThresholdSpinBox.value, self._comparison)
        table = self.ui.volumesTable
        table.setColumnCount(len(shown.headers))
        table.setHorizontalHeaderLabels(list(shown.headers))
        table.setRowCount(len(shown.rows))
        for index, row in enumerate(shown.rows):
            name = qt.QTableWidgetItem(row.name)
            if row.color is not None:
                name.setBackground(qt.QBrush(qt.QColor.fromRgbF(*row.color)))
            table.setItem(index, 0, name)
            for column, cell in enumerate(row.cells, start=1):
                table.setItem(index, column, qt.QTableWidgetItem(cell))
        self.ui.reviewNotesLabel.text = "\n".join(shown.notes)

    def _onSaveReport(self):
        path = qt.QFileDialog.getSaveFileName(slicer.util.mainWindow(), _("Save report"), "report.pdf", "PDF (*.pdf)")
        if not path or self._result is None:
            return
        from SegMambaSlicerLib.slicer.logic import write_report

        with slicer.util.tryWithErrorDisplay(_("Cannot save the report."), waitCursor=True):
            self._log(_("Report: {path}").format(path=write_report(path, self._result, *self._reportInputs)))

    def _onExportDicomSeg(self):
        path = qt.QFileDialog.getSaveFileName(slicer.util.mainWindow(), _("Export DICOM SEG"), "seg.dcm",
                                              "DICOM (*.dcm)")
        if not path or self._result is None:
            return
        from SegMambaSlicerLib.slicer.logic import write_dicom_segmentation

        with slicer.util.tryWithErrorDisplay(_("Cannot export the DICOM segmentation."), waitCursor=True):
            written = write_dicom_segmentation(path, self._result, self._reportInputs[0][0],
                                               slicer.dicomDatabase.fileForInstance)
            self._log(_("DICOM segmentation: {path}").format(path=written))

    def _onDisplayModeChanged(self, regions):
        if self._resultNode is not None:
            from SegMambaSlicerLib.slicer.logic import show_regions

            show_regions(self._resultNode, self._result.card, regions)

    def _onShow3DChanged(self, visible):
        if self._resultNode is not None:
            from SegMambaSlicerLib.slicer.logic import show_surfaces

            show_surfaces(self._resultNode, visible)

    def _onShowConfidenceChanged(self, visible):
        if self._resultNode is not None:
            from SegMambaSlicerLib.slicer.logic import show_confidence

            show_confidence(self._resultNode, visible, self.ui.confidenceThresholdSpinBox.value)

    def _onConfidenceThresholdChanged(self, threshold):
        self._onShowConfidenceChanged(self.ui.showConfidenceCheckBox.checked)
        self._fillReviewTable()

    def _onPriorChanged(self, priorNode):
        """Measure the chosen prior against the shown result (once per choice: lesions take a moment)."""
        self._comparison = None
        if self._result is not None and priorNode is not None:
            from SegMambaSlicerLib.slicer.logic import prior_comparison

            try:
                with slicer.util.WaitCursor():
                    self._comparison = prior_comparison(self._result, priorNode)
            except Exception as exc:  # noqa: BLE001 - shown to the user, with the traceback when unexpected
                self._showError(_("Cannot compare with {prior}.").format(prior=priorNode.GetName()), exc)
        self._fillReviewTable()

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
        from SegMambaSlicerLib.slicer.sample_data import load_sample_case

        return load_sample_case()

    def segmentNodeGroups(self, groups, card, options=None, progress=None, cancel=None):
        """Segment several cases already loaded, e.g. ``[[t2w1, t2f1, t1n1, t1c1], [t2w2, ...]]``; returns nodes."""
        return [node for node, _ in self.impl.segment_node_groups(groups, card, options, progress, cancel)]

    def segmentFolder(self, inputDir, outputDir, model, options=None, **kwargs):
        """Segment every case of a folder to files (see docs/batch.md); returns the batch result."""
        from SegMambaSlicerLib.run.batch import segment_folder

        return segment_folder(inputDir, outputDir, model, options, **kwargs)

    def start(self, inputNodes, card, options=None, segmentationNode=None, threads=None, idleTimeout=None):
        """Start a background segmentation; poll the returned run, then call :meth:`finish`.

        ``threads`` (CPU threads of the worker) None leaves one core free for Slicer. The worker process
        stays warm, with the network loaded, for ``idleTimeout`` seconds after the run (None: unchanged).
        """
        return self.impl.start_segmentation(inputNodes, card, options, segmentationNode, threads=threads,
                                            idle_timeout=idleTimeout)

    def estimate(self, inputNodes, card, options=None, threads=None):
        """Windows, time and peak memory of a background run of these volumes (see docs/user-guide.md)."""
        return self.impl.estimate(inputNodes, card, options, threads=threads)

    def releaseWorker(self):
        """End the warm worker process now, giving back the memory its network holds (no-op before a run)."""
        if self._impl is not None:
            self._impl.worker.release()

    def finish(self, run):
        """Import a finished run's result; returns (segmentation node, result) or raises its error."""
        return self.impl.finish_segmentation(run)


class SegMambaSlicerTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer (and headless under pytest): synthetic cases through the real logic.

    The cases and checks live in SegMambaSlicerLib.slicer.self_test, beside the logic they check.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        from SegMambaSlicerLib.slicer.self_test import skip_reason

        reason = skip_reason()
        if reason:
            logging.info(reason)
            self.delayDisplay(reason)
            return
        self.setUp()
        self.test_logic_writes_named_segments_and_volumes()
        self.setUp()
        self.test_background_worker_matches_in_process_run()

    def test_logic_writes_named_segments_and_volumes(self):
        """A fixed-weight network whose answer is known: label 3 exactly where channel 0 is brightest."""
        from SegMambaSlicerLib.slicer.self_test import check_in_process

        self.delayDisplay(check_in_process(self, SegMambaSlicerLogic()))

    def test_background_worker_matches_in_process_run(self):
        """The GUI's path (a worker process running Slicer's Python) gives the in-process result."""
        from SegMambaSlicerLib.slicer.self_test import check_worker

        self.delayDisplay(check_worker(self, SegMambaSlicerLogic(), DEMO_MODEL_ID))

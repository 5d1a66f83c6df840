"""MNSegment: few-label 3D segmentation (M&N co-training of a pretrained 2D network and a 3D network).

Thin Slicer module: the widget only collects the user's choices and calls one method of the logic
(``MNSegmentSlicerLib``, Qt-free and tested in CI with slicer-core). Training runs in a background process;
a QTimer polls its events, so the UI never blocks.
"""

import logging
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import qt
import slicer
from MNSegmentSlicerLib import job as jobs
from MNSegmentSlicerLib import progress
from MNSegmentSlicerLib.logic import NETWORKS, PRESETS, gpu_info
from MNSegmentSlicerLib.logic import MNSegmentLogic as SceneLogic
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

POLL_INTERVAL_MS = 250


#
# Module
#
class MNSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MNSegment"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["MNSegment contributors"]
        self.parent.helpText = """
Segment many volumes from a few labeled ones. Label a few volumes with the Segment Editor, pair them here with
their volumes, check the unlabeled volumes, and press Train: a 2D network pretrained on natural images and a 3D
network teach each other on the unlabeled volumes (M&N co-training), in a background process. When training ends,
every unlabeled volume gets a segmentation. Segment applies a trained model to other volumes.
See <a href="https://github.com/mnsegment/MNSegment">the documentation</a>.
"""
        self.parent.acknowledgementText = """
Implements the method of "Semi-Supervised 3D Medical Segmentation from 2D Natural Images Pretrained Model"
(Yeung, Ramesh, Lyu, Namburete, Rajapakse; MLMI 2025). Uses PyTorch, MONAI, timm and PEFT.
"""


#
# Parameter node
#
@parameterNodeWrapper
class MNSegmentParameterNode:
    preset: Annotated[str, Choice(list(PRESETS))] = "quick"
    device: Annotated[str, Choice(["auto", "gpu", "cpu"])] = "auto"
    backbone2d: str = ""
    network3d: str = ""
    steps: int = 0
    batchSize: int = 0
    patchSize: str = ""
    lrgMode: Annotated[str, Choice(list(progress.LRG_MODES))] = "preset"
    network: Annotated[str, Choice(list(NETWORKS))] = "3d"
    outputFolder: str = ""
    modelFolder: str = ""
    weights2d: str = ""
    # Lists have no GUI connector: the widget syncs them by hand.
    labeledVolumes: list[vtkMRMLScalarVolumeNode]
    labeledSegmentations: list[vtkMRMLSegmentationNode]
    uncheckedVolumes: list[vtkMRMLScalarVolumeNode]


#
# Logic
#
class MNSegmentLogic(ScriptedLoadableModuleLogic, SceneLogic):
    """Slicer flavour of :class:`MNSegmentSlicerLib.logic.MNSegmentLogic` (uses ``slicer.mrmlScene``).

    From the Python console::

        logic = slicer.util.getModuleLogic("MNSegment")
        job = logic.train([(vol, seg)], [other], preset="quick")   # returns at once; job.status, job.cancel()
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        SceneLogic.__init__(self, scene=None)
        self._pollTimers = {}

    def _run(self, *args, **kwargs):
        """Start a job; a job that keeps running is polled by a QTimer on the GUI thread, so that its callbacks
        run and its segmentations are loaded even when it was started from the Python console."""
        job = super()._run(*args, **kwargs)
        if job.running:
            timer = qt.QTimer()
            timer.setInterval(POLL_INTERVAL_MS)

            def tick():
                if job.poll() not in (jobs.PENDING, jobs.RUNNING):
                    timer.stop()
                    self._pollTimers.pop(id(job), None)

            timer.timeout.connect(tick)
            self._pollTimers[id(job)] = timer
            timer.start()
        return job

    def getParameterNode(self):
        return MNSegmentParameterNode(super().getParameterNode())

    @staticmethod
    def overridesFromParameterNode(p) -> dict:
        return progress.settings_overrides(
            steps=p.steps, batch_size=p.batchSize, patch_size=p.patchSize, lrg_mode=p.lrgMode,
            backbone_2d=p.backbone2d, weights_2d=p.weights2d, network_3d=p.network3d,
        )


#
# Widget
#
class MNSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.job = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._syncing = False

    # ---------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MNSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MNSegmentLogic()

        self.pollTimer = qt.QTimer()
        self.pollTimer.setInterval(POLL_INTERVAL_MS)
        self.pollTimer.timeout.connect(self.onPollJob)
        self.listTimer = qt.QTimer()  # coalesces scene changes into one list refresh
        self.listTimer.setSingleShot(True)
        self.listTimer.setInterval(300)
        self.listTimer.timeout.connect(self.refreshUnlabeledList)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.onSceneNodesChanged)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeRemovedEvent, self.onSceneNodesChanged)
        slicer.app.connect("aboutToQuit()", self.onAboutToQuit)

        self.ui.labeledTable.horizontalHeader().setSectionResizeMode(qt.QHeaderView.Stretch)
        self.ui.addLabeledButton.clicked.connect(lambda: self.addLabeledRow())
        self.ui.removeLabeledButton.clicked.connect(self.onRemoveLabeledRow)
        self.ui.pairSegmentationsButton.clicked.connect(self.onPairSegmentations)
        self.ui.selectAllButton.clicked.connect(lambda: self.setAllChecked(True))
        self.ui.selectNoneButton.clicked.connect(lambda: self.setAllChecked(False))
        self.ui.unlabeledList.itemChanged.connect(self.onUnlabeledItemChanged)
        self.ui.trainButton.clicked.connect(self.onTrainOrCancel)
        self.ui.resumeButton.clicked.connect(self.onResume)
        self.ui.segmentButton.clicked.connect(self.onSegment)
        self.ui.outputPathLineEdit.currentPathChanged.connect(lambda path: self._setParameter("outputFolder", path))
        self.ui.modelPathLineEdit.currentPathChanged.connect(lambda path: self._setParameter("modelFolder", path))
        self.ui.weights2dPathLineEdit.currentPathChanged.connect(lambda path: self._setParameter("weights2d", path))

        self.showGpuInfo()
        self.initializeParameterNode()
        self.updateButtons()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        self.cancelJobs()
        self.pollTimer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        self.refreshUnlabeledList()

    def exit(self) -> None:
        if self._parameterNode and self._parameterNodeGuiTag is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    # ----------------------------------------------------------------------------------- scene life
    def onSceneStartClose(self, caller, event) -> None:
        self.cancelJobs()
        self.setParameterNode(None)
        self.ui.labeledTable.setRowCount(0)
        self.ui.unlabeledList.clear()

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onAboutToQuit(self) -> None:
        self.cancelJobs()

    def onSceneNodesChanged(self, caller, event) -> None:
        if not slicer.mrmlScene.IsClosing() and not slicer.mrmlScene.IsBatchProcessing():
            self.listTimer.start()

    def cancelJobs(self) -> None:
        if self.logic is not None:
            self.logic.cancel_all()

    # ------------------------------------------------------------------------------- parameter node
    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode and self._parameterNodeGuiTag is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self._syncing = True
            try:
                self.ui.outputPathLineEdit.currentPath = self._parameterNode.outputFolder
                self.ui.modelPathLineEdit.currentPath = self._parameterNode.modelFolder
                self.ui.weights2dPathLineEdit.currentPath = self._parameterNode.weights2d
                self.ui.labeledTable.setRowCount(0)
                for volume, segmentation in zip(self._parameterNode.labeledVolumes,
                                                self._parameterNode.labeledSegmentations, strict=False):
                    self.addLabeledRow(volume, segmentation)
            finally:
                self._syncing = False
            self.refreshUnlabeledList()

    def _setParameter(self, name, value) -> None:
        if self._parameterNode and not self._syncing:
            setattr(self._parameterNode, name, value)

    # -------------------------------------------------------------------------------- labeled table
    def addLabeledRow(self, volume=None, segmentation=None) -> None:
        table = self.ui.labeledTable
        row = table.rowCount
        table.insertRow(row)
        volumeSelector = self._nodeSelector(["vtkMRMLScalarVolumeNode"], volume)
        volumeSelector.showChildNodeTypes = False  # no label maps
        table.setCellWidget(row, 0, volumeSelector)
        table.setCellWidget(row, 1, self._nodeSelector(["vtkMRMLSegmentationNode"], segmentation))
        self.onLabeledChanged()

    def _nodeSelector(self, nodeTypes, node):
        selector = slicer.qMRMLNodeComboBox()
        selector.nodeTypes = nodeTypes
        selector.addEnabled = False
        selector.removeEnabled = False
        selector.noneEnabled = True
        selector.setMRMLScene(slicer.mrmlScene)
        selector.setCurrentNode(node)
        selector.currentNodeChanged.connect(lambda _node: self.onLabeledChanged())
        return selector

    def onRemoveLabeledRow(self) -> None:
        table = self.ui.labeledTable
        row = table.currentRow() if table.currentRow() >= 0 else table.rowCount - 1
        if row >= 0:
            table.removeRow(row)
            self.onLabeledChanged()

    def onPairSegmentations(self) -> None:
        with slicer.util.tryWithErrorDisplay("Could not pair the segmentations.", waitCursor=True):
            present = {seg.GetID() for _vol, seg in self.labeledPairs(complete=False) if seg is not None}
            for volume, segmentation in self.logic.pair_segmentations():
                if segmentation.GetID() not in present:
                    self.addLabeledRow(volume, segmentation)

    def labeledPairs(self, complete=True) -> list:
        pairs = []
        table = self.ui.labeledTable
        for row in range(table.rowCount):
            volume = table.cellWidget(row, 0).currentNode()
            segmentation = table.cellWidget(row, 1).currentNode()
            if not complete or (volume is not None and segmentation is not None):
                pairs.append((volume, segmentation))
        return pairs

    def onLabeledChanged(self) -> None:
        if self._parameterNode and not self._syncing:
            pairs = self.labeledPairs()
            self._parameterNode.labeledVolumes = [v for v, _s in pairs]
            self._parameterNode.labeledSegmentations = [s for _v, s in pairs]
        self.refreshUnlabeledList()
        self.updateButtons()

    # ------------------------------------------------------------------------------- unlabeled list
    def refreshUnlabeledList(self) -> None:
        if self.logic is None or slicer.mrmlScene.IsClosing():
            return
        unchecked = {n.GetID() for n in (self._parameterNode.uncheckedVolumes if self._parameterNode else [])}
        widget = self.ui.unlabeledList
        self._syncing = True
        try:
            widget.clear()
            for volume in self.logic.unlabeled_candidates(self.labeledPairs(complete=False)):
                item = qt.QListWidgetItem(volume.GetName())
                item.setData(qt.Qt.UserRole, volume.GetID())
                item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
                item.setCheckState(qt.Qt.Unchecked if volume.GetID() in unchecked else qt.Qt.Checked)
                widget.addItem(item)
        finally:
            self._syncing = False
        self.updateButtons()

    def onUnlabeledItemChanged(self, item) -> None:
        if self._syncing or not self._parameterNode:
            return
        unchecked = []
        for row in range(self.ui.unlabeledList.count):
            it = self.ui.unlabeledList.item(row)
            if it.checkState() != qt.Qt.Checked:
                node = slicer.mrmlScene.GetNodeByID(it.data(qt.Qt.UserRole))
                if node is not None:
                    unchecked.append(node)
        self._parameterNode.uncheckedVolumes = unchecked
        self.updateButtons()

    def setAllChecked(self, checked: bool) -> None:
        widget = self.ui.unlabeledList
        for row in range(widget.count):
            widget.item(row).setCheckState(qt.Qt.Checked if checked else qt.Qt.Unchecked)

    def checkedVolumes(self) -> list:
        volumes = []
        for row in range(self.ui.unlabeledList.count):
            item = self.ui.unlabeledList.item(row)
            if item.checkState() == qt.Qt.Checked:
                node = slicer.mrmlScene.GetNodeByID(item.data(qt.Qt.UserRole))
                if node is not None:
                    volumes.append(node)
        return volumes

    # -------------------------------------------------------------------------------------- actions
    def showGpuInfo(self) -> None:
        gpus = gpu_info()
        if gpus:
            self.ui.gpuLabel.text = "; ".join(f"GPU {g['index']}: {g['name']}, {g['memory_gb']:.0f} GB" for g in gpus)
        else:
            self.ui.gpuLabel.text = "No NVIDIA GPU found: training runs on the CPU (slow)."

    def _callbacks(self) -> dict:
        return {"on_progress": self.onJobProgress, "on_log": self.onJobLog, "on_phase": self.onJobPhase}

    def onTrainOrCancel(self) -> None:
        if self.job is not None and self.job.running:
            with slicer.util.tryWithErrorDisplay("Could not cancel the training.", waitCursor=True):
                self.ui.statusLabel.text = "Cancelling (saving a checkpoint)..."
                slicer.app.processEvents()
                self.job.cancel()
            self.onPollJob()
            return
        with slicer.util.tryWithErrorDisplay("Training could not start.", waitCursor=True):
            p = self._parameterNode
            self.ui.logTextEdit.clear()
            job = self.logic.train(
                self.labeledPairs(), self.checkedVolumes(), output_dir=p.outputFolder or None, preset=p.preset,
                device=p.device, network=p.network, wait=False,
                **self._callbacks(), **self.logic.overridesFromParameterNode(p),
            )
            self.startMonitoring(job, "Training")

    def onResume(self) -> None:
        with slicer.util.tryWithErrorDisplay("Training could not be resumed.", waitCursor=True):
            folder = self._parameterNode.outputFolder
            if not folder:
                raise ValueError("Choose the output folder of the interrupted training.")
            self.ui.logTextEdit.clear()
            self.startMonitoring(self.logic.resume(folder, wait=False, **self._callbacks()), "Resuming")

    def onSegment(self) -> None:
        with slicer.util.tryWithErrorDisplay("Segmentation failed.", waitCursor=True):
            p = self._parameterNode
            if not p.modelFolder:
                raise ValueError("Choose the folder of a trained model.")
            self.ui.logTextEdit.clear()
            job = self.logic.segment(self.checkedVolumes(), p.modelFolder, wait=False, network=p.network,
                                     device=p.device, on_log=self.onJobLog)
            self.startMonitoring(job, "Segmenting")

    # ----------------------------------------------------------------------------------- monitoring
    def startMonitoring(self, job, what: str) -> None:
        self.job = job
        if job.folder is not None and what != "Segmenting":
            self._parameterNode.outputFolder = str(job.folder)  # so that Resume continues this job
            self.ui.outputPathLineEdit.currentPath = str(job.folder)
        self.ui.progressBar.setRange(0, 0)
        self.ui.statusLabel.text = f"{what}: starting the engine..."
        self.ui.metricsLabel.text = ""
        self.pollTimer.start()
        self.onPollJob()

    def onPollJob(self) -> None:
        job = self.job
        if job is None:
            self.pollTimer.stop()
            return
        try:
            job.poll()
        except Exception as error:  # keep the timer from raising forever
            logging.exception("MNSegment: error while reading the engine's output")
            job.cancel()
            job.error = str(error)
        if not job.running:
            self.pollTimer.stop()
            self.onJobEnded(job)
        self.updateButtons()

    def onJobPhase(self, job, name) -> None:
        if name == "predict":
            self.ui.progressBar.setRange(0, 0)
            self.ui.statusLabel.text = "Segmenting the unlabeled volumes..."

    def onJobProgress(self, job, event) -> None:
        status, metrics, step, total = progress.describe_progress(event)
        if total > 0:
            self.ui.progressBar.setRange(0, total)
            self.ui.progressBar.setValue(step)
        self.ui.statusLabel.text = status
        self.ui.metricsLabel.text = metrics

    def onJobLog(self, job, line) -> None:
        self.ui.logTextEdit.appendPlainText(line)

    def onJobEnded(self, job) -> None:
        self.ui.progressBar.setRange(0, 1)
        if job.status == jobs.DONE:
            nodes = job.result or []
            self.ui.progressBar.setValue(1)
            self.ui.statusLabel.text = f"Done: {len(nodes)} segmentation(s) added. Model: {job.folder}"
            if nodes:
                volume = nodes[0].GetNodeReference(nodes[0].GetReferenceImageGeometryReferenceRole())
                slicer.util.setSliceViewerLayers(background=volume, fit=True)
            if job.phases[0].name == "train":
                self._parameterNode.modelFolder = str(job.folder)
                self.ui.modelPathLineEdit.currentPath = str(job.folder)
                self._parameterNode.outputFolder = ""  # the next Train starts a new job folder
                self.ui.outputPathLineEdit.currentPath = ""
        elif job.status == jobs.CANCELLED:
            self.ui.progressBar.setValue(0)
            self.ui.statusLabel.text = "Cancelled. Resume continues from the last checkpoint."
        else:
            self.ui.progressBar.setValue(0)
            self.ui.statusLabel.text = "Failed (see the log below)."
            slicer.util.errorDisplay(job.error or "The engine failed.", windowTitle="MNSegment")

    def updateButtons(self) -> None:
        running = self.job is not None and self.job.running
        self.ui.trainButton.text = "Cancel" if running else "Train"
        self.ui.trainButton.enabled = running or bool(self.labeledPairs())
        self.ui.resumeButton.enabled = not running
        self.ui.segmentButton.enabled = not running and bool(self.checkedVolumes())
        for widget in (self.ui.labeledCollapsibleButton, self.ui.unlabeledCollapsibleButton,
                       self.ui.settingsCollapsibleButton, self.ui.segmentCollapsibleButton):
            widget.enabled = not running


#
# Self-test (needs the full Slicer application; trains the quick preset on the CPU for a few minutes)
#
class MNSegmentTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_MNSegment_train_quick_cpu()

    @staticmethod
    def _case(rng, shape=(32, 40, 40)):
        k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
        center = [n / 2 + rng.uniform(-3, 3) for n in shape]
        radii = [rng.uniform(6, 9), rng.uniform(8, 12), rng.uniform(8, 12)]
        inside = sum(((g - c) / r) ** 2 for g, c, r in zip((k, j, i), center, radii, strict=False)) <= 1.0
        image = 100 * (0.2 + 0.6 * inside + rng.normal(0, 0.15, shape))
        return image.astype(np.float32), inside.astype(np.uint8)

    def test_MNSegment_train_quick_cpu(self):
        self.delayDisplay("Building a small scene")
        rng = np.random.default_rng(7)
        pairs, unlabeled, truth = [], [], {}
        for index in range(5):
            image, label = self._case(rng)
            volume = slicer.util.addVolumeFromArray(image, name=f"MNSegment test {index + 1}")
            volume.SetSpacing(1.0, 1.0, 1.5)
            if index < 2:
                labelmap = slicer.util.addVolumeFromArray(label, name="tmp",
                                                          nodeClassName="vtkMRMLLabelMapVolumeNode")
                labelmap.SetSpacing(1.0, 1.0, 1.5)
                segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"labels {index}")
                segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
                slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelmap, segmentation)
                segmentation.GetSegmentation().GetNthSegment(0).SetName("Lesion")
                slicer.mrmlScene.RemoveNode(labelmap)
                pairs.append((volume, segmentation))
            else:
                unlabeled.append(volume)
                truth[volume.GetID()] = label

        logic = MNSegmentLogic()
        logic.confirm_install = lambda message: True  # testing: install missing packages without asking
        self.assertEqual(logic.pair_segmentations(), pairs)
        self.assertEqual(logic.unlabeled_candidates(pairs), unlabeled)

        self.delayDisplay("Training the quick preset on the CPU (a few minutes)")
        output = Path(slicer.app.temporaryPath) / "MNSegmentSelfTest" / time.strftime("%Y%m%d-%H%M%S")
        job = logic.train(pairs, unlabeled, output_dir=output, preset="quick", device="cpu", wait=True,
                          steps=120, batch_size=2, patch_size=[32, 32, 16])
        self.assertEqual(job.status, jobs.DONE, job.error)
        self.assertEqual(len(job.result), len(unlabeled))
        for segmentation, volume in zip(job.result, unlabeled, strict=False):
            self.assertIs(segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole()), volume)
            segment_id = segmentation.GetSegmentation().GetSegmentIdBySegmentName("Lesion")
            self.assertTrue(segment_id)
            predicted = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume) > 0
            reference = truth[volume.GetID()] > 0
            dice = 2 * (predicted & reference).sum() / max(1, predicted.sum() + reference.sum())
            self.assertGreater(dice, 0.8, f"{volume.GetName()}: Dice {dice:.3f}")

        self.delayDisplay("Segmenting a new volume with the trained model")
        image, _label = self._case(rng)
        new = slicer.util.addVolumeFromArray(image, name="MNSegment test new")
        new.SetSpacing(1.0, 1.0, 1.5)
        nodes = logic.segment([new], job.folder, device="cpu")
        self.assertEqual(len(nodes), 1)
        self.delayDisplay("Test passed")

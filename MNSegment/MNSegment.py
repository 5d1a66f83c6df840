"""MNSegment: few-label 3D segmentation (M&N co-training of a pretrained 2D network and a 3D network).

Thin Slicer module: the widget only collects the user's choices and calls one method of the logic
(``MNSegmentSlicerLib``, Qt-free and tested in CI with slicer-core). Training runs in a background process;
a QTimer polls its events, so the UI never blocks.
"""

import logging
import threading
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import qt
import slicer
from MNSegmentSlicerLib import job as jobs
from MNSegmentSlicerLib import progress, selection, suggestions
from MNSegmentSlicerLib.livechart import LiveChart
from MNSegmentSlicerLib.logic import ALL_GPUS, NETWORKS, PRESETS, device_choices, gpu_info
from MNSegmentSlicerLib.logic import MNSegmentLogic as SceneLogic
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
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
        self.parent.title = _("MNSegment")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["MNSegment contributors"]
        self.parent.helpText = _("""
Segment many volumes from a few labeled ones. Label a few volumes with the Segment Editor, pair them here with
their volumes, check the unlabeled volumes, and press Train: a 2D network pretrained on natural images and a 3D
network teach each other on the unlabeled volumes (M&N co-training), in a background process. When training ends,
every unlabeled volume gets a segmentation. Segment applies a trained model to other volumes.
See <a href="https://github.com/MNSegment/SlicerMNSegment#readme">the documentation</a>.
""")
        self.parent.acknowledgementText = _("""
Implements the method of "Semi-Supervised 3D Medical Segmentation from 2D Natural Images Pretrained Model"
(Yeung, Ramesh, Lyu, Namburete, Rajapakse; MLMI 2025). Uses PyTorch, MONAI, timm and PEFT.
""")


#
# Parameter node
#
@parameterNodeWrapper
class MNSegmentParameterNode:
    preset: Annotated[str, Choice(list(PRESETS))] = "quick"
    device: Annotated[str, Choice(["auto", "gpu", "cpu", ALL_GPUS])] = "auto"  # "all": offered with 2+ GPUs
    backbone2d: str = ""
    network3d: str = ""
    # Ranges as in the .ui: parameterNodeWrapper would otherwise set ±2^31 on the spin boxes. 0: the preset's.
    steps: Annotated[int, WithinRange(0, 1_000_000)] = 0
    batchSize: Annotated[int, WithinRange(0, 64)] = 0
    patchSize: str = ""
    lrgMode: Annotated[str, Choice(list(progress.LRG_MODES))] = "preset"
    network: Annotated[str, Choice(list(NETWORKS))] = "3d"
    outputFolder: str = ""
    modelFolder: str = ""
    weights2d: str = ""
    # Lists have no GUI connector: the widget syncs them by hand. A removed node reads back as None and rows
    # may be half filled (None segmentation): read them through MNSegmentSlicerLib.selection.
    labeledVolumes: list[vtkMRMLScalarVolumeNode]
    labeledSegmentations: list[vtkMRMLSegmentationNode]
    uncheckedVolumes: list[vtkMRMLScalarVolumeNode]
    previewVolume: vtkMRMLScalarVolumeNode  # None: the first checked unlabeled volume


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
                job.poll()
                if not job.running:
                    timer.stop()
                    self._pollTimers.pop(id(job), None)

            timer.timeout.connect(tick)
            self._pollTimers[id(job)] = timer
            timer.start()
        return job

    def stopTimers(self) -> None:
        for timer in self._pollTimers.values():
            timer.stop()
        self._pollTimers.clear()

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
        self._gpus = None  # filled by a thread: nvidia-smi may take seconds, never on the GUI thread
        self.liveChart = None
        self._previewShown = False
        self._suggestions = []  # what to label next, from the model folder's training (read once, not per refresh)
        self._shownSuggestions = {}  # volume node ID -> its suggestion, as the unlabeled list shows them

    # ---------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MNSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MNSegmentLogic()
        self.liveChart = LiveChart(slicer.mrmlScene)
        self.previewSelector = self._previewSelector()

        self.pollTimer = qt.QTimer()
        self.pollTimer.setInterval(POLL_INTERVAL_MS)
        self.pollTimer.timeout.connect(self.onPollJob)
        self.listTimer = qt.QTimer()  # coalesces scene changes into one list refresh
        self.listTimer.setSingleShot(True)
        self.listTimer.setInterval(300)
        self.listTimer.timeout.connect(self.refreshUnlabeledList)
        self.gpuTimer = qt.QTimer()
        self.gpuTimer.setInterval(200)
        self.gpuTimer.timeout.connect(self.showGpuInfo)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.onSceneNodesChanged)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeRemovedEvent, self.onSceneNodesChanged)
        # A loaded scene (.mrb) or a batch of changes sends no per-node events worth listening to: re-read all.
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneReloaded)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndBatchProcessEvent, self.onSceneReloaded)
        slicer.app.connect("aboutToQuit()", self.onAboutToQuit)

        self.ui.labeledTable.horizontalHeader().setSectionResizeMode(qt.QHeaderView.Stretch)
        self.ui.addLabeledButton.clicked.connect(lambda: self.addLabeledRow())
        self.ui.removeLabeledButton.clicked.connect(self.onRemoveLabeledRow)
        self.ui.pairSegmentationsButton.clicked.connect(self.onPairSegmentations)
        self.ui.selectAllButton.clicked.connect(lambda: self.setAllChecked(True))
        self.ui.selectNoneButton.clicked.connect(lambda: self.setAllChecked(False))
        self.ui.unlabeledList.itemChanged.connect(self.onUnlabeledItemChanged)
        self.ui.unlabeledList.itemDoubleClicked.connect(self.onShowSuggestion)
        self.ui.labelNextButton.clicked.connect(self.onLabelNext)
        self.ui.trainButton.clicked.connect(self.onTrainOrCancel)
        self.ui.resumeButton.clicked.connect(self.onResume)
        self.ui.trainMoreButton.clicked.connect(self.onTrainMore)
        self.ui.segmentButton.clicked.connect(self.onSegment)
        self.ui.outputPathLineEdit.currentPathChanged.connect(lambda path: self._setParameter("outputFolder", path))
        self.ui.modelPathLineEdit.currentPathChanged.connect(self.onModelFolderChanged)
        self.ui.weights2dPathLineEdit.currentPathChanged.connect(lambda path: self._setParameter("weights2d", path))

        self.startGpuQuery()
        self.initializeParameterNode()
        self.updateButtons()

    def cleanup(self) -> None:
        """Called when the module widget is destroyed (application exit, module reload)."""
        # Waits (bounded: a worker still there after the grace period is killed by the job's poll): the timers
        # that poll the jobs stop below, so nothing would end a worker that ignored the stop request.
        self.cancelJobs(wait=True)
        for timer in (self.pollTimer, self.listTimer, self.gpuTimer):
            timer.stop()
        if self.logic is not None:
            self.logic.stopTimers()
        slicer.app.disconnect("aboutToQuit()", self.onAboutToQuit)
        self.exit()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

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
        self.cancelJobs(wait=True)  # the workers save their checkpoints before Slicer goes

    def onSceneNodesChanged(self, caller, event) -> None:
        if not slicer.mrmlScene.IsClosing() and not slicer.mrmlScene.IsBatchProcessing():
            self.listTimer.start()

    def onSceneReloaded(self, caller, event) -> None:
        if not self.parent.isEntered or slicer.mrmlScene.IsClosing():
            return
        node = self.logic.getParameterNode()
        current = self._parameterNode.parameterNode if self._parameterNode else None
        if node.parameterNode is not current:  # a loaded scene brought its own parameter node and lists
            self.setParameterNode(node)
        else:  # connecting the GUI again would add an observer each time (connectGui's are never removed)
            self.refreshUnlabeledList()

    def cancelJobs(self, wait: bool = False) -> None:
        if self.logic is not None:
            self.logic.cancel_all(wait=wait)

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
            self.offerDeviceChoices()  # connectGui refills the device box with every choice, "all" included
            self._syncing = True
            try:
                self.ui.outputPathLineEdit.currentPath = self._parameterNode.outputFolder
                self.ui.modelPathLineEdit.currentPath = self._parameterNode.modelFolder
                self.ui.weights2dPathLineEdit.currentPath = self._parameterNode.weights2d
                self.ui.labeledTable.setRowCount(0)
                for volume, segmentation in selection.stored_rows(self._parameterNode.labeledVolumes,
                                                                  self._parameterNode.labeledSegmentations):
                    self.addLabeledRow(volume, segmentation)
            finally:
                self._syncing = False
            self.loadSuggestions()
            self.refreshUnlabeledList()

    def _setParameter(self, name, value) -> None:
        if self._parameterNode and not self._syncing:
            setattr(self._parameterNode, name, value)

    # -------------------------------------------------------------------------------- labeled table
    def addLabeledRow(self, volume=None, segmentation=None) -> None:
        """A table row: a volume and its segmentation, each picked in a node combo box."""
        table = self.ui.labeledTable
        row = table.rowCount
        table.insertRow(row)
        volumeSelector = self._nodeSelector(["vtkMRMLScalarVolumeNode"], volume)
        volumeSelector.showChildNodeTypes = False  # no label maps
        table.setCellWidget(row, 0, volumeSelector)
        table.setCellWidget(row, 1, self._nodeSelector(["vtkMRMLSegmentationNode"], segmentation))
        self.onLabeledChanged()

    def _previewSelector(self):
        """The volume whose prediction training shows at each checkpoint (in the settings; none chosen: the first
        checked unlabeled volume)."""
        selector = slicer.qMRMLNodeComboBox()
        selector.nodeTypes = ["vtkMRMLScalarVolumeNode"]
        selector.showChildNodeTypes = False
        selector.addEnabled = selector.removeEnabled = False
        selector.noneEnabled = True
        selector.noneDisplay = _("First checked unlabeled volume")
        selector.setMRMLScene(slicer.mrmlScene)
        selector.toolTip = _("At each checkpoint, training segments this volume (one of the labeled or checked "
                             "unlabeled volumes) and shows it as a 'training preview' segmentation.")
        self.ui.settingsCollapsibleButton.layout().addRow(_("Preview volume:"), selector)
        # connectGui binds the ui namespace's widgets that name a parameter: the choice is saved with the scene
        selector.setProperty("SlicerParameterName", "previewVolume")
        self.ui.previewVolumeSelector = selector
        return selector

    def previewVolume(self):
        checked = self.checkedVolumes()
        return self.previewSelector.currentNode() or (checked[0] if checked else None)

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
        with slicer.util.tryWithErrorDisplay(_("Could not pair the segmentations."), waitCursor=True):
            present = selection.node_ids(seg for _vol, seg in self.labeledPairs(complete=False))
            for volume, segmentation in self.logic.pair_segmentations():
                if segmentation.GetID() not in present:
                    self.addLabeledRow(volume, segmentation)

    def labeledPairs(self, complete=True) -> list:
        """The table's rows; with ``complete`` only those with both a volume and a segmentation."""
        table = self.ui.labeledTable
        rows = [(table.cellWidget(row, 0).currentNode(), table.cellWidget(row, 1).currentNode())
                for row in range(table.rowCount)]
        return selection.complete_pairs(rows) if complete else rows

    def onLabeledChanged(self) -> None:
        if self._parameterNode and not self._syncing:
            rows = self.labeledPairs(complete=False)  # half-filled rows too: they survive leaving the module
            self._parameterNode.labeledVolumes = [v for v, _s in rows]
            self._parameterNode.labeledSegmentations = [s for _v, s in rows]
        self.refreshUnlabeledList()
        self.updateButtons()

    # ------------------------------------------------------------------------------- unlabeled list
    def refreshUnlabeledList(self) -> None:
        if self.logic is None or slicer.mrmlScene.IsClosing():
            return
        unchecked = selection.node_ids(self._parameterNode.uncheckedVolumes if self._parameterNode else [])
        widget = self.ui.unlabeledList
        self._syncing = True
        try:
            widget.clear()
            candidates = self.logic.unlabeled_candidates(self.labeledPairs(complete=False))
            ranked = suggestions.rank_volumes(candidates, self._suggestions)  # highest score first
            self._shownSuggestions = {volume.GetID(): s for volume, s in ranked if s is not None}
            for volume, suggestion in ranked:
                item = qt.QListWidgetItem(suggestion.label() if suggestion else volume.GetName())
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

    # ---------------------------------------------------------------------------------- suggestions
    def onModelFolderChanged(self, path) -> None:
        self._setParameter("modelFolder", path)
        if not self._syncing:  # setParameterNode loads them itself, once its rows are restored
            self.loadSuggestions()

    def loadSuggestions(self) -> None:
        """The model folder's ranking of what to label next (none if it has none or cannot be read)."""
        folder = self._parameterNode.modelFolder if self._parameterNode else ""
        try:
            self._suggestions = self.logic.suggestions(folder) if folder else []
        except (OSError, ValueError, KeyError) as error:
            logging.warning("MNSegment: suggestions of %s not read: %s", folder, error)
            self._suggestions = []
        self.refreshUnlabeledList()

    def _selectedVolume(self):
        item = self.ui.unlabeledList.currentItem()
        return slicer.mrmlScene.GetNodeByID(item.data(qt.Qt.UserRole)) if item is not None else None

    def onShowSuggestion(self, item) -> None:
        """Double-click: the volume at its most uncertain slice, with the disagreement map as overlay."""
        with slicer.util.tryWithErrorDisplay(_("Could not show the volume."), waitCursor=True):
            suggestion = self._shownSuggestions.get(item.data(qt.Qt.UserRole))
            if suggestion is not None:
                self.logic.show_suggestion(suggestion)
            else:
                slicer.util.setSliceViewerLayers(background=self._selectedVolume(), foreground=None, fit=True)

    def onLabelNext(self) -> None:
        """A new segmentation of the selected volume, added to the labeled volumes, opened in the Segment Editor."""
        with slicer.util.tryWithErrorDisplay(_("Could not start the segmentation."), waitCursor=True):
            volume = self._selectedVolume()
            if volume is None:
                raise ValueError(_("Select a volume in the list first."))
            suggestion = self._shownSuggestions.get(volume.GetID())
            if suggestion is not None and self._parameterNode.modelFolder:
                volume, segmentation = self.logic.label_next(suggestion, self._parameterNode.modelFolder)
            else:
                segmentation = suggestions.start_segmentation(volume, [])
                slicer.util.setSliceViewerLayers(background=volume, foreground=None, fit=True)
            self.addLabeledRow(volume, segmentation)
            slicer.util.selectModule("SegmentEditor")
            editor = getattr(slicer.modules, "SegmentEditorWidget", None)
            if editor is not None:  # entering it read the parameter node; set again in case it was open already
                editor.editor.setSegmentationNode(segmentation)
                editor.editor.setSourceVolumeNode(volume)

    # -------------------------------------------------------------------------------------- actions
    def startGpuQuery(self) -> None:
        self.ui.gpuLabel.text = _("Looking for GPUs...")

        def query():
            self._gpus = gpu_info()

        threading.Thread(target=query, name="MNSegment GPU query", daemon=True).start()
        self.gpuTimer.start()

    def offerDeviceChoices(self) -> None:
        """Removes "all" (one training process per GPU) from the device box unless there are several GPUs; run
        after the GPU query and after every connectGui, whose connector re-adds every choice of the parameter."""
        gpus = self._gpus
        if gpus is None or ALL_GPUS in device_choices(gpus):  # not known yet (showGpuInfo runs this again)
            return
        combo = self.ui.deviceComboBox
        if combo.findText(ALL_GPUS) >= 0:
            if self._parameterNode and self._parameterNode.device == ALL_GPUS:
                self._parameterNode.device = "auto"
            combo.removeItem(combo.findText(ALL_GPUS))

    def showGpuInfo(self) -> None:
        gpus = self._gpus
        if gpus is None:
            return
        self.gpuTimer.stop()
        self.offerDeviceChoices()
        if gpus:
            self.ui.gpuLabel.text = "; ".join(f"GPU {g['index']}: {g['name']}, {g['memory_gb']:.0f} GB" for g in gpus)
        else:
            self.ui.gpuLabel.text = _("No NVIDIA GPU found: training runs on the CPU (slow).")

    def _callbacks(self) -> dict:
        return {"on_progress": self.onJobProgress, "on_log": self.onJobLog, "on_phase": self.onJobPhase,
                "on_event": self.onJobEvent}

    def onTrainOrCancel(self) -> None:
        if self.job is not None and self.job.running:
            with slicer.util.tryWithErrorDisplay(_("Could not cancel the training.")):
                self.job.cancel()  # returns at once; the poll timer sees the job end
                self.ui.statusLabel.text = _("Cancelling (saving a checkpoint)...")
            self.updateButtons()
            return
        with slicer.util.tryWithErrorDisplay(_("Training could not start."), waitCursor=True):
            self._startTraining(_("Training"), output_dir=self._parameterNode.outputFolder or None)

    def _startTraining(self, title: str, **where) -> None:
        """Train (``output_dir``) or Train more (``init_from``) with the panel's settings."""
        p = self._parameterNode
        self.ui.logTextEdit.clear()
        job = self.logic.train(
            self.labeledPairs(), self.checkedVolumes(), **where, preset=p.preset, device=p.device,
            network=p.network, wait=False, preview=self.previewVolume(), **self._callbacks(),
            **self.logic.overridesFromParameterNode(p),
        )
        self.startMonitoring(job, title)

    def onTrainMore(self) -> None:
        """A new job (new folder) whose networks start from the finished training in the output folder."""
        with slicer.util.tryWithErrorDisplay(_("Training could not start."), waitCursor=True):
            folder = self._parameterNode.outputFolder
            if not folder:
                raise ValueError(_("Choose the output folder of the finished training to continue from."))
            self._startTraining(_("Training more"), init_from=folder)

    def onResume(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Training could not be resumed."), waitCursor=True):
            folder = self._parameterNode.outputFolder
            if not folder:
                raise ValueError(_("Choose the output folder of the interrupted training."))
            self.ui.logTextEdit.clear()
            self.startMonitoring(self.logic.resume(folder, wait=False, **self._callbacks()), _("Resuming"))

    def onSegment(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Segmentation failed."), waitCursor=True):
            p = self._parameterNode
            if not p.modelFolder:
                raise ValueError(_("Choose the folder of a trained model."))
            self.ui.logTextEdit.clear()
            job = self.logic.segment(self.checkedVolumes(), p.modelFolder, wait=False, network=p.network,
                                     device=p.device, on_log=self.onJobLog, on_event=self.onJobEvent)
            self.startMonitoring(job, _("Segmenting"), training=False)

    # ----------------------------------------------------------------------------------- monitoring
    def startMonitoring(self, job, what: str, training: bool = True) -> None:
        self.job = job
        if job.folder is not None and training:
            self._parameterNode.outputFolder = str(job.folder)  # so that Resume continues this job
            self.ui.outputPathLineEdit.currentPath = str(job.folder)
        if training:  # the live chart: the same nodes, emptied, in a plot view of the layout
            self.liveChart.reset()
            slicer.modules.plots.logic().ShowChartInLayout(self.liveChart.chart())
            self._previewShown = False
        self.ui.progressBar.setRange(0, 0)
        self.ui.statusLabel.text = _("{what}: starting...").format(what=what)
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
            job.error = str(error)
            job.cancel()
        if not job.running:
            self.pollTimer.stop()
            self.onJobEnded(job)
        self.updateButtons()

    def onJobPhase(self, job, name) -> None:
        if name == "export":
            self.ui.progressBar.setRange(0, 0)
            self.ui.statusLabel.text = _("Writing the volumes for the engine...")
        elif name == "train":
            self.ui.statusLabel.text = _("Starting the engine...")
        elif name == "predict":
            self.ui.progressBar.setRange(0, 0)
            self.ui.statusLabel.text = _("Segmenting the unlabeled volumes...")
        elif name == "load":
            self.ui.statusLabel.text = _("Loading the segmentations into the scene...")

    def onJobEvent(self, job, event) -> None:
        """Warnings of the engine (e.g. training labeled-only, no learning-curve picture) reach the user."""
        if event.get("event") == "preview" and not self._previewShown and self.logic.preview is not None:
            self._previewShown = True  # the first preview: show its volume (later ones only update the node)
            slicer.util.setSliceViewerLayers(background=self.logic.preview.volume, fit=True)
        text = progress.describe_warning(event)
        if text:
            self.ui.logTextEdit.appendPlainText(text)
            self.ui.metricsLabel.text = text

    def onJobProgress(self, job, event) -> None:
        self.liveChart.add(event)
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
            self.ui.statusLabel.text = _("Done: {count} segmentation(s) added. Model: {folder}").format(
                count=len(nodes), folder=job.folder)
            chosen = progress.describe_chosen_network(job.events, self._parameterNode.network)
            if chosen:
                self.ui.statusLabel.text += " " + chosen
            if nodes:
                volume = nodes[0].GetNodeReference(nodes[0].GetReferenceImageGeometryReferenceRole())
                slicer.util.setSliceViewerLayers(background=volume, fit=True)
            if any(phase.name == "train" for phase in job.phases):
                self._parameterNode.modelFolder = str(job.folder)
                self.ui.modelPathLineEdit.currentPath = str(job.folder)
                self.loadSuggestions()  # the unlabeled list now shows what to label next
                self._parameterNode.outputFolder = ""  # the next Train starts a new job folder
                self.ui.outputPathLineEdit.currentPath = ""
        elif job.status == jobs.CANCELLED:
            self.ui.progressBar.setValue(0)
            self.ui.statusLabel.text = _("Cancelled. Resume continues from the last checkpoint.")
        else:
            self.ui.progressBar.setValue(0)
            self.ui.statusLabel.text = _("Failed (see the log below).")
            slicer.util.errorDisplay(job.error or _("The engine failed."), windowTitle="MNSegment")

    def updateButtons(self) -> None:
        running = self.job is not None and self.job.running
        cancelling = running and self.job.status == jobs.CANCELLING
        self.ui.trainButton.text = _("Cancelling...") if cancelling else _("Cancel") if running else _("Train")
        self.ui.trainButton.enabled = (running and not cancelling) or (not running and bool(self.labeledPairs()))
        self.ui.resumeButton.enabled = not running
        self.ui.trainMoreButton.enabled = not running and bool(self.labeledPairs())
        self.ui.segmentButton.enabled = not running and bool(self.checkedVolumes())
        self.ui.labelNextButton.enabled = not running and self.ui.unlabeledList.count > 0
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
        self.test_MNSegment_widget_survives_deleted_nodes()
        self.setUp()
        self.test_MNSegment_train_quick_cpu()

    def test_MNSegment_widget_survives_deleted_nodes(self):
        """The widget itself (Qt: only here): spin-box ranges, deleted nodes, half-filled rows, scene import."""
        slicer.util.selectModule("MNSegment")
        widget = slicer.modules.mnsegment.widgetRepresentation().self()
        self.assertEqual(widget.ui.stepsSpinBox.maximum, 1_000_000)
        self.assertEqual(widget.ui.batchSizeSpinBox.maximum, 64)
        rng = np.random.default_rng(3)
        volumes = [slicer.util.addVolumeFromArray(self._case(rng)[0], name=f"v{i}") for i in range(3)]
        vector = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
        slicer.util.updateVolumeFromArray(vector, np.zeros((4, 4, 4, 3), np.uint8))
        widget.addLabeledRow(volumes[0], None)  # half filled: no segmentation drawn yet
        widget.refreshUnlabeledList()
        offered = [widget.ui.unlabeledList.item(i).text() for i in range(widget.ui.unlabeledList.count)]
        self.assertEqual(offered, ["v1", "v2"])  # not the labeled one, not the vector volume
        widget.setAllChecked(False)
        slicer.mrmlScene.RemoveNode(volumes[1])  # leaves None in the parameter node's lists
        slicer.util.selectModule("Data")
        slicer.util.selectModule("MNSegment")  # enter() reads those lists
        self.assertEqual(widget.labeledPairs(complete=False), [(volumes[0], None)])
        self.assertEqual([widget.ui.unlabeledList.item(i).text() for i in range(widget.ui.unlabeledList.count)],
                         ["v2"])
        slicer.mrmlScene.StartState(slicer.mrmlScene.BatchProcessState)
        added = slicer.util.addVolumeFromArray(self._case(rng)[0], name="v3")
        slicer.mrmlScene.EndState(slicer.mrmlScene.BatchProcessState)
        self.assertIn(added.GetName(), [widget.ui.unlabeledList.item(i).text()
                                        for i in range(widget.ui.unlabeledList.count)])
        widget.ui.labeledTable.setRowCount(0)
        widget.onLabeledChanged()

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

"""A training's live chart in Slicer's own plot nodes, fed by the engine's ``progress`` events as they arrive.

Every quantity has its own table node (columns ``step`` and the quantity) and plot series: the events carry each
quantity only some of the time (a loss only on the steps its network trains, a validation Dice only every
``train.validate_every`` steps), and a table of its own holds exactly the steps that have it, so every line is
drawn through real points. Two chart nodes: losses with the unlabeled share, the validation Dice and each network's
Dice on its labeled patches (all within about 0-2), and the learning rates (around 1e-3, invisible on the first
chart's scale).

The nodes are made once and found again by their ``MNSegment.LiveChart`` attribute; a new job empties the tables
(:meth:`LiveChart.reset`) and keeps the nodes, so a plot view showing the chart keeps showing it. Qt-free: runs
with slicer-core; the module's widget only shows :meth:`LiveChart.chart` in the layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import vtk

from .scenenodes import nodes_by_class

ROLE_ATTRIBUTE = "MNSegment.LiveChart"
LOSSES, RATES = "losses", "rates"
CHART_TITLES = {LOSSES: "MNSegment training: losses, unlabeled share, Dice",
                RATES: "MNSegment training: learning rates"}
Y_AXIS_TITLES = {LOSSES: "value", RATES: "learning rate"}
STEP = "step"


@dataclass(frozen=True)
class Quantity:
    field: str  # of the progress event
    name: str  # in the legend
    chart: str
    color: tuple[float, float, float]


QUANTITIES = (
    Quantity("loss_2d", "loss 2D", LOSSES, (0.85, 0.37, 0.01)),
    Quantity("loss_3d", "loss 3D", LOSSES, (0.46, 0.44, 0.70)),
    Quantity("unlabeled_share", "unlabeled share", LOSSES, (0.40, 0.65, 0.12)),
    Quantity("val_dice", "validation Dice", LOSSES, (0.91, 0.16, 0.54)),
    # each network's running Dice on its labeled patches: a network that does not find the structure shows here
    Quantity("train_dice_2d", "labeled-patch Dice 2D", LOSSES, (0.99, 0.68, 0.38)),
    Quantity("train_dice_3d", "labeled-patch Dice 3D", LOSSES, (0.74, 0.73, 0.85)),
    Quantity("lr_2d", "learning rate 2D", RATES, (0.85, 0.37, 0.01)),
    Quantity("lr_3d", "learning rate 3D", RATES, (0.46, 0.44, 0.70)),
)


def _value(event: dict, field: str) -> float | None:
    value = event.get(field)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


class LiveChart:
    def __init__(self, scene):
        self.scene = scene
        self._ids: dict[str, str] = {}  # role -> node ID, a shortcut for _node's search

    # ------------------------------------------------------------------------------------------ nodes
    def _node(self, class_name: str, role: str, name: str):
        node = self.scene.GetNodeByID(self._ids.get(role, ""))
        if node is None or node.GetAttribute(ROLE_ATTRIBUTE) != role:
            matches = [n for n in nodes_by_class(self.scene, class_name) if n.GetAttribute(ROLE_ATTRIBUTE) == role]
            node = matches[0] if matches else self._create(class_name, role, name)
            self._ids[role] = node.GetID()
        return node

    def _create(self, class_name: str, role: str, name: str):
        node = self.scene.AddNewNodeByClass(class_name, name)
        node.SetAttribute(ROLE_ATTRIBUTE, role)
        if class_name == "vtkMRMLTableNode":
            field = role.split(":", 1)[1]
            for column in (STEP, field):
                array = vtk.vtkDoubleArray()
                array.SetName(column)
                node.AddColumn(array)
        return node

    def table(self, quantity: Quantity):
        return self._node("vtkMRMLTableNode", f"table:{quantity.field}", f"MNSegment training: {quantity.name}")

    def series(self, quantity: Quantity):
        node = self._node("vtkMRMLPlotSeriesNode", f"series:{quantity.field}", quantity.name)
        table = self.table(quantity)
        if node.GetTableNodeID() != table.GetID():  # a new series, or its table was deleted and made again
            node.SetAndObserveTableNodeID(table.GetID())
            node.SetXColumnName(STEP)
            node.SetYColumnName(quantity.field)
            node.SetPlotType(node.PlotTypeScatter)
            node.SetLineStyle(node.LineStyleSolid)
            # a validation Dice comes every few hundred steps: markers show where the measurements are
            node.SetMarkerStyle(node.MarkerStyleCircle if quantity.field == "val_dice" else node.MarkerStyleNone)
            node.SetColor(*quantity.color)
        return node

    def chart(self, which: str = LOSSES):
        """The chart node (made with its series on first use; the widget shows it in a plot view)."""
        node = self._node("vtkMRMLPlotChartNode", f"chart:{which}", CHART_TITLES[which])
        for quantity in QUANTITIES:
            if quantity.chart == which:
                series = self.series(quantity)
                if not node.HasPlotSeriesNodeID(series.GetID()):
                    node.AddAndObservePlotSeriesNodeID(series.GetID())
        node.SetTitle(CHART_TITLES[which])
        node.SetXAxisTitle(STEP)
        node.SetYAxisTitle(Y_AXIS_TITLES[which])
        node.SetLegendVisibility(True)
        return node

    # ------------------------------------------------------------------------------------------- data
    def reset(self) -> None:
        """A new job: every table emptied, every node kept."""
        for quantity in QUANTITIES:
            self.chart(quantity.chart)
            table = self.table(quantity)
            for i in range(table.GetNumberOfColumns()):
                table.GetTable().GetColumn(i).SetNumberOfTuples(0)
            table.GetTable().Modified()
            table.Modified()

    def add(self, event: dict) -> int:
        """Appends the quantities a ``progress`` event carries at its step; returns how many it carried. An event
        repeating the last step (the engine re-reports it during a long pause) replaces that row's value."""
        step = _value(event, STEP)
        if step is None:
            return 0
        added = 0
        for quantity in QUANTITIES:
            value = _value(event, quantity.field)
            if value is None:
                continue
            if not self.scene.GetNodeByID(self._ids.get(f"series:{quantity.field}", "")):
                self.chart(quantity.chart)  # first use, or the user deleted a node: make what is missing
            table = self.table(quantity)
            steps, values = (table.GetTable().GetColumnByName(c) for c in (STEP, quantity.field))
            last = steps.GetNumberOfTuples() - 1
            if last >= 0 and steps.GetValue(last) == step:
                values.SetValue(last, value)
            elif last < 0 or steps.GetValue(last) < step:
                steps.InsertNextValue(step)
                values.InsertNextValue(value)
            else:
                continue  # an older step than the chart holds: not this job's (reset() starts a new one)
            table.GetTable().Modified()
            table.Modified()
            added += 1
        return added

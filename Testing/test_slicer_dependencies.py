"""What the Slicer module installs matches what the engine needs, and a missing optional package (matplotlib)
costs a picture, never a finished training. The import check in a Slicer-like environment is in
test_slicer_environment.py."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import slicer_test_utils  # noqa: F401  (puts MNSegment/ on sys.path)
from MNSegmentSlicerLib import dependencies

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

REPO = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    from packaging.requirements import Requirement

    return Requirement(requirement).name.lower()


def test_module_installs_exactly_the_package_dependencies():
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = {_name(r): r.replace(" ", "") for r in project["dependencies"]}
    listed = {r.name.lower(): r.spec.replace(" ", "") for r in dependencies.REQUIREMENTS}
    assert listed == declared
    assert dependencies.TORCH_REQUIREMENT in declared["torch"]
    # Pictures are optional: neither a dependency nor installed into Slicer.
    assert "matplotlib" not in declared
    assert any(_name(r) == "matplotlib" for r in project["optional-dependencies"]["plots"])


def test_an_installed_torch_older_than_the_minimum_is_refused():
    assert dependencies.torch_problem(version={"torch": "2.14.1+cu130"}.get) is None
    assert dependencies.torch_problem(version={}.get) is None  # not installed: installTorch handles it
    assert dependencies.torch_problem(version={"torch": dependencies.TORCH_MINIMUM}.get) is None
    problem = dependencies.torch_problem(version={"torch": "1.13.1+cu117"}.get)
    assert problem and "1.13.1" in problem and dependencies.TORCH_REQUIREMENT in problem
    assert "PyTorch Utils" in problem


def test_missing_plotting_costs_the_picture_not_the_model(tmp_path, monkeypatch):
    from MNSegmentLib import workflow
    from MNSegmentLib.events import Events

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what a stock Slicer has: no matplotlib
    monkeypatch.delitem(sys.modules, "MNSegmentLib.plots", raising=False)
    stream = io.StringIO()
    history = [{"step": 1, "loss_2d": 1.0, "loss_3d": 1.0}]
    workflow._write_curves(tmp_path, history, Events(True, stream))  # must not raise
    assert not (tmp_path / "curves.png").exists()
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [e["event"] for e in events] == ["warning"]
    assert "matplotlib" in events[0]["message"]


def test_overlay_without_plotting_is_one_clear_error_before_any_work(tmp_path):
    """A real CLI process in which matplotlib cannot be imported (as in a stock Slicer): exit 2, one message
    naming what to install, no output folder made."""
    import subprocess

    import numpy as np
    import SimpleITK as sitk

    image = tmp_path / "scan.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6), np.float32)), str(image))
    out = tmp_path / "out"
    code = ("import sys; sys.modules['matplotlib'] = None; from MNSegmentLib.cli import main; "
            f"sys.exit(main(['predict', '--model', {str(tmp_path / 'no_run')!r}, {str(image)!r}, "
            f"'--output', {str(out)!r}, '--overlay']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert 'pip install "mnsegment[plots]"' in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()

"""The worker in a Python that holds only what a stock 3D Slicer 5.10 holds plus what the module installs
(see slicer_environment.py for how that environment is built and what stands in for what).

The first run builds the environment (about 1.5 min with pip's download cache, a few minutes without); later
runs reuse it. These are the tests that see a package the engine imports but the module does not install.
"""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
import slicer_environment
from slicer_test_utils import add_segmentation, add_volume, ellipsoid_case, new_scene

# isort: split
from MNSegmentSlicerLib import job as jobs
from MNSegmentSlicerLib.logic import MNSegmentLogic

#: Engine modules allowed to fail there, with the optional package they need (pyproject's extras).
OPTIONAL_MODULES = {"MNSegmentLib.plots": "matplotlib", "MNSegmentLib.data.realdata": "nilearn"}


@pytest.fixture(scope="module")
def slicer_env():
    try:
        folder = slicer_environment.build()
    except RuntimeError as error:  # pip's output, so that a CI log says what could not be installed
        pytest.fail(f"Could not build the Slicer-like environment:\n{error}")
    return folder


def test_environment_holds_slicers_packages_plus_the_module_installs(slicer_env):
    held = {slicer_environment._normalize(n): v for n, v in slicer_environment.installed(slicer_env).items()}
    for spec in slicer_environment.SLICER_BUNDLED:
        name, version = spec.split("==")
        assert held.get(slicer_environment._normalize(name)) == version, f"{name} moved: pip replaced it"
    assert "matplotlib" not in held and "torch" not in held  # torch is the stand-in on the .pth path
    installed_by_module = json.loads((slicer_env / "ready").read_text(encoding="utf-8"))["pip_arguments"]
    assert "monai>=1.4" in installed_by_module


def test_every_engine_module_imports_there(slicer_env):
    script = (
        "import importlib, json, pkgutil, MNSegmentLib\n"
        "failed = {}\n"
        "for m in pkgutil.walk_packages(MNSegmentLib.__path__, 'MNSegmentLib.'):\n"
        "    try:\n"
        "        importlib.import_module(m.name)\n"
        "    except Exception as error:\n"
        "        failed[m.name] = f'{type(error).__name__}: {error}'\n"
        "print(json.dumps(failed))\n"
    )
    env = jobs.worker_environment()
    out = subprocess.run([str(slicer_environment.env_python(slicer_env)), "-c", script], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    failed = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(failed) <= set(OPTIONAL_MODULES), failed
    for name, message in failed.items():
        assert "ImportError" in message and OPTIONAL_MODULES[name] in message, message


def test_train_and_segment_through_the_module_launcher(slicer_env, tmp_path):
    """logic.train → export → EngineJob (the module's launcher) → `python -m MNSegmentLib.cli` in that
    environment, standing in for PythonSlicer → predictions loaded back into the scene."""
    scene = new_scene()
    rng = np.random.default_rng(3)
    labeled, unlabeled = [], []
    for i in range(3):
        image, label = ellipsoid_case(rng)
        volume = add_volume(scene, f"Scan {i + 1}", image, (1.0, 1.0, 1.5))
        if i < 2:
            labeled.append((volume, add_segmentation(scene, volume, label, {1: "Lesion"})))
        else:
            unlabeled.append(volume)
    logic = MNSegmentLogic(scene, python=[str(slicer_environment.env_python(slicer_env))])
    settings = {"train.steps": 6, "sampling.batch_size": 2, "sampling.patch_size": [32, 32, 16]}
    job = logic.train(labeled, unlabeled, output_dir=tmp_path / "job", preset="quick", device="cpu", wait=False,
                      **settings)
    assert job.wait(timeout=900) == jobs.DONE, f"{job.error}\n" + "\n".join(job.log)
    assert [n.GetSegmentation().GetNthSegment(0).GetName() for n in job.result] == ["Lesion"]
    run = job.folder / "run"
    assert (run / "model.pt").is_file() and not (run / "curves.png").exists()  # no matplotlib in Slicer
    warnings = [e["message"] for e in job.events if e["event"] == "warning"]
    assert any("learning curves not drawn" in w and "matplotlib" in w for w in warnings), warnings
    # A trained model segments another volume through the same path.
    nodes = logic.segment([unlabeled[0]], job.folder, device="cpu", output_dir=tmp_path / "segment")
    assert len(nodes) == 1
    assert os.environ.get("MNSEGMENT_STOP_FILE") is None  # the stop file is the worker's, never ours


def test_module_protects_exactly_the_packages_slicer_ships():
    from MNSegmentSlicerLib import dependencies

    pinned = {slicer_environment._normalize(s.split("==")[0]) for s in slicer_environment.SLICER_BUNDLED}
    assert {slicer_environment._normalize(n) for n in dependencies.SLICER_PACKAGES} == pinned

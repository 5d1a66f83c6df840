"""A virtualenv that holds what a stock 3D Slicer 5.10's Python holds, plus what the MNSegment module installs.

CI's own virtualenv has every package of the project, so it cannot show what a stock Slicer lacks (matplotlib
once made every training fail there). This environment is built from:

* :data:`SLICER_BUNDLED`: the Python packages Slicer 5.10.0's SuperBuild installs, at its pinned versions
  (read from ``SuperBuild/External_python-*.cmake`` and ``External_SimpleITK.cmake`` at tag v5.10.0 of
  Slicer/Slicer). Installed with ``--no-deps``: exactly that list. Slicer also has VTK, CTK and Qt wrappers,
  which the engine never imports.
* torch and torchvision: in Slicer they come from the PyTorch extension (light-the-torch), not from MNSegment.
  Here a *stand-in*: a folder of symbolic links to the torch and torchvision of the interpreter running the
  tests and to their own dependencies (nothing else), put on the path by a ``.pth`` file; a multi-GB CUDA
  download per CI run would buy nothing more. So the environment uses that interpreter's Python version
  (3.11 here; Slicer 5.10 ships 3.12.10).
* what :mod:`MNSegmentSlicerLib.dependencies` installs, computed and installed by that module's own functions
  running *inside* the environment (``missing_packages``, ``constraints``, ``pip_arguments``), with
  ``python -m pip install`` standing in for ``slicer.util.pip_install`` (which runs exactly that).

Built once per content (a hash of all of the above names the folder) under ``$MNSEGMENT_SLICER_ENV_CACHE``
(default ``~/.cache/mnsegment/slicer-env``); a rerun reuses it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "MNSegment"

#: Slicer 5.10.0 SuperBuild pins (python-pip, -setuptools, -wheel, -numpy, -scipy, -pythonqt-requirements,
#: -requests-requirements, -dicom-requirements, -extension-manager(-ssl)-requirements; SimpleITK is built from
#: its slicer-v2.5.2 tag: the PyPI wheel of 2.5.2 stands in for it).
SLICER_BUNDLED = (
    "pip==25.1.1", "setuptools==80.9.0", "wheel==0.45.1",
    "numpy==2.0.2", "scipy==1.13.1", "SimpleITK==2.5.2",
    "packaging==25.0", "pyparsing==3.2.3", "six==1.17.0",
    "certifi==2025.4.26", "idna==3.10", "charset-normalizer==3.4.2", "urllib3==2.4.0", "requests==2.32.3",
    "pydicom==2.4.4", "pillow==11.2.1", "retrying==1.3.4", "dicomweb-client==0.60.0",
    "chardet==5.2.0", "CouchDB==1.2", "gitdb==4.0.12", "smmap==5.0.2", "GitPython==3.1.44",
    "cryptography==45.0.3", "PyJWT==2.10.1", "wrapt==1.17.2", "Deprecated==1.2.18", "pycparser==2.22",
    "cffi==1.17.1", "PyNaCl==1.5.0", "python-dateutil==2.9.0.post0", "typing_extensions==4.14.0",
    "PyGithub==2.6.1",
)

TORCH_DISTRIBUTIONS = ("torch", "torchvision")
STAND_IN = "torch-stand-in"


def _normalize(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _bundled_names() -> set[str]:
    return {_normalize(spec.split("==")[0]) for spec in SLICER_BUNDLED}


def torch_closure() -> list[metadata.Distribution]:
    """torch, torchvision and what they require (markers evaluated here), minus what Slicer itself bundles."""
    from packaging.requirements import Requirement

    bundled, seen, found = _bundled_names(), {}, []
    todo = [(name, frozenset()) for name in TORCH_DISTRIBUTIONS]
    while todo:
        name, extras = todo.pop()
        name = _normalize(name)
        if name in bundled or (name in seen and extras <= seen[name]):
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # optional on this platform
        if name not in seen:
            found.append(dist)
        seen[name] = seen.get(name, frozenset()) | extras
        for line in dist.requires or []:
            requirement = Requirement(line)
            wanted = requirement.marker is None or any(
                requirement.marker.evaluate({"extra": extra}) for extra in ("", *extras))
            if wanted:
                todo.append((requirement.name, frozenset(requirement.extras)))
    return found


def _top_level_entries(dist: metadata.Distribution) -> set[str]:
    """First path components this distribution installed into site-packages (packages, modules, dist-info)."""
    entries = set()
    for file in dist.files or []:
        parts = Path(str(file)).parts
        if parts and parts[0] != ".." and parts[0] != "__pycache__":
            entries.add(parts[0])
    return entries


def _content_key() -> str:
    sys.path.insert(0, str(MODULE_DIR))
    from MNSegmentSlicerLib import dependencies

    closure = sorted(f"{d.metadata['Name']}=={d.version}" for d in torch_closure())
    content = {
        "python": sys.version, "bundled": SLICER_BUNDLED, "torch": closure,
        "module": [r.spec for r in dependencies.REQUIREMENTS], "builder": Path(__file__).read_bytes().hex(),
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def cache_root() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mnsegment" / "slicer-env"
    return Path(os.environ.get("MNSEGMENT_SLICER_ENV_CACHE", default))


def env_python(folder: Path) -> Path:
    return folder / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _run(command: list[str], log: list[str], **kwargs) -> str:
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    log.append(f"$ {' '.join(map(str, command))}\n{result.stdout[-4000:]}{result.stderr[-4000:]}")
    if result.returncode != 0:
        raise RuntimeError("\n".join(log))
    return result.stdout


# The module's own install logic, run with the environment's interpreter (as it runs inside Slicer).
# dependencies.py is loaded on its own: the package's __init__ needs MRML, which only Slicer's process has.
_INSTALL_SCRIPT = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("dependencies", sys.argv[1])
dependencies = sys.modules["dependencies"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dependencies)
missing = dependencies.missing_packages()
assert not [r.name for r in missing if r.via != "pip"], missing  # Slicer's own packages and torch are there
problem = dependencies.torch_problem()
assert problem is None, problem
with open(sys.argv[2], "w", encoding="utf-8") as handle:
    handle.write("\\n".join(dependencies.constraints()) + "\\n")
print(json.dumps(dependencies.pip_arguments(missing, sys.argv[2])))
"""


def build(root: Path | None = None) -> Path:
    """The environment's folder, built if not cached yet. Raises RuntimeError with pip's output on failure."""
    root = root or cache_root()
    folder = root / _content_key()
    if (folder / "ready").is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    building = root / f"{folder.name}.building-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    log: list[str] = []
    try:
        _run([sys._base_executable, "-m", "venv", str(building)], log)
        python = str(env_python(building))
        pip = [python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "-q"]
        _run([*pip, "--no-deps", *SLICER_BUNDLED], log)
        stand_in = building / STAND_IN
        stand_in.mkdir()
        for dist in torch_closure():
            base = Path(str(dist.locate_file("")))
            for entry in _top_level_entries(dist):
                if (base / entry).exists() and not (stand_in / entry).exists():
                    (stand_in / entry).symlink_to(base / entry)
        site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], log).strip()
        # Relative to site-packages (how .pth lines are read), so the folder survives its rename below.
        relative = os.path.relpath(stand_in, site)
        Path(site, "mnsegment_torch_stand_in.pth").write_text(relative + "\n", encoding="utf-8")
        module = MODULE_DIR / "MNSegmentSlicerLib" / "dependencies.py"
        printed = _run([python, "-c", _INSTALL_SCRIPT, str(module), str(building / "c.txt")], log)
        arguments = json.loads(printed.strip().splitlines()[-1])
        if arguments:
            _run([*pip, *arguments], log)
        (building / "ready").write_text(json.dumps({"pip_arguments": arguments}), encoding="utf-8")
        if folder.exists():  # built meanwhile by another run
            shutil.rmtree(building, ignore_errors=True)
        else:
            building.rename(folder)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return folder


def installed(folder: Path) -> dict[str, str]:
    """{distribution: version} of what the environment itself holds (not the torch stand-in)."""
    out = subprocess.run(
        [str(env_python(folder)), "-c",
         "import importlib.metadata as m, json, sys, sysconfig;"
         "site = sysconfig.get_paths()['purelib'];"
         "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions(path=[site])}))"],
        capture_output=True, text=True, check=True).stdout
    return json.loads(out)


if __name__ == "__main__":  # python Testing/slicer_environment.py: build it and say where
    print(env_python(build()))

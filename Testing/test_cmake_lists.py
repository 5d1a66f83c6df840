"""Packaging of the Slicer extension: every script and resource is listed in a CMakeLists.txt.

A file left out of SCRIPTS/RESOURCES is silently missing from the installed extension, so this test lists the
files on disk under MNSegment/ and MNSegmentLib/ and compares them with what the CMake files install.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGED = ("MNSegment", "MNSegmentLib")
IGNORED_PARTS = {"__pycache__", ".pytest_cache", ".ruff_cache"}
IGNORED_SUFFIXES = {".pyc", ".pyo"}


def _strip_comments(text: str) -> str:
    """Drop ``# ...`` comments (a ``#`` inside a quoted string is kept)."""
    out = []
    for line in text.splitlines():
        quoted = False
        for i, char in enumerate(line):
            if char == '"':
                quoted = not quoted
            elif char == "#" and not quoted:
                line = line[:i]
                break
        out.append(line)
    return "\n".join(out)


def _tokens(body: str) -> list[str]:
    return [t.strip('"') for t in re.findall(r'"[^"]*"|[^\s"]+', body)]


def _variables(text: str) -> dict[str, list[str]]:
    """``set(NAME a b c)`` → ``{"NAME": ["a", "b", "c"]}`` (values with ``${VAR}`` expanded)."""
    text = _strip_comments(text)
    values: dict[str, list[str]] = {}
    for name, body in re.findall(r"\bset\(\s*(\w+)((?:[^()]|\([^()]*\))*)\)", text, flags=re.IGNORECASE):
        items = _tokens(body)
        expanded = []
        for item in items:
            for var, val in values.items():
                if len(val) == 1:
                    item = item.replace("${" + var + "}", val[0])
            expanded.append(item)
        values[name] = expanded
    return values


def _macro_calls(text: str) -> list[str]:
    return re.findall(r"slicerMacroBuildScriptedModule\(((?:[^()]|\([^()]*\))*)\)", _strip_comments(text))


def _listed(cmake: Path) -> set[Path]:
    """Files installed by the slicerMacroBuildScriptedModule calls of one CMakeLists.txt."""
    text = cmake.read_text(encoding="utf-8")
    values = _variables(text)
    files: set[Path] = set()
    for call in _macro_calls(text):
        tokens = _tokens(call)
        section = None
        for token in tokens:
            if token in ("NAME", "SCRIPTS", "RESOURCES"):
                section = token
                continue
            if token in ("WITH_GENERIC_TESTS", "WITH_SUBDIR", "VERBOSE"):
                section = None
                continue
            if section not in ("SCRIPTS", "RESOURCES"):
                continue
            match = re.fullmatch(r"\$\{(\w+)\}", token)
            entries = values.get(match.group(1), []) if match else [token]
            for entry in entries:
                if section == "SCRIPTS" and not entry.endswith(".py"):
                    entry += ".py"
                files.add((cmake.parent / entry).resolve())
    return files


def _cmake_files() -> list[Path]:
    found = [REPO / "CMakeLists.txt"]
    for top in PACKAGED:
        found += sorted((REPO / top).rglob("CMakeLists.txt"))
    return found


def _on_disk() -> set[Path]:
    files = set()
    for top in PACKAGED:
        for path in (REPO / top).rglob("*"):
            if not path.is_file() or path.name == "CMakeLists.txt":
                continue
            if IGNORED_PARTS & set(path.relative_to(REPO).parts) or path.suffix in IGNORED_SUFFIXES:
                continue
            files.add(path.resolve())
    return files


def _all_listed() -> set[Path]:
    listed: set[Path] = set()
    for cmake in _cmake_files():
        listed |= _listed(cmake)
    return listed


def test_every_script_and_resource_is_listed():
    missing = sorted(str(p.relative_to(REPO)) for p in _on_disk() - _all_listed())
    assert not missing, (
        "Files not listed in any CMakeLists.txt (they would be missing from the installed extension): "
        + ", ".join(missing)
    )


def test_every_listed_file_exists():
    ghosts = sorted(str(p.relative_to(REPO)) for p in _all_listed() if not p.is_file())
    assert not ghosts, "CMakeLists.txt lists files that do not exist: " + ", ".join(ghosts)


def test_every_package_folder_with_python_has_its_cmake_and_is_added():
    top = _strip_comments((REPO / "CMakeLists.txt").read_text(encoding="utf-8"))
    added = set(re.findall(r"add_subdirectory\(\s*([^\s)]+)\s*\)", top))
    assert {"MNSegment", "MNSegmentLib"} <= added
    module = _strip_comments((REPO / "MNSegment" / "CMakeLists.txt").read_text(encoding="utf-8"))
    assert "add_subdirectory(MNSegmentSlicerLib)" in module.replace(" ", "")
    # Packages are installed WITH_SUBDIR, whose destination is the CMake folder's name: the package name.
    packages = (REPO / "MNSegmentLib", REPO / "MNSegment" / "MNSegmentSlicerLib")
    for cmake in (folder / "CMakeLists.txt" for folder in packages):
        text = cmake.read_text(encoding="utf-8")
        assert "WITH_SUBDIR" in _strip_comments(text)
        assert _variables(text)["MODULE_NAME"] == [cmake.parent.name]
    # No .py directly in the module folder other than the module itself (each would be taken for a module).
    assert sorted(p.name for p in (REPO / "MNSegment").glob("*.py")) == ["MNSegment.py"]


def test_extension_metadata():
    values = _variables((REPO / "CMakeLists.txt").read_text(encoding="utf-8"))
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL",
                "EXTENSION_DEPENDS"):
        assert values.get(key), key
    assert "EXTENSION_SCREENSHOTURLS" in values  # may be empty (README, "Packaging"), never a missing file
    assert values["EXTENSION_DEPENDS"] == ["PyTorch"]
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    for needle in ("find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})",
                   "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"):
        assert needle in text
    entry = json.loads((REPO / "MNSegment.json").read_text(encoding="utf-8"))
    assert entry["build_dependencies"] == ["PyTorch"]
    assert entry["category"] and entry["scm_url"].startswith("https://") and entry["scm_revision"]
    assert entry["$schema"].startswith("https://raw.githubusercontent.com/Slicer/Slicer/")
    assert "Apache License" in (REPO / "LICENSE").read_text(encoding="utf-8")[:200]


def test_icon_is_128_pixels():
    icon = REPO / "MNSegment" / "Resources" / "Icons" / "MNSegment.png"
    data = icon.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (128, 128)
    assert len(data) < 50_000


@pytest.mark.parametrize("ui", sorted((REPO / "MNSegment" / "Resources" / "UI").glob("*.ui")), ids=lambda p: p.name)
def test_ui_file_parses_and_names_parameters(ui):
    import xml.etree.ElementTree as ET

    root = ET.parse(ui).getroot()
    names = {w.get("name") for w in root.iter("widget")}
    for required in ("trainButton", "resumeButton", "trainMoreButton", "segmentButton", "progressBar",
                     "logTextEdit", "labeledTable", "unlabeledList", "presetComboBox", "deviceComboBox", "gpuLabel",
                     "advancedGroupBox"):
        assert required in names, required
    module = (REPO / "MNSegment" / "MNSegment.py").read_text(encoding="utf-8")
    bound = [p.find("string").text for p in root.iter("property") if p.get("name") == "SlicerParameterName"]
    for parameter in bound:  # every widget bound to the parameter node names an existing parameter
        assert re.search(rf"^\s+{parameter}: ", module, flags=re.MULTILINE), parameter


#: The rules of Slicer/ExtensionsIndex scripts/check_description_files.py that can be checked offline.
SCHEMA_V1_0_1_KEYS = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
                      "build_subdirectory", "enabled", "tier"}


def test_extensions_index_checks():
    import urllib.parse

    entry_path = REPO / "MNSegment.json"
    entry = json.loads(entry_path.read_text(encoding="utf-8"))
    assert b"\r" not in entry_path.read_bytes()  # LF only
    assert set(entry) <= SCHEMA_V1_0_1_KEYS and {"$schema", "category", "scm_url"} <= set(entry)
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.1.json#")
    assert entry["category"] == "Segmentation" and 1 <= entry["tier"] <= 5
    # The extension name (the .json's name) is the CMake project and does not start with "Slicer"; the
    # repository's name does.
    cmake = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.findall(r"project\s*\(\s*([^\s\)]+)", cmake, re.IGNORECASE)[0] == entry_path.stem == "MNSegment"
    url = urllib.parse.urlsplit(entry["scm_url"])
    owner, repository = url.path.strip("/").removesuffix(".git").split("/")
    assert url.scheme == "https" and url.netloc == "github.com" and repository.startswith("Slicer")
    # Icon and screenshot URLs: raw files of that repository at its revision that exist here (no 404).
    values = _variables(cmake)
    prefix = f"https://raw.githubusercontent.com/{owner}/{repository}/{entry['scm_revision']}/"
    for url in [u for u in values["EXTENSION_ICONURL"] + values["EXTENSION_SCREENSHOTURLS"] if u]:
        assert url.startswith(prefix), url
        path = REPO / url.removeprefix(prefix)
        assert path.is_file() and path.suffix.lower() in (".png", ".jpg", ".jpeg", ".gif"), url
    assert values["EXTENSION_HOMEPAGE"][0].startswith(f"https://github.com/{owner}/{repository}")

"""The datalist: which images are labeled, which are not, and what the label values mean."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from MNSegmentLib.errors import InputError


@dataclass
class Case:
    image: Path
    label: Path | None = None

    @property
    def name(self) -> str:
        from MNSegmentLib.data.io import case_name

        return case_name(self.image)


@dataclass
class Datalist:
    labeled: list[Case]
    unlabeled: list[Case] = field(default_factory=list)
    validation: list[Case] = field(default_factory=list)
    classes: dict[int, str] = field(default_factory=dict)  # label value -> name; empty = from the label files

    def to_json(self) -> dict:
        """Absolute paths, so a run folder's copy stays valid wherever the original JSON was."""

        def cases(items: list[Case]) -> list[dict]:
            return [{"image": str(c.image), **({"label": str(c.label)} if c.label else {})} for c in items]

        return {
            "labeled": cases(self.labeled),
            "unlabeled": cases(self.unlabeled),
            "validation": cases(self.validation),
            "classes": {str(k): v for k, v in sorted(self.classes.items())},
        }


def load_datalist(path: str | Path, check_files: bool = True) -> Datalist:
    """Parses and checks the structure of a datalist; file contents are checked in preprocessing.

    ``check_files=False`` is for a run folder's own copy: training reads its cache, not the original files.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: datalist not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not valid JSON ({err}); see the datalist format in README.md") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: the datalist must be a JSON object with 'labeled' and 'unlabeled' lists")
    unknown = set(raw) - {"labeled", "unlabeled", "validation", "classes"}
    if unknown:
        raise InputError(f"{path}: unknown datalist keys {sorted(unknown)}; allowed: labeled, unlabeled, "
                         "validation, classes")
    root = path.parent

    def cases(key: str, need_label: bool) -> list[Case]:
        items = raw.get(key, [])
        if not isinstance(items, list):
            raise InputError(f"{path}: '{key}' must be a list of {{\"image\": ...}} objects")
        out = []
        for i, item in enumerate(items):
            if not isinstance(item, dict) or not isinstance(item.get("image"), str):
                raise InputError(f"{path}: {key}[{i}] must be an object with an \"image\" path")
            if need_label and not isinstance(item.get("label"), str):
                raise InputError(f"{path}: {key}[{i}] ({item['image']}) has no \"label\" path")
            image = (root / item["image"]).resolve()
            label = (root / item["label"]).resolve() if need_label else None
            for p in (image, label):
                if check_files and p is not None and not p.exists():
                    raise InputError(f"{path}: {key}[{i}] refers to {p}, which does not exist")
            out.append(Case(image, label))
        return out

    labeled = cases("labeled", True)
    if not labeled:
        raise InputError(f"{path}: 'labeled' is empty; at least one labeled volume is needed")
    # A labeled image listed as unlabeled too is simply labeled (handy for "all my images" lists).
    labeled_images = {c.image for c in labeled}
    unlabeled = [c for c in cases("unlabeled", False) if c.image not in labeled_images]
    validation = cases("validation", True)
    classes_raw = raw.get("classes", {})
    if not isinstance(classes_raw, dict):
        raise InputError(f"{path}: 'classes' must map label values to names, e.g. {{\"1\": \"liver\"}}")
    classes = {}
    for key, name in classes_raw.items():
        try:
            value = int(key)
        except ValueError:
            raise InputError(f"{path}: class key '{key}' is not an integer label value") from None
        if value <= 0:
            raise InputError(f"{path}: class key '{key}': label values must be positive (0 is background)")
        classes[value] = str(name)
    seen: dict[Path, str] = {}
    for key, items in (("labeled", labeled), ("validation", validation)):
        for c in items:
            if c.image in seen:
                raise InputError(f"{path}: {c.image} is listed twice ({seen[c.image]} and {key})")
            seen[c.image] = key
    names = [c.name for c in labeled + unlabeled]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise InputError(f"{path}: several images share the name(s) {sorted(duplicates)}; give every image a "
                         "distinct file name (outputs are named after them)")
    return Datalist(labeled, unlabeled, validation, classes)

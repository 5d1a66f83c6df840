"""``train --preview IMAGE``: the current prediction of IMAGE, on IMAGE's own grid, at each checkpoint (issue 12.2)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from engine_fixtures import TINY_SET, make_dataset, parse_events, run_cli, set_args, sphere_arrays, to_image

from MNSegmentLib.errors import InputError
from MNSegmentLib.training import preview
from MNSegmentLib.workflow import train


def test_preview_is_written_on_the_input_grid_at_each_checkpoint(tmp_path):
    datalist = make_dataset(tmp_path / "data", n_labeled=3, n_unlabeled=1)
    listed = json.loads(datalist.read_text())
    listed["validation"] = [listed["labeled"].pop()]  # a validation Dice every step (validate_every 1)
    datalist.write_text(json.dumps(listed))
    # A volume outside the datalist whose grid differs from the training grid in every respect: size, spacing,
    # origin and an oblique direction, so any shortcut (the preprocessed grid, the canonical orientation) shows.
    image, _ = sphere_arrays(np.random.default_rng(5), shape=(30, 26, 14), spacing=(1.2, 0.9, 2.5))
    c, s = np.cos(0.4), np.sin(0.4)
    direction = np.array([[c, -s, 0.0], [0.0, 0.0, -1.0], [s, c, 0.0]])  # rotated and permuted
    chosen = tmp_path / "chosen image.nrrd"
    sitk.WriteImage(to_image(image, spacing=(1.2, 0.9, 2.5), origin=(7.0, -3.0, 11.0), direction=direction),
                    str(chosen))
    run_dir = tmp_path / "run"
    result = run_cli("train", datalist, "--output", run_dir, "--preset", "quick", "--device", "cpu", "--events",
                     "--preview", chosen, *set_args({**TINY_SET, "train.steps": 4, "train.checkpoint_every": 2,
                                                   "train.validate_every": 1}))
    assert result.returncode == 0, result.stderr[-3000:]
    events = parse_events(result.stdout)
    previews = [e for e in events if e["event"] == "preview"]
    assert [e["step"] for e in previews] == [2, 4]  # each checkpoint, the last one included
    assert all(e["path"] == str(run_dir / "preview.nii.gz") and e["image"] == str(chosen) for e in previews)
    assert events.index(previews[-1]) < [e["event"] for e in events].index("done")
    # Progress events come at most once a second, but every validation Dice is reported (the live chart's points).
    # (A pause longer than a second, e.g. a slow pseudo-mask refresh on a loaded machine, repeats the last step's
    # progress with an "activity": not a new point.)
    validated = [e["step"] for e in events
                 if e["event"] == "progress" and e.get("val_dice") is not None and "activity" not in e]
    assert validated == [1, 2, 3, 4]

    written, original = sitk.ReadImage(str(run_dir / "preview.nii.gz")), sitk.ReadImage(str(chosen))
    assert written.GetSize() == original.GetSize()
    for what in ("GetSpacing", "GetOrigin", "GetDirection"):
        np.testing.assert_allclose(getattr(written, what)(), getattr(original, what)(), atol=1e-5, err_msg=what)
    assert set(np.unique(sitk.GetArrayFromImage(written))) <= {0, 1}  # the datalist's label values
    assert not list(run_dir.glob(".preview*"))  # written atomically: no temporary file left behind


def test_unreadable_preview_is_refused_before_anything_is_made(tmp_path):
    """In-process (the CLI turns an InputError into exit code 2 and its one line, test_engine_cli.py)."""
    datalist = make_dataset(tmp_path / "data", n_labeled=1, n_unlabeled=0)
    missing = tmp_path / "nowhere.nii.gz"
    with pytest.raises(InputError, match=f"--preview {re.escape(str(missing))}: file not found"):
        train(datalist, tmp_path / "run", "quick", "cpu", {**TINY_SET, "train.steps": 4, "preview": str(missing)})
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob(".run*"))


def test_a_preview_that_would_exceed_the_budget_is_skipped():
    """The previews' share of the time since training started stays within BUDGET_SHARE (5 %), at the last
    preview's cost; the first and the final preview are always written."""
    now = [100.0]
    budgeted = preview.Preview(Path("x.nii.gz"), None, None, None, Path("preview.nii.gz"), clock=lambda: now[0])
    assert budgeted.due()  # nothing spent yet: the first preview shows as soon as there is one
    now[0] = 110.0
    budgeted.spend(2.0)  # 2 s for one preview
    now[0] = 130.0  # 30 s in: a second 2 s preview would make 4 s of 32 s, 12.5 %
    assert not budgeted.due() and budgeted.due(final=True)
    now[0] = 178.0  # 78 s in: 4 s of 80 s, exactly 5 %
    assert budgeted.due()
    now[0] = 177.0
    assert not budgeted.due()


def test_training_skips_the_previews_over_budget_but_writes_the_first_and_the_last(tmp_path, monkeypatch):
    datalist = make_dataset(tmp_path / "data", n_labeled=1, n_unlabeled=1)
    steps = []
    write = preview.Preview.write

    def recording(self, *args):
        steps.append(args[-2])  # (..., step, events)
        return write(self, *args)

    monkeypatch.setattr(preview.Preview, "write", recording)
    monkeypatch.setattr(preview, "BUDGET_SHARE", 0.0)  # no budget: every preview but the first and last skipped
    chosen = str(datalist.parent / json.loads(datalist.read_text())["unlabeled"][0]["image"])
    train(datalist, tmp_path / "run", "quick", "cpu",
          {**TINY_SET, "train.steps": 4, "train.checkpoint_every": 1, "preview": chosen})
    assert steps == [1, 4]
    assert (tmp_path / "run" / "preview.nii.gz").exists()

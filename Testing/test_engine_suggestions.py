"""Suggestions of what to label next (issue 12.1): scoring, ranking, maps on the input grid, the CLI and the
``done`` event of a real training.

The ranking test builds two networks that disagree on one known volume: both threshold the intensity, at
different levels, and only that volume's structure lies between the two levels. They run through the engine's
real scoring path (sliding-window inference, the 2D network slice by slice, resampling back to the input grid).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from engine_fixtures import parse_events, run_cli, to_image, trained_run

from MNSegmentLib import config as configuration
from MNSegmentLib.data.preprocess import Plan
from MNSegmentLib.errors import Cancelled, InputError
from MNSegmentLib.inference.suggestions import (
    MAP_SUFFIX,
    SUGGESTIONS_FILE,
    Scorer,
    score_probabilities,
    suggest_files,
)
from MNSegmentLib.workflow import suggest

SHAPE = (24, 20, 12)
SPACING = (1.0, 1.2, 2.0)
DIRECTION = np.diag([-1.0, -1.0, 1.0])  # RAS-like: canonical orientation flips two axes, the maps flip back


class Threshold(torch.nn.Module):
    """Calls voxels (or 2D pixels) above ``level`` foreground, confidently away from it."""

    def __init__(self, level: float):
        super().__init__()
        self.level = level

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = (x - self.level) * 0.1
        return torch.cat([-s, s], 1)


def _ball(shape=SHAPE, centre=(14, 8, 6), radius=4.0) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1) * np.asarray(SPACING)
    return np.linalg.norm(grid - np.asarray(centre) * np.asarray(SPACING), axis=-1) <= radius


def _write_cases(folder: Path, brightness: dict[str, float]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, value in brightness.items():
        image = to_image((_ball() * value).astype(np.float32), spacing=SPACING, origin=(5.0, -3.0, 7.0),
                         direction=DIRECTION)
        paths.append(folder / f"{name}.nii.gz")
        sitk.WriteImage(image, str(paths[-1]))
    return paths


def _scorer() -> tuple[Scorer, Plan]:
    config = configuration.apply_overrides(configuration.preset("quick"), {"sampling.patch_size": [16, 16, 8]})
    # 3D calls anything above 100 foreground, 2D only above 200: a structure of brightness 150 splits them.
    scorer = Scorer(Threshold(200.0), Threshold(100.0), config, (config["data"]["slice_axis"],), torch.device("cpu"))
    plan = Plan(list(SPACING), "none", None, [0, 1], {"1": "ball"})
    return scorer, plan


def test_the_volume_the_networks_disagree_on_ranks_first_with_its_map_on_the_input_grid(tmp_path):
    paths = _write_cases(tmp_path / "images", {"easy_a": 300.0, "split": 150.0, "easy_b": 400.0, "easy_c": 250.0})
    scorer, plan = _scorer()
    record = suggest_files(paths, tmp_path / "out", plan, scorer)

    ranked = [v["name"] for v in record["volumes"]]
    assert ranked[0] == "split", record["volumes"]
    top, others = record["volumes"][0], record["volumes"][1:]
    assert top["disagreement"] > 0.99 and top["uncertainty"] > 0.9  # 3D says ball, 2D says nothing
    assert all(v["disagreement"] < 0.01 for v in others)
    assert [v["rank"] for v in record["volumes"]] == [1, 2, 3, 4]
    assert json.loads((tmp_path / "out" / SUGGESTIONS_FILE).read_text())["volumes"] == record["volumes"]

    original = sitk.ReadImage(str(paths[1]))
    written = sitk.ReadImage(str(tmp_path / "out" / top["map"]))
    assert top["map"] == f"split{MAP_SUFFIX}"
    for what in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert np.allclose(getattr(written, what)(), getattr(original, what)()), what
    percent = sitk.GetArrayFromImage(written).transpose(2, 1, 0)
    ball = _ball()
    assert percent[ball].mean() > 90 and percent[~ball].max() < 50  # the disagreement is where the ball is

    slice_ = top["slice"]  # the slice cuts the ball, and the point to jump to lies in the ball
    assert np.take(ball, slice_["index"], axis=slice_["axis"]).any()
    index = original.TransformPhysicalPointToIndex(slice_["point_lps"])
    assert ball[index]
    assert slice_["point_ras"] == [-slice_["point_lps"][0], -slice_["point_lps"][1], slice_["point_lps"][2]]


def test_agreeing_networks_score_zero_disagreement():
    p = torch.softmax(torch.randn(3, 8, 8, 4), 0)
    scores, voxel_map = score_probabilities(p, p.clone())
    assert scores.disagreement == 0.0 and float(voxel_map.max()) == 0.0
    assert 0.0 <= scores.uncertainty <= 1.0 and scores.score == scores.uncertainty / 2


def test_a_stop_half_way_leaves_the_previous_suggestions_untouched(tmp_path):
    paths = _write_cases(tmp_path / "images", {"a": 300.0, "b": 150.0})
    scorer, plan = _scorer()
    out = tmp_path / "out"
    first = suggest_files(paths[:1], out, plan, scorer)

    def stop_after_first(i, path, volume):
        if i == 0:
            raise Cancelled()

    with pytest.raises(Cancelled):
        suggest_files(paths, out, plan, scorer, on_case=stop_after_first)
    assert json.loads((out / SUGGESTIONS_FILE).read_text()) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "out"]  # no partial folder left


# -- the real CLI on the session's tiny trained run ------------------------------------------------------------
def test_training_ends_with_suggestions_in_its_done_event(tmp_path_factory):
    run = trained_run(tmp_path_factory)
    done = run.events[-1]
    assert done["event"] == "done"
    unlabeled = [c["image"] for c in json.loads((run.run_dir / "datalist.json").read_text())["unlabeled"]]
    assert sorted(v["image"] for v in done["suggestions"]) == sorted(unlabeled)
    assert [v["rank"] for v in done["suggestions"]] == list(range(1, len(unlabeled) + 1))
    assert all(Path(v["map"]).is_file() for v in done["suggestions"])
    assert Path(done["suggestions_file"]) == run.run_dir / "suggestions" / SUGGESTIONS_FILE
    assert done["suggestions_s"] >= 0


def test_cli_suggest_ranks_the_runs_unlabeled_volumes_and_refuses_bad_input(tmp_path_factory, tmp_path):
    run = trained_run(tmp_path_factory)
    out = tmp_path / "ranked"
    model = ["--model", str(run.run_dir)]
    calls = {
        "ok": ["suggest", *model, "--output", str(out), "--device", "cpu", "--events"],
        "missing": ["suggest", *model, str(tmp_path / "absent.nii.gz"), "--output", str(tmp_path / "m"), "--events"],
        "no_model": ["suggest", "--model", str(tmp_path), "--output", str(tmp_path / "x"), "--events"],
    }
    with ThreadPoolExecutor(len(calls)) as pool:
        results = dict(zip(calls, pool.map(lambda args: run_cli(*args), calls.values())))

    ok = results.pop("ok")
    assert ok.returncode == 0, ok.stderr[-2000:]
    events = parse_events(ok.stdout)
    assert [e["event"] for e in events].count("suggestion") == 2
    done = events[-1]
    assert done["event"] == "done" and Path(done["suggestions_file"]) == out / SUGGESTIONS_FILE
    saved = json.loads((out / SUGGESTIONS_FILE).read_text())
    assert [v["score"] for v in saved["volumes"]] == sorted((v["score"] for v in saved["volumes"]), reverse=True)
    assert "most disagreeing slice" in ok.stderr  # the table (stdout carries only events with --events)
    for name in [v["name"] for v in saved["volumes"]]:
        assert name in ok.stderr

    expected = {"missing": "absent.nii.gz", "no_model": "model.pt"}
    for name, result in results.items():
        assert result.returncode == 2, (name, result.stderr[-2000:])
        error = parse_events(result.stdout)[-1]
        assert error["event"] == "error" and error["exit_code"] == 2
        assert expected[name] in error["message"], (name, error["message"])
    assert not (tmp_path / "m").exists() and not (tmp_path / "x").exists()


def test_suggest_refuses_an_output_folder_holding_other_files(tmp_path_factory, tmp_path):
    run = trained_run(tmp_path_factory)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "mine.txt").write_text("keep me")
    with pytest.raises(InputError, match="occupied"):
        suggest(run.run_dir, output_dir=occupied, device="cpu")
    assert [p.name for p in occupied.iterdir()] == ["mine.txt"]

"""The ``mnsegment`` command line as real subprocesses: exit codes 0/1/2/3, JSON events, cancel and resume.

Bad-input cases run concurrently (each is a separate Python process whose start-up dominates its cost).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from engine_fixtures import (
    TINY_SET,
    TRAINED_STEPS,
    cli_command,
    cli_env,
    make_dataset,
    model_state,
    parse_events,
    run_cli,
    set_args,
    states_equal,
    to_image,
    train_args,
    trained_run,
)

PROGRESS_KEYS = {"stage", "step", "total_steps", "unlabeled_share", "lr_2d", "lr_3d", "loss_2d", "loss_3d", "eta_s"}


# -- bad input: exit code 2 ----------------------------------------------------------------------------------
def _rewrite_label(datalist: Path, index: int, array: np.ndarray, spacing=None, dtype=None) -> Path:
    """Replaces labeled case ``index``'s label map with ``array`` (x, y, z) on the image's grid."""
    entry = json.loads(datalist.read_text())["labeled"][index]
    image = sitk.ReadImage(str(datalist.parent / entry["image"]))
    label = to_image(array if dtype is None else array.astype(dtype))
    label.CopyInformation(image)
    if spacing is not None:
        label.SetSpacing(spacing)
    path = datalist.parent / entry["label"]
    sitk.WriteImage(label, str(path))
    return path


def _label_array(datalist: Path, index: int) -> np.ndarray:
    entry = json.loads(datalist.read_text())["labeled"][index]
    return sitk.GetArrayFromImage(sitk.ReadImage(str(datalist.parent / entry["label"]))).transpose(2, 1, 0)


def _error_cases(root: Path, run) -> dict[str, dict]:
    """name -> {args, expect (substrings of the error line), absent (paths that must not exist)}."""
    cases: dict[str, dict] = {}

    def train_case(name, datalist, expect, extra=(), output=None):
        out = output or root / name / "out"
        cases[name] = {"args": ["train", str(datalist), "--output", str(out), "--preset", "quick", "--device",
                                "cpu", "--events", *set_args(TINY_SET), *extra],
                       "expect": expect, "absent": [] if output else [out], "parent": out.parent}

    def dataset(name) -> Path:
        return make_dataset(root / name / "data", n_labeled=2, n_unlabeled=1)

    train_case("missing_datalist", root / "nowhere" / "datalist.json", ["nowhere/datalist.json", "not found"])
    bad_json = root / "bad_json" / "datalist.json"
    bad_json.parent.mkdir(parents=True)
    bad_json.write_text('{"labeled": [ {"image": "a.nii.gz", ')
    train_case("invalid_json", bad_json, [str(bad_json), "not valid JSON"])

    dl = dataset("label_other_grid")
    path = _rewrite_label(dl, 1, _label_array(dl, 1), spacing=(1.0, 1.0, 2.5))
    train_case("label_other_grid", dl, [str(path), "spacing"])

    dl = dataset("label_fractions")
    path = _rewrite_label(dl, 0, _label_array(dl, 0) * 0.5, dtype=np.float32)
    train_case("label_fractions", dl, [str(path), "integer"])

    dl = dataset("label_all_zero")
    path = _rewrite_label(dl, 1, np.zeros_like(_label_array(dl, 1)))
    train_case("label_all_zero", dl, [str(path), "no labeled voxel"])

    dl = dataset("label_not_in_classes")
    path = _rewrite_label(dl, 1, _label_array(dl, 1) * 2)  # value 2; classes only list 1
    cases_value = "label_not_in_classes"
    train_case(cases_value, dl, ["[2]", "classes"])
    cases[cases_value]["names_file"] = str(path)

    # images that are not one scalar 3D volume, as unlabeled images
    for name, image, expect in (
            ("image_2d", sitk.Image(32, 32, sitk.sitkFloat32), "is 2D"),
            ("image_4d", sitk.JoinSeries([sitk.Image(8, 8, 8, sitk.sitkFloat32)] * 2), "is 4D"),
            ("image_rgb", sitk.Image([16, 16, 8], sitk.sitkVectorFloat32, 3), "3 components per voxel")):
        dl = dataset(name)
        path = dl.parent / "images" / "case2.nrrd"
        sitk.WriteImage(image, str(path))
        raw = json.loads(dl.read_text())
        raw["unlabeled"] = [{"image": "images/case2.nrrd"}]
        dl.write_text(json.dumps(raw))
        train_case(name, dl, [str(path), expect])

    dl = dataset("same_file_name")
    (dl.parent / "other").mkdir()
    shutil.copy(dl.parent / "images" / "case0.nii.gz", dl.parent / "other" / "case0.nii.gz")
    raw = json.loads(dl.read_text())
    raw["unlabeled"].append({"image": "other/case0.nii.gz"})
    dl.write_text(json.dumps(raw))
    train_case("same_file_name", dl, [str(dl), "['case0']", "distinct file name"])

    dl = dataset("no_labeled")
    dl.write_text(json.dumps({**json.loads(dl.read_text()), "labeled": []}))
    train_case("no_labeled", dl, [str(dl), "'labeled' is empty"])

    # NaN/Inf voxels, in NRRD (SimpleITK reads NaN and Inf in NIfTI files as 0 already)
    dl = dataset("image_not_finite")
    raw = json.loads(dl.read_text())
    image = sitk.ReadImage(str(dl.parent / raw["labeled"][0]["image"]))
    values = sitk.GetArrayFromImage(image)
    values.flat[[5, 50, 500]] = np.nan
    values.flat[[7, 70]] = np.inf
    broken_image = sitk.GetImageFromArray(values)
    broken_image.CopyInformation(image)
    image_path = dl.parent / "images" / "case0.nrrd"
    sitk.WriteImage(broken_image, str(image_path))
    raw["labeled"][0]["image"] = "images/case0.nrrd"
    dl.write_text(json.dumps(raw))
    train_case("image_not_finite", dl, [str(image_path), "3 NaN and 2 infinite voxel(s)", "replace them"])

    dl = dataset("unreadable_image")
    image = dl.parent / "images" / "case2.nii.gz"  # the unlabeled one
    image.write_bytes(b"this is not a NIfTI file" * 10)
    train_case("unreadable_image", dl, [str(image), "cannot be read"])

    dl = dataset("settings")  # one valid dataset for the settings cases
    train_case("unknown_set_key", dl, ["train.stepz", "unknown setting"], extra=["--set", "train.stepz=3"])
    train_case("invalid_set_value", dl, ["sampling.batch_size"], extra=["--set", "sampling.batch_size=0"])
    train_case("bad_device", dl, ["--device banana"], extra=["--device", "banana"])
    missing_weights = root / "no_such_weights.pth"
    train_case("missing_2d_weights", dl, [str(missing_weights), "no such file"],
               extra=["--set", f"model2d.weights={missing_weights}"])
    train_case("patch_not_divisible", dl, ["sampling.patch_size"], extra=["--set", "sampling.patch_size=[30,30,16]"])
    train_case("output_holds_run", dl, [str(run.run_dir), "already holds a training run", "resume"],
               output=run.run_dir)

    # an output folder that cannot be written (chmod does not stop root: then a system folder)
    readonly = root / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    unwritable = readonly / "runs" if os.geteuid() != 0 else Path("/sys/mnsegment-test-runs")
    train_case("unwritable_output", dl, [str(unwritable), "cannot write there", "--output"],
               output=unwritable / "run")
    cases["unwritable_output"]["absent"] = [unwritable]
    cases["predict_unwritable_output"] = {
        "args": ["predict", str(run.datalist.parent / "images" / "case0.nii.gz"), "--model", str(run.run_dir),
                 "--output", str(unwritable / "pred"), "--device", "cpu", "--events"],
        "expect": [str(unwritable / "pred"), "cannot write there", "--output"], "absent": [unwritable],
        "parent": readonly}

    # the disk fills up (simulated by a file-size limit): while saving a checkpoint, and while writing a prediction
    full = root / "disk_full_checkpoint" / "run"
    shutil.copytree(run.run_dir, full, ignore=shutil.ignore_patterns("model.pt", "curves.png"))
    cases["disk_full_checkpoint"] = {
        "args": ["resume", str(full), "--events"], "limit": 5 * 2**20,  # checkpoint.pt is larger
        "expect": [str(full / "checkpoint.pt"), "could not be written", "File too large", "mnsegment resume"],
        "absent": [full / "model.pt"], "parent": full, "unchanged": full / "checkpoint.pt"}
    out = root / "disk_full_prediction" / "pred"
    cases["disk_full_prediction"] = {
        "args": ["predict", str(run.datalist.parent / "images" / "case0.nii.gz"), "--model", str(run.run_dir),
                 "--output", str(out), "--device", "cpu", "--events"], "limit": 64,
        "expect": [str(out / "case0.nii.gz"), "could not be written"], "absent": [out / "case0.nii.gz"],
        "parent": out}

    # predict with a run folder that has no model.pt
    unfinished = root / "unfinished_run"
    unfinished.mkdir()
    for name in ("config.json", "plan.json", "datalist.json"):
        shutil.copy(run.run_dir / name, unfinished / name)
    good_image = run.datalist.parent / "images" / "case0.nii.gz"
    out = root / "predict_no_model" / "pred"
    cases["predict_no_model"] = {"args": ["predict", str(good_image), "--model", str(unfinished), "--output",
                                          str(out), "--device", "cpu", "--events"],
                                 "expect": [str(unfinished), "model.pt"], "absent": [out], "parent": out.parent}
    # predict: the second of two images is unreadable -> nothing written, not even the first
    broken = root / "predict_bad_image" / "broken.nrrd"
    broken.parent.mkdir(parents=True)
    broken.write_text("NRRD0004\ngarbage\n")
    out = root / "predict_bad_image" / "pred"
    cases["predict_bad_image"] = {"args": ["predict", str(good_image), str(broken), "--model", str(run.run_dir),
                                           "--output", str(out), "--device", "cpu", "--events"],
                                  "expect": [str(broken)], "absent": [out], "parent": out.parent}
    return cases


@pytest.fixture(scope="module")
def error_runs(tmp_path_factory):
    run = trained_run(tmp_path_factory)
    root = tmp_path_factory.mktemp("errors")
    cases = _error_cases(root, run)
    before = {p.name for p in run.run_dir.iterdir()}
    with ThreadPoolExecutor(max_workers=4) as pool:
        unchanged = {name: case["unchanged"].read_bytes() for name, case in cases.items() if "unchanged" in case}
        futures = {name: pool.submit(run_cli, *case["args"], timeout=300, file_size_limit=case.get("limit"))
                   for name, case in cases.items()}
        results = {name: future.result() for name, future in futures.items()}
    for name, content in unchanged.items():
        cases[name]["unchanged_before"] = content
    return cases, results, run, before


ERROR_CASES = ["missing_datalist", "invalid_json", "label_other_grid", "label_fractions", "label_all_zero",
               "label_not_in_classes", "unreadable_image", "unknown_set_key", "invalid_set_value", "bad_device",
               "missing_2d_weights", "patch_not_divisible", "output_holds_run", "predict_no_model",
               "predict_bad_image", "image_2d", "image_4d", "image_rgb", "same_file_name", "no_labeled",
               "image_not_finite", "unwritable_output", "predict_unwritable_output", "disk_full_checkpoint",
               "disk_full_prediction"]
# Bad input found by building the networks (before any data is touched); these once left a run folder behind.
LEFT_BEHIND = {"missing_2d_weights", "patch_not_divisible"}


@pytest.mark.parametrize("name", ERROR_CASES)
def test_bad_input_exits_2_with_one_clear_message(error_runs, name):
    cases, results, run, before = error_runs
    case, result = cases[name], results[name]
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("mnsegment: error:")]
    assert len(errors) == 1, result.stderr
    for text in case["expect"]:
        assert text in errors[0], errors[0]
    # --events: stdout holds only JSON, ending with one error event carrying the same message and code 2
    events = parse_events(result.stdout)
    assert events and events[-1]["event"] == "error" and events[-1]["exit_code"] == 2
    assert [e["event"] for e in events].count("error") == 1
    assert events[-1]["message"] in errors[0]
    # nothing half-written
    for path in case["absent"]:
        assert not path.exists(), f"{path} was left behind"
    if case["parent"].exists():
        assert not [p.name for p in case["parent"].iterdir() if ".part" in p.name]  # incl. .partial, .part.nii.gz
    if "unchanged" in case:  # the last good checkpoint is intact and loadable
        assert case["unchanged"].read_bytes() == case["unchanged_before"]
        assert torch.load(case["unchanged"], weights_only=True)["step"] == TRAINED_STEPS
    if name == "output_holds_run":
        assert {p.name for p in run.run_dir.iterdir()} == before and (run.run_dir / "model.pt").exists()


def test_label_value_not_in_classes_names_the_label_file(error_runs):
    cases, results, _, _ = error_runs
    error = [line for line in results["label_not_in_classes"].stderr.splitlines()
             if line.startswith("mnsegment: error:")][0]
    assert cases["label_not_in_classes"]["names_file"] in error


@pytest.mark.parametrize("name", sorted(LEFT_BEHIND))
def test_failed_train_leaves_no_output_folder_when_the_networks_refuse_the_settings(error_runs, name):
    cases, results, _, _ = error_runs
    assert results[name].returncode == 2
    for path in cases[name]["absent"]:
        assert not path.exists(), f"{path} was left behind: {sorted(p.name for p in path.iterdir())}"


# -- success: exit code 0 and the event stream ---------------------------------------------------------------
def test_train_exits_0_with_json_events_only(tmp_path_factory):
    run = trained_run(tmp_path_factory)
    assert run.result.returncode == 0
    events = run.events  # parse_events already checked: every stdout line is JSON with "event"
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done"
    assert {"start", "progress", "checkpoint", "done"} <= set(kinds)
    start = events[0]
    total, stage2 = TRAINED_STEPS, TRAINED_STEPS // 2  # train.warmup_fraction 0.5
    assert start["total_steps"] == total and start["step"] == 0 and start["device"] == "cpu"
    assert start["stage2_start"] == stage2 and start["labeled"] == 3 and start["unlabeled"] == 2
    assert "no pretrained weights" in start["weights_2d"]
    progress = [e for e in events if e["event"] == "progress"]
    for e in progress:
        assert PROGRESS_KEYS <= set(e), e
        assert e["stage"] in ("warmup", "cotrain") and 0 <= e["unlabeled_share"] <= 1
        assert e["total_steps"] == total and e["eta_s"] >= 0
    assert [e["step"] for e in progress] == sorted({e["step"] for e in progress})
    assert progress[-1]["step"] == total and progress[-1]["eta_s"] == 0
    assert any(e["step"] == stage2 for e in progress)  # always reported at the start of stage 2
    assert all(e["stage"] == "warmup" for e in progress if e["step"] <= stage2)
    assert all(e["stage"] == "cotrain" for e in progress if e["step"] > stage2)
    assert events[-1]["model_dir"] == str(run.run_dir.absolute())
    checkpoint = [e for e in events if e["event"] == "checkpoint"]
    assert checkpoint[-1]["step"] == total and Path(checkpoint[-1]["path"]).exists()
    assert (run.run_dir / "model.pt").exists()


def test_settings_are_saved_in_config_json(tmp_path_factory):
    run = trained_run(tmp_path_factory)
    config = json.loads((run.run_dir / "config.json").read_text())
    assert config["preset"] == "quick" and config["device"] == "cpu"
    assert config["train"]["steps"] == TRAINED_STEPS and config["train"]["warmup_fraction"] == 0.5
    assert config["train"]["lr_3d"] == 0.005
    assert config["sampling"]["patch_size"] == [32, 32, 16] and config["sampling"]["batch_size"] == 2
    assert config["model2d"]["weights"] == "none"
    assert config["model3d"]["kwargs"]["channels"] == [16, 32, 64, 128]  # from the quick preset
    assert config["lrg"]["mode"] == "lr"  # untouched default


# -- cancel (exit 3) and resume ------------------------------------------------------------------------------
def _train_until_progress(args: list[str], sig: int) -> tuple[int, float, list[dict], str]:
    """Starts training, sends ``sig`` once a progress event was read; returns (code, seconds to exit, events,
    stderr)."""
    process = subprocess.Popen(cli_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=cli_env())
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            if json.loads(line)["event"] == "progress":
                break
        sent = time.monotonic()
        process.send_signal(sig)
        out, err = process.communicate(timeout=60)
        elapsed = time.monotonic() - sent
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return process.returncode, elapsed, parse_events("".join(lines) + out), err


def test_sigterm_cancels_then_resume_finishes_like_an_uninterrupted_run(tmp_path_factory):
    run = trained_run(tmp_path_factory)
    output = tmp_path_factory.mktemp("cancel") / "run"
    code, elapsed, events, stderr = _train_until_progress(train_args(run.datalist, output), signal.SIGTERM)
    assert code == 3, stderr[-3000:]
    assert elapsed < 20, f"took {elapsed:.1f} s to stop"
    assert "Traceback" not in stderr and "mnsegment resume" in stderr
    assert events[-1]["event"] == "cancelled"
    saved = [e for e in events if e["event"] == "checkpoint"]
    assert saved and (output / "checkpoint.pt").exists() and not (output / "model.pt").exists()
    stopped_at = saved[-1]["step"]
    assert 0 < stopped_at < TRAINED_STEPS

    resumed = run_cli("resume", str(output), "--events", timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    events = parse_events(resumed.stdout)
    assert events[0]["event"] == "start" and events[0]["step"] == stopped_at
    progress = [e for e in events if e["event"] == "progress"]
    assert progress[0]["step"] == stopped_at + 1 and progress[-1]["step"] == TRAINED_STEPS
    done = {key: events[-1].get(key) for key in ("event", "model_dir", "network", "network_reason")}
    choice = json.loads((output / "model.json").read_text())
    assert choice == json.loads((run.run_dir / "model.json").read_text())  # the uninterrupted run's choice
    assert choice["validation_cases"] == 0 and choice["reason"].startswith("no validation cases")
    assert done == {"event": "done", "model_dir": str(output), "network": choice["network"],
                    "network_reason": choice["reason"]}
    assert len(events[-1]["suggestions"]) == 2  # and what to label next (test_engine_suggestions.py)
    assert (output / "model.pt").exists()
    # every step's randomness derives from (seed, step): the result equals the uninterrupted run's exactly
    assert states_equal(model_state(output), model_state(run.run_dir))
    # and resuming a finished run is refused
    again = run_cli("resume", str(output))
    assert again.returncode == 2 and "nothing to resume" in again.stderr


def test_sigint_cancels_with_exit_3_and_a_checkpoint(tmp_path_factory):
    run = trained_run(tmp_path_factory)
    output = tmp_path_factory.mktemp("sigint") / "run"
    code, elapsed, events, stderr = _train_until_progress(train_args(run.datalist, output), signal.SIGINT)
    assert code == 3, stderr[-3000:]
    assert elapsed < 20, f"took {elapsed:.1f} s to stop"
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert events[-1]["event"] == "cancelled"
    assert (output / "checkpoint.pt").exists() and not (output / "model.pt").exists()


# -- unexpected failure: exit code 1 -------------------------------------------------------------------------
def test_corrupted_checkpoint_is_an_internal_error_exit_1(tmp_path_factory):
    """A checkpoint is only ever written by the engine, atomically; if it is unreadable anyway (disk damage,
    tampering) that is not a user input mistake the message could explain, so exit 1 with a traceback."""
    run = trained_run(tmp_path_factory)
    broken = tmp_path_factory.mktemp("corrupt") / "run"
    shutil.copytree(run.run_dir, broken, ignore=shutil.ignore_patterns("model.pt", "curves.png"))
    data = (broken / "checkpoint.pt").read_bytes()
    (broken / "checkpoint.pt").write_bytes(data[: len(data) // 3])  # truncated
    result = run_cli("resume", str(broken), "--device", "cpu", "--events")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" in result.stderr
    events = parse_events(result.stdout)
    assert events[-1]["event"] == "error" and events[-1]["exit_code"] == 1
    assert not (broken / "model.pt").exists()


# -- no unlabeled volumes: the labeled-only baseline, said up front ------------------------------------------
def test_training_without_unlabeled_volumes_finishes_labeled_only_with_a_warning(tmp_path):
    """Once looped forever at the start of stage 2 (no pseudo-masks to compute, so never 'refreshed')."""
    datalist = make_dataset(tmp_path / "data", n_labeled=2, n_unlabeled=0)
    output = tmp_path / "run"
    result = run_cli("train", str(datalist), "--output", str(output), "--preset", "quick", "--device", "cpu",
                     "--events", *set_args({**TINY_SET, "train.steps": 4, "train.warmup_fraction": 0.5}),
                     timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    events = parse_events(result.stdout)
    warnings = [e for e in events if e["event"] == "warning"]
    assert len(warnings) == 1 and "no unlabeled volumes" in warnings[0]["message"]
    kinds = [e["event"] for e in events]
    assert kinds.index("warning") < kinds.index("start") and kinds[-1] == "done"
    # the command line says so before preprocessing starts
    assert result.stderr.index("no unlabeled volumes") < result.stderr.index("checking and preprocessing")
    progress = [e for e in events if e["event"] == "progress"]
    assert progress[-1]["step"] == 4 and all(e["unlabeled_share"] == 0 for e in progress)
    assert (output / "model.pt").exists() and not (output / "pseudo").exists()


# -- kill -9 between a pseudo-mask refresh and the next checkpoint ------------------------------------------
def test_kill_9_after_a_refresh_then_resume_equals_the_uninterrupted_run(tmp_path_factory):
    """No chance to save: the run continues from its last periodic checkpoint (step 24), which predates the
    refresh at step 27. The masks it names must still be on disk as they were: they were once overwritten in
    place, and steps 24-26 then cropped around the newer masks."""
    run = trained_run(tmp_path_factory)
    output = tmp_path_factory.mktemp("kill9") / "run"
    args = train_args(run.datalist, output) + set_args({"train.checkpoint_every": 24})  # same weights, more saves
    with open(output.parent / "stdout.txt", "w") as stdout:
        process = subprocess.Popen(cli_command(*args), stdout=stdout, stderr=subprocess.PIPE, text=True,
                                   env=cli_env())
        refreshes = 0
        try:
            for line in process.stderr:
                refreshes += "pseudo-masks of" in line
                if refreshes == 2:  # refreshed at step 27 (after 15): kill before the final save at step 30
                    process.send_signal(signal.SIGKILL)
                    break
            process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert process.returncode == -signal.SIGKILL
    events = parse_events((output.parent / "stdout.txt").read_text())
    saved = [e["step"] for e in events if e["event"] == "checkpoint"]
    assert saved == [24] and not (output / "model.pt").exists()

    resumed = run_cli("resume", str(output), "--events", timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert parse_events(resumed.stdout)[0]["step"] == 24
    assert states_equal(model_state(output), model_state(run.run_dir))
    assert sorted(p.name for p in (output / "pseudo").iterdir()) == ["v1"]  # older versions are cleaned up
    assert not list(output.glob("*.part"))

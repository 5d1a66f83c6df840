"""``mnsegment train --init-from RUN``: a new run starts from a finished run's networks; incompatible sources are
refused with exit code 2 and nothing written."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from engine_fixtures import (
    TINY_SET,
    make_dataset,
    model_state,
    parse_events,
    run_cli,
    set_args,
    states_equal,
    trained_run,
)

from MNSegmentLib import config as configuration
from MNSegmentLib import workflow
from MNSegmentLib.errors import InputError
from MNSegmentLib.training.continuation import sha256
from MNSegmentLib.training.trainer import CHECKPOINT, MODEL, Trainer


def _states_at_first_step(monkeypatch) -> list[dict[str, torch.Tensor]]:
    """Records both networks' tensors each time a Trainer starts its loop (before its first step)."""
    seen = []
    original = Trainer._loop

    def loop(self, *args):
        seen.append({f"{net}.{k}": v.detach().clone() for net, model in (("model2d", self.model2d),
                                                                        ("model3d", self.model3d))
                     for k, v in model.state_dict().items()})
        return original(self, *args)

    monkeypatch.setattr(Trainer, "_loop", loop)
    return seen


def test_init_from_starts_from_the_source_weights_and_records_it(tmp_path_factory, monkeypatch):
    source = trained_run(tmp_path_factory)
    root = tmp_path_factory.mktemp("init_from")
    datalist = make_dataset(root / "data", n_labeled=4, n_unlabeled=1, seed=5)  # "after adding labels"
    seen = _states_at_first_step(monkeypatch)
    run_dir = workflow.train(datalist, root / "run", "quick", "cpu", {**TINY_SET, "train.steps": 2},
                             init_from=source.run_dir)

    assert states_equal(seen[0], model_state(source.run_dir))  # the ImageNet/random init is not used
    assert not states_equal(model_state(run_dir), model_state(source.run_dir))  # and it trained from there
    config = json.loads((run_dir / "config.json").read_text())
    assert config["init_from"] == {"run": str(source.run_dir), "model_sha256": sha256(source.run_dir / MODEL)}
    quick = configuration.preset("quick")["train"]  # 2 steps, shorter than half the source's: fine-tuning rates
    assert (config["train"]["lr_2d"], config["train"]["lr_3d"]) == pytest.approx((quick["lr_2d"] / 10,
                                                                                   quick["lr_3d"] / 10))
    source_plan = json.loads((source.run_dir / "plan.json").read_text())
    plan = json.loads((run_dir / "plan.json").read_text())
    for key in ("target_spacing", "normalization", "ct_window", "label_values"):
        assert plan[key] == source_plan[key], key
    checkpoint = torch.load(run_dir / CHECKPOINT, weights_only=True)
    assert checkpoint["weights_2d"] == f"from {source.run_dir}"

    # Stopped before its first checkpoint (kill -9): resume starts from the source's weights again.
    (run_dir / CHECKPOINT).unlink()
    (run_dir / MODEL).unlink()
    workflow.resume(run_dir, "cpu")
    assert states_equal(seen[1], model_state(source.run_dir))


def test_default_steps_are_a_quarter_of_the_source_and_data_settings_can_be_overridden(tmp_path_factory):
    from MNSegmentLib.training.continuation import SourceRun

    source = SourceRun.open(trained_run(tmp_path_factory).run_dir)
    inherited = source.inherited({"data.target_spacing": [2.0, 2.0, 2.0]}, steps_set=False)
    assert inherited["train.steps"] == round(source.config["train"]["steps"] / 4)
    assert inherited["data.target_spacing"] == [2.0, 2.0, 2.0]
    assert inherited["model3d.kwargs"] == source.config["model3d"]["kwargs"]
    assert "train.steps" not in source.inherited({}, steps_set=True)


def test_a_short_continued_run_fine_tunes_at_a_tenth_of_the_presets_learning_rates(tmp_path_factory):
    from MNSegmentLib.training.continuation import SourceRun

    source = SourceRun.open(trained_run(tmp_path_factory).run_dir)
    preset = configuration.preset("quick")
    source.config = {**source.config, "train": {**source.config["train"], "steps": 200}}

    def rates(steps: int, overrides: dict | None = None) -> tuple[float, float]:
        config = configuration.apply_overrides(preset, {"train.steps": steps, **(overrides or {})})
        source.fine_tune(config, {"train.steps": steps, **(overrides or {})})
        return config["train"]["lr_2d"], config["train"]["lr_3d"]

    full = preset["train"]["lr_2d"], preset["train"]["lr_3d"]
    assert rates(50) == pytest.approx((full[0] / 10, full[1] / 10))  # the default quarter of RUN's steps
    assert rates(100) == pytest.approx(full)  # half RUN's steps or more: the preset's rates
    assert rates(50, {"train.lr_3d": 5e-4}) == pytest.approx((full[0] / 10, 5e-4))  # a --set rate stays


def test_init_from_a_changed_model_file_is_refused(tmp_path_factory):
    from MNSegmentLib.training.continuation import SourceRun

    source = SourceRun.open(trained_run(tmp_path_factory).run_dir)
    source.model_sha256 = "0" * 64  # as if model.pt had been replaced after the new run was made
    with pytest.raises(InputError, match="has changed"):
        source.load_state()


def test_incompatible_sources_exit_2_and_write_nothing(tmp_path_factory):
    source = trained_run(tmp_path_factory)
    root = tmp_path_factory.mktemp("init_from_errors")
    two_classes = make_dataset(root / "two", classes={"1": "ball", "2": "cube"})
    same = make_dataset(root / "same")
    cases = {  # name -> (datalist, --init-from, extra --set, expected substrings)
        "class_count": (two_classes, source.run_dir, {}, [str(source.run_dir), "2 classes", "3 classes"]),
        "not_a_run": (same, root / "same", {}, [str(root / "same"), "not a finished"]),
        "architecture": (same, source.run_dir, {"model2d.decoder_channels": 8},
                         [str(source.run_dir), "model2d.decoder_channels"]),
    }

    def train(name: str):
        datalist, init_from, extra, _ = cases[name]
        return run_cli("train", datalist, "--output", root / f"out_{name}", "--preset", "quick", "--device", "cpu",
                       "--events", "--init-from", init_from, *set_args({**TINY_SET, **extra}))

    with ThreadPoolExecutor(max_workers=3) as pool:
        results = dict(zip(cases, pool.map(train, cases)))
    for name, result in results.items():
        assert result.returncode == 2, (name, result.stderr[-2000:])
        errors = [line for line in result.stderr.splitlines() if line.startswith("mnsegment: error:")]
        assert len(errors) == 1, result.stderr
        for text in cases[name][3]:
            assert text in errors[0], (name, errors[0])
        assert parse_events(result.stdout)[-1]["exit_code"] == 2
        assert not (root / f"out_{name}").exists()
        assert not [p for p in root.iterdir() if ".partial" in p.name]

"""``mnsegment demo`` (demo.py): both arms train side by side in worker processes, the printout says plainly
who is ahead, and a stop reaches both workers."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from engine_fixtures import make_dataset

from MNSegmentLib import demo
from MNSegmentLib.errors import Cancelled


@pytest.mark.parametrize("mn, labeled, says", [
    (0.880, 0.869, "M&N is ahead of labeled-only by +0.011"),
    (0.856, 0.855, "M&N is NOT ahead at this budget: a tie (+0.001"),
    (0.787, 0.815, "M&N is NOT ahead at this budget: labeled-only is better by 0.028"),
])
def test_verdict_says_plainly_who_is_ahead(mn, labeled, says):
    assert demo.verdict(mn, labeled).startswith(says)


@pytest.fixture
def tiny_demo(monkeypatch):
    """The demo on tiny sphere volumes (the real MNI152 task takes minutes to make and train on a busy CI
    machine; its timing and result are measured in docs/BENCHMARKS.md section 8), and the side-by-side path even
    on a 1-core machine."""
    def dataset(data_dir: Path):
        datalist = make_dataset(data_dir, n_labeled=2, n_unlabeled=3)
        tests = [{"image": str(data_dir / f"images/case{i}.nii.gz"), "label": str(data_dir / f"labels/case{i}.nii.gz")}
                 for i in (2, 3, 4)]  # the unlabeled cases, whose labels the datalist does not name
        return datalist, tests, "tiny spheres"

    monkeypatch.setattr(demo, "demo_dataset", dataset)
    monkeypatch.setattr(demo, "_cores", lambda: 2)


@pytest.mark.slow
def test_demo_trains_both_arms_side_by_side_and_tells_the_result(tmp_path, capsys, tiny_demo):
    dice = demo.run_demo(tmp_path / "demo", device="cpu", steps=4)
    out = capsys.readouterr().out
    assert set(dice) == {"mn", "labeled_only"} and all(0 <= d <= 1 for d in dice.values())
    assert "4 training steps per arm" in out and "per volume, M&N − labeled-only" in out
    assert demo.verdict(dice["mn"], dice["labeled_only"]) in out
    assert f"Measured with more seeds and budgets: {demo.LONGER_BUDGET}." in out
    for name in ("mn", "labeled_only"):
        assert (tmp_path / "demo" / "runs" / name / "model.pt").exists()
        assert len(list((tmp_path / "demo" / "predictions" / name).glob("*.nii.gz"))) == 3


@pytest.mark.slow
def test_a_stop_reaches_both_worker_processes(tmp_path, tiny_demo):
    stop = threading.Event()
    stop.set()  # as if Ctrl-C came right away: the workers see it before their first step
    with pytest.raises(Cancelled):
        demo.run_demo(tmp_path / "demo", device="cpu", steps=4, stop=stop)
    for name in ("mn", "labeled_only"):  # the parent waits for both workers: neither trained to the end
        assert not (tmp_path / "demo" / "runs" / name / "model.pt").exists()

"""Several ranks (``--gpus 2 --device cpu``: two gloo processes) as real ``mnsegment`` subprocesses on a tiny task.

One 2-rank training is stopped by a SIGTERM to one of its ranks only, then resumed on 1 rank and, separately, on
2 ranks started by an external ``torchrun``; both loss curves must match an uninterrupted 1-rank run with the
same global batch. A trained model predicts scans on 2 ranks and on 1 process, byte for byte the same.
Independent subprocesses run concurrently: most of their cost is Python start-up. The GPU (NCCL) path cannot
run here; the collective out-of-memory decision is driven by a stand-in for a small GPU.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from engine_fixtures import TINY_SET, cli_command, cli_env, make_dataset, parse_events, run_cli, set_args

from MNSegmentLib.training import distributed

STEPS = 10
SETTINGS = {**TINY_SET, "train.steps": STEPS, "train.warmup_fraction": 0.5, "train.checkpoint_every": 1000}


def _train_args(datalist: Path, output: Path, *extra: str) -> list[str]:
    return ["train", str(datalist), "--output", str(output), "--preset", "quick", "--device", "cpu", "--events",
            *set_args(SETTINGS), *extra]


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 ARGS`` (the launcher of several machines, on this one)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(command, capture_output=True, text=True, encoding="utf-8", env=cli_env(), timeout=600)


def _history(run_dir: Path) -> list[dict]:
    return torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)["history"]


def _alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def _cancel_on_one_rank(args: list[str]) -> tuple[subprocess.CompletedProcess, list[psutil.Process]]:
    """Starts a 2-rank command, sends SIGTERM to one rank (not the launcher) after the first progress event,
    and returns the finished command with every process it had started."""
    proc = subprocess.Popen(cli_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            encoding="utf-8", env=cli_env())
    lines, children = [], []
    try:
        for line in proc.stdout:
            lines.append(line)
            if '"progress"' in line:
                children = psutil.Process(proc.pid).children(recursive=True)
                ranks = [p for p in children if "spawn_main" in " ".join(p.cmdline())]
                assert len(ranks) == 2, [p.cmdline() for p in children]
                max(ranks, key=lambda p: (p.create_time(), p.pid)).send_signal(signal.SIGTERM)
                break
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, "".join(lines) + out, err), children


def _predict(model: Path, images: list[Path], output: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_cli("predict", *map(str, images), "--model", str(model), "--output", str(output), "--device", "cpu",
                   "--events", *extra)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Every subprocess of this module, in two concurrent batches (the second needs the first's run folders)."""
    root = tmp_path_factory.mktemp("distributed")
    datalist = make_dataset(root / "data", n_labeled=3, n_unlabeled=2)
    images = sorted((root / "data" / "images").glob("*.nii.gz"))[:3]  # rank 0 predicts 2 scans, rank 1 one
    with ThreadPoolExecutor(5) as pool:
        reference = pool.submit(run_cli, *_train_args(datalist, root / "one"), timeout=600)
        bad = pool.submit(run_cli, *_train_args(root / "nowhere" / "datalist.json", root / "bad", "--gpus", "2"),
                          timeout=600)
        cancelled, children = _cancel_on_one_rank(_train_args(datalist, root / "two", "--gpus", "2"))
        shutil.copytree(root / "two", root / "two_then_one")
        reference.result()
        later = {
            "one": pool.submit(run_cli, "resume", str(root / "two_then_one"), "--events", timeout=600),
            "two": pool.submit(_torchrun, "-m", "MNSegmentLib.cli", "resume", str(root / "two"), "--events"),
            "oom": pool.submit(_torchrun, str(Path(__file__).with_name("distributed_oom_standin.py")),
                               str(root / "one"), str(root / "oom")),
            "predict1": pool.submit(_predict, root / "one", images, root / "pred1"),
            "predict2": pool.submit(_predict, root / "one", images, root / "pred2", "--gpus", "2"),
        }
        later = {k: v.result() for k, v in later.items()}
    return {"root": root, "datalist": datalist, "images": images, "reference": reference.result(),
            "bad": bad.result(), "cancelled": cancelled, "children": children,
            "resumed": {k: later[k] for k in ("one", "two")}, "oom": later["oom"],
            "predict": (later["predict1"], later["predict2"])}


def test_bad_input_is_reported_once_by_rank_0(runs):
    result = runs["bad"]
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count("mnsegment: error:") == 1, result.stderr
    assert "nowhere/datalist.json" in result.stderr
    events = parse_events(result.stdout)
    assert [e["event"] for e in events] == ["error"] and events[0]["exit_code"] == 2
    assert not (runs["root"] / "bad").exists()


def test_a_stop_seen_by_one_rank_is_agreed_and_leaves_no_process(runs):
    result = runs["cancelled"]
    assert result.returncode == 3, result.stderr[-3000:]
    events = parse_events(result.stdout)
    names = [e["event"] for e in events]
    assert names.count("start") == 1 and names.count("checkpoint") == 1 and names[-1] == "cancelled", names
    assert names.count("cancelled") == 1
    assert next(e for e in events if e["event"] == "start")["ranks"] == 2
    assert 1 <= events[names.index("checkpoint")]["step"] < STEPS
    assert "[rank 1]" not in result.stderr.replace("[rank 1] SIGTERM", "")  # rank 1 logs only warnings
    deadline = time.monotonic() + 10
    while _alive(runs["children"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(runs["children"]), [p.cmdline() for p in _alive(runs["children"])]


def test_running_out_of_memory_on_one_rank_halves_the_micro_batch_on_every_rank(runs):
    out, result = runs["root"] / "oom", runs["oom"]
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank1["refused"] == 2 and rank0["refused"] == 0  # 4 patches, then 4 again; 2 fit
    assert rank0["micro_batch"] == rank1["micro_batch"] == 2
    assert rank0["checksum"] == rank1["checksum"]  # the same update on both ranks
    assert rank0["loss_3d"] == rank1["loss_3d"] and np.isfinite(rank0["loss_3d"])


@pytest.mark.parametrize("resumed_on", ["one", "two"])
def test_a_2_rank_checkpoint_resumes_on_1_and_2_ranks_with_the_1_rank_loss_curve(runs, resumed_on):
    """The global batch is the same patches on any number of ranks, and the gradient of the global batch is the
    same sum: the curves agree up to floating-point reassociation (not bit for bit)."""
    result = runs["resumed"][resumed_on]
    assert result.returncode == 0, result.stderr[-3000:]
    assert [e["event"] for e in parse_events(result.stdout)].count("done") == 1
    assert runs["reference"].returncode == 0, runs["reference"].stderr[-3000:]
    run_dir = runs["root"] / ("two" if resumed_on == "two" else "two_then_one")
    reference, distributed_history = _history(runs["root"] / "one"), _history(run_dir)
    assert [r["step"] for r in distributed_history] == list(range(STEPS))
    for key in ("loss_2d", "loss_3d", "unlabeled_share"):
        expected = [r[key] for r in reference]
        got = [r[key] for r in distributed_history]
        assert [v is None for v in got] == [v is None for v in expected], key
        np.testing.assert_allclose([v for v in got if v is not None], [v for v in expected if v is not None],
                                   rtol=1e-3, atol=1e-5, err_msg=key)
    assert any(r["unlabeled_share"] > 0 for r in reference)  # co-training with pseudo-masks was covered


def test_2_rank_predict_equals_1_process_predict_byte_for_byte(runs):
    one, two = runs["predict"]
    images = runs["images"]
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    events = parse_events(two.stdout)
    assert [e["index"] for e in events if e["event"] == "prediction"] == list(range(len(images)))
    assert events[-1]["event"] == "done" and len(events[-1]["outputs"]) == len(images)
    for image in images:
        name = image.name
        assert (runs["root"] / "pred2" / name).read_bytes() == (runs["root"] / "pred1" / name).read_bytes(), name


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_gpus_on_a_cpu_only_machine_is_a_clear_error_unless_cpu_ranks_are_asked_for():
    with pytest.raises(distributed.InputError, match="--device cpu"):
        distributed.gpu_count("2", "auto")
    with pytest.raises(distributed.InputError, match="no CUDA GPU"):
        distributed.gpu_count("all", "cpu")
    assert distributed.gpu_count("2", "cpu") == 2
    assert distributed.gpu_count("1", "auto") == 1


def test_the_global_batch_is_split_into_contiguous_shares_covering_every_patch():
    shares = [distributed.Ranks(rank, 3).shard(7) for rank in range(3)]
    assert [list(s) for s in shares] == [[0, 1, 2], [3, 4], [5, 6]]
    with pytest.raises(distributed.InputError, match="sampling.batch_size=2"):
        distributed.Ranks(0, 3).check_batch(2)

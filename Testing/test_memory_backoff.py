"""Micro-batching and the CUDA out-of-memory back-off of the trainer, checked on the CPU.

Gradient accumulation over micro-batches must give the full-batch update exactly (the loss is a mean of
per-sample terms). The out-of-memory path is driven by a stand-in for a small GPU: a wrapper around the real
3D network that raises ``torch.cuda.OutOfMemoryError`` for batches larger than two patches, as a GPU would.
"""

from __future__ import annotations

import copy
import sys
import threading

import numpy as np
import pytest
import torch

from MNSegmentLib.data.datalist import load_datalist
from MNSegmentLib.data.preprocess import Plan
from MNSegmentLib.data.synthetic import make_blob_dataset
from MNSegmentLib.events import Events
from MNSegmentLib.training.trainer import Trainer, step_rng
from MNSegmentLib.workflow import train

TINY = {"train.steps": 2, "sampling.patch_size": [32, 32, 16], "sampling.batch_size": 4,
        "model2d.weights": "none", "train.checkpoint_every": 1}


@pytest.fixture(scope="module")
def trainer(tmp_path_factory) -> Trainer:
    root = tmp_path_factory.mktemp("memory")
    datalist = make_blob_dataset(root / "data", n_labeled=2, n_unlabeled=2, shape=(32, 32, 20))
    run = train(datalist, root / "run", "quick", "cpu", TINY)
    import json

    config = json.loads((run / "config.json").read_text())
    plan = Plan.from_json(json.loads((run / "plan.json").read_text()))
    return Trainer(run, config, plan, load_datalist(run / "datalist.json"), torch.device("cpu"), Events(False),
                   threading.Event())


def _batch(trainer: Trainer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Labeled patches and labels, augmented unlabeled patches, and the teacher's (un-augmented) view of them."""
    rng = step_rng(0, 123, 0)
    x_l, y_l = trainer.labeled.sample(2, rng)
    x_clean, _ = trainer.unlabeled.crop(2, rng)
    return x_l, y_l, trainer.unlabeled.augment_batch(x_clean, rng), x_clean


def _update(trainer: Trainer, micro_batch: int, model3d: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Gradients of the 3D student's one step from the same starting state (compared instead of the updated
    parameters: Adam's first step divides by |gradient|, which magnifies rounding in near-zero gradients)."""
    saved = copy.deepcopy(trainer.model3d.state_dict()), copy.deepcopy(trainer.opt3d.state_dict())
    original = trainer.model3d
    if model3d is not None:
        trainer.model3d = model3d
    trainer.micro_batch = micro_batch
    torch.manual_seed(0)
    trainer._train_student("3d", "2d", *_batch(trainer))
    trainer.model3d = original
    after = {k: v.grad.detach().clone() for k, v in original.named_parameters() if v.grad is not None}
    original.load_state_dict(saved[0])
    trainer.opt3d.load_state_dict(saved[1])
    return after


def _max_difference(a: dict, b: dict) -> float:
    """Largest gradient difference relative to the largest gradient."""
    assert a.keys() == b.keys() and a
    scale = max(float(v.abs().max()) for v in b.values())
    return max(float((a[k] - b[k]).abs().max()) for k in a) / scale


def test_micro_batches_give_the_full_batch_update(trainer: Trainer) -> None:
    full = _update(trainer, 4)
    assert max(float(g.abs().max()) for g in full.values()) > 0
    for micro in (1, 3):
        assert _max_difference(_update(trainer, micro), full) < 1e-5


class SmallGpuStandIn(torch.nn.Module):
    """Stand-in for a GPU with little memory (none here): the real network, but more than two patches at once
    raise the error CUDA raises."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network
        self.largest_batch = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (stand-in)")
        self.largest_batch = max(self.largest_batch, len(x))
        return self.network(x)


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_update(trainer: Trainer, monkeypatch) -> None:
    expected = _update(trainer, 2)
    small_gpu = SmallGpuStandIn(trainer.model3d)
    in_except = []  # the cache is emptied once the failed step's traceback (and its tensors) is released
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: in_except.append(sys.exc_info()[0] is not None))
    got = _update(trainer, 4, small_gpu)
    assert in_except == [False]
    assert trainer.micro_batch == 2
    assert small_gpu.largest_batch == 2
    assert _max_difference(got, expected) < 1e-5


def test_out_of_memory_with_one_patch_is_a_clear_error(trainer: Trainer) -> None:
    from MNSegmentLib.errors import InputError

    class NoMemory(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (stand-in)")

    with pytest.raises(InputError, match="patch_size"):
        _update(trainer, 1, NoMemory())
    assert np.isfinite(sum(float(v.float().sum()) for v in trainer.model3d.state_dict().values()))


def test_each_network_has_its_own_loss_scale(trainer: Trainer, monkeypatch) -> None:
    """float16 loss scaling (enabled here on the CPU; on a GPU it is used where bfloat16 is not native): an
    overflow in the 2D network's gradients halves the 2D scale only."""
    from MNSegmentLib.device import AmpPolicy
    from MNSegmentLib.training import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "amp_for", lambda device, enabled: AmpPolicy(None, True))
    run = trainer.run_dir
    scaled = Trainer(run, trainer.config, trainer.plan, load_datalist(run / "datalist.json"), torch.device("cpu"),
                     Events(False), threading.Event())
    initial = {net: scaler.get_scale() for net, scaler in scaled.scalers.items()}
    assert all(scaler.is_enabled() for scaler in scaled.scalers.values())
    forward = scaled._forward

    def overflowing_2d(network, x):
        out = forward(network, x)
        return out * float("inf") if network == "2d" and torch.is_grad_enabled() else out

    scaled._forward = overflowing_2d
    batch = _batch(scaled)
    before = {k: v.detach().clone() for k, v in scaled.model2d.named_parameters()}
    scaled._train_student("2d", "3d", *batch)
    scaled._train_student("3d", "2d", *batch)
    assert scaled.scalers["2d"].get_scale() == initial["2d"] / 2  # the step was skipped and the scale halved
    assert scaled.scalers["3d"].get_scale() == initial["3d"]
    assert all(torch.equal(before[k], v) for k, v in scaled.model2d.named_parameters())  # no optimiser step


def test_a_reduced_micro_batch_is_kept_across_resume(trainer: Trainer, tmp_path) -> None:
    """The accumulation order (hence the exact weights) depends on the micro-batch: a run that backed off after
    an out-of-memory error resumes with the reduced one."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trainer.run_dir, run)
    copy_ = Trainer(run, trainer.config, trainer.plan, load_datalist(run / "datalist.json"), torch.device("cpu"),
                    Events(False), threading.Event())
    assert copy_.micro_batch == 4
    copy_.micro_batch = 1  # as after two back-offs
    copy_.save_checkpoint()
    resumed = Trainer(run, trainer.config, trainer.plan, load_datalist(run / "datalist.json"), torch.device("cpu"),
                      Events(False), threading.Event())
    assert resumed.micro_batch == 1

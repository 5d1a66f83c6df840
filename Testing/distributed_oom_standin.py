"""Run by Testing/test_distributed.py under ``torchrun --nproc-per-node 2`` (CPU, gloo): one real training step of
a finished tiny run's Trainer in which rank 1 alone runs out of memory.

A GPU cannot be had here, so rank 1's 3D network is wrapped in a stand-in for a small GPU: it raises
``torch.cuda.OutOfMemoryError`` for batches larger than two patches, as a GPU would. Each rank writes what it
ended with to ``OUT/rank<r>.json``.

Usage: python -m torch.distributed.run --standalone --nproc-per-node 2 distributed_oom_standin.py RUN_DIR OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from MNSegmentLib import config as configuration
from MNSegmentLib.data.datalist import load_datalist
from MNSegmentLib.data.preprocess import Plan
from MNSegmentLib.events import Events
from MNSegmentLib.training import distributed
from MNSegmentLib.training.trainer import Trainer


class SmallGpu(torch.nn.Module):
    """Stand-in for a GPU that holds at most two patches of the network's activations."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.refused = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and len(x) > 2:
            self.refused += 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (stand-in)")
        return self.model(x)


def main(run_dir: Path, out: Path) -> None:
    ranks = distributed.setup()
    config = configuration.load_run_config(run_dir / "config.json")
    config["sampling"]["batch_size"] = 8  # 4 patches per rank
    plan = Plan.from_json(configuration.load(run_dir / "plan.json"))
    trainer = Trainer(run_dir, config, plan, load_datalist(run_dir / "datalist.json", check_files=False),
                      torch.device("cpu"), Events(False))
    trainer.step = 0  # stage 1: both networks train
    trainer.micro_batch = 8  # not the checkpoint's: all of a rank's patches in one micro-batch to start with
    if ranks.rank == 1:
        trainer.model3d = SmallGpu(trainer.model3d)
    record = trainer.train_step()
    model3d = trainer.model3d.model if ranks.rank == 1 else trainer.model3d
    checksum = sum(float(p.double().sum()) for p in model3d.parameters())
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{ranks.rank}.json").write_text(json.dumps({
        "micro_batch": trainer.micro_batch, "loss_3d": record["loss_3d"], "checksum": checksum,
        "refused": getattr(trainer.model3d, "refused", 0)}))
    distributed.teardown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))

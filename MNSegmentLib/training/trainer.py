"""The M&N co-training loop.

Stage 1 trains both networks on labeled patches. Stage 2 alternates students every ``alternate_every`` steps:
the other network, frozen and in eval mode, predicts the unlabeled patches (by default the same augmented ones;
``teacher.input=clean``: before augmentation) and its softmax (``teacher.temperature``) is the student's target;
labeled and unlabeled patches share one batch and one loss. How many patches of the
batch are unlabeled follows the learning rate (:mod:`lrg`). ``teacher.directions`` decides which student learns
from unlabeled patches (:class:`teachers.LabeledFit`); a student that does not uses the labeled ones alone.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from MNSegmentLib.data.datalist import Datalist
from MNSegmentLib.data.io import write_failed
from MNSegmentLib.data.preprocess import Plan, load_cached
from MNSegmentLib.data.sampling import PatchSampler
from MNSegmentLib.device import amp_for, configure_kernels
from MNSegmentLib.errors import Cancelled, InputError
from MNSegmentLib.events import Events
from MNSegmentLib.inference.predict import predict_array, predictor
from MNSegmentLib.models.network2d import build_model2d
from MNSegmentLib.models.network3d import build_model3d
from MNSegmentLib.models.slicing import apply_2d, network_axes
from MNSegmentLib.training import checkpoint, distributed
from MNSegmentLib.training.losses import confidence_weight, dice_kl_loss, one_hot
from MNSegmentLib.training.lrg import split_batch, unlabeled_share
from MNSegmentLib.training.preview import Preview
from MNSegmentLib.training.scalars import Scalars
from MNSegmentLib.training.schedule import lr_factor, stage_bounds
from MNSegmentLib.training.teachers import EmaCopy, LabeledFit, soft_dice_sums

log = logging.getLogger("mnsegment")

CHECKPOINT = "checkpoint.pt"
MODEL = "model.pt"


def step_rng(seed: int, step: int, stream: int) -> np.random.Generator:
    """Randomness of one step derived from (seed, step): a resumed run draws exactly what the original would."""
    return np.random.default_rng([seed, step, stream])


@dataclass
class Batch:
    """One step's patches on the CPU, with what they were drawn for."""

    step: int
    masks_version: int
    torch_seed: int
    x_l: torch.Tensor  # labeled patches (n, 1, X, Y, Z)
    y_l: torch.Tensor | None  # their labels
    x_u: torch.Tensor  # unlabeled patches, augmented
    x_clean: torch.Tensor | None  # the teacher's view of x_u when it differs (teacher.input, teacher.student_view)
    n_labeled: int  # labeled and unlabeled patches of the step's global batch (all ranks together)
    n_unlabeled: int

    @property
    def patches(self) -> int:
        return self.n_labeled + self.n_unlabeled


class Prefetcher:
    """Draws the next step's batch on a background thread while the current step computes (cropping, resizing
    and augmenting on the main thread left the GPU idle between steps). A batch is used only for the
    (step, pseudo-mask version) it was drawn for, else drawn again, so results equal drawing in place."""

    def __init__(self, draw: Callable[[int, int], Batch], enabled: bool = True):
        self._draw = draw
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="mnsegment-batch") if enabled else None
        self._pending: tuple[tuple[int, int], Future] | None = None

    def ahead(self, step: int, masks_version: int) -> None:
        if self._pool is not None:
            self.drop()
            self._pending = (step, masks_version), self._pool.submit(self._draw, step, masks_version)

    def take(self, step: int, masks_version: int) -> Batch:
        pending, self._pending = self._pending, None
        if pending is not None:
            batch = pending[1].result()  # re-raises an error of the background thread here
            if pending[0] == (step, masks_version):
                return batch
        return self._draw(step, masks_version)

    def drop(self) -> None:
        """Waits for a batch being drawn and forgets it."""
        pending, self._pending = self._pending, None
        if pending is not None:
            wait([pending[1]])

    def close(self) -> None:
        self.drop()
        if self._pool is not None:
            self._pool.shutdown()


def draw_patches(sampler: PatchSampler, indices: np.ndarray, seed: int, step: int,
                 stream: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Patches number ``indices`` of step ``step``'s batch (crops, labels if any, augmented crops), each drawn
    from its own stream (seed, step, stream, index): a patch is the same whichever rank draws it, so a batch
    split over any number of ranks is the one batch a single process draws."""
    if not len(indices):
        crops, labels = sampler.crop(0, None)
        return crops, labels, crops
    crops, labels, augmented = [], [], []
    for index in indices:
        rng = np.random.default_rng([seed, step, stream, int(index)])
        crop, label = sampler.crop(1, rng)
        crops.append(crop)
        augmented.append(sampler.augment_batch(crop, rng))
        if label is not None:
            labels.append(label)
    return torch.cat(crops), torch.cat(labels) if labels else None, torch.cat(augmented)


def strong_views(sampler: PatchSampler, patches: torch.Tensor, indices: np.ndarray, seed: int,
                 step: int) -> torch.Tensor:
    """The student's extra-perturbed view of unlabeled patches number ``indices`` (teacher.student_view=strong),
    each from its own stream, as :func:`draw_patches` draws them: the same whichever rank draws the patch."""
    return torch.cat([sampler.augment_batch(patches[i:i + 1], np.random.default_rng([seed, step, 3, int(index)]),
                                            strong=True) for i, index in enumerate(indices)])


def refresh_steps(config: dict) -> list[int]:
    """The start of stage 2 and the ``train.refresh_at`` shares of all steps that fall in stage 2."""
    total, stage2, _ = stage_bounds(config)
    points = {stage2} | {round(f * total) for f in config["train"]["refresh_at"]}
    return sorted(p for p in points if stage2 <= p < total)


def dice_scores(prediction: np.ndarray, label: np.ndarray, num_classes: int) -> list[float]:
    """Foreground Dice per class on index arrays (a quick in-training check, not the reported metric)."""
    scores = []
    for k in range(1, num_classes):
        p, t = prediction == k, label == k
        denominator = p.sum() + t.sum()
        scores.append(float(2 * (p & t).sum() / denominator) if denominator else 1.0)
    return scores


class Trainer:
    def __init__(self, run_dir: Path, config: dict, plan: Plan, datalist: Datalist, device: torch.device,
                 events: Events, stop: threading.Event | None = None,
                 pretrained2d: tuple[dict[str, torch.Tensor], str] | None = None,
                 initial: dict[str, dict[str, torch.Tensor]] | None = None):
        """``pretrained2d``: the 2D encoder's starting tensors and their description, already loaded (by
        :func:`workflow.check_networks`); without it the weights are read here. ``initial``: both networks'
        complete starting tensors (``--init-from``), replacing the pretrained ones. Both unused when resuming."""
        self.run_dir, self.config, self.plan, self.device = run_dir, config, plan, device
        self.events = events
        self.stop = stop or threading.Event()
        self.ranks = distributed.current()  # one rank unless started by --gpus N or torchrun
        self.num_classes = len(plan.label_values)
        self.seed = int(config["seed"])
        self.total, self.stage2, self.warmup = stage_bounds(config)
        self.amp = amp_for(device, config["train"]["amp"])
        configure_kernels(device, config["train"]["deterministic"])
        torch.manual_seed(self.seed)

        cache = run_dir / "cache"
        labeled = [load_cached(cache, c) for c in datalist.labeled]
        self.unlabeled_images = [load_cached(cache, c)[0] for c in datalist.unlabeled]
        self.validation = [load_cached(cache, c) for c in datalist.validation]
        s = config["sampling"]
        self.labeled = PatchSampler([i for i, _ in labeled], [lab for _, lab in labeled], s["patch_size"],
                                    s["foreground_fraction"], s["scale_jitter"], s["intensity_aug"])
        self.unlabeled = PatchSampler(self.unlabeled_images, [None] * len(self.unlabeled_images),
                                      s["patch_size"], s["foreground_fraction"], s["scale_jitter"],
                                      s["intensity_aug"])

        fresh = not (run_dir / CHECKPOINT).exists()
        self.model2d, self.weights_2d = build_model2d(config["model2d"], self.num_classes,
                                                      fresh and pretrained2d is None and initial is None)
        if fresh and initial is not None:
            self.model2d.load_state_dict(initial["model2d"])
            self.weights_2d = f"from {config['init_from']['run']}"
        elif fresh and pretrained2d is not None:
            encoder, self.weights_2d = pretrained2d
            unexpected = self.model2d.load_state_dict(encoder, strict=False).unexpected_keys
            assert not unexpected, f"pretrained2d holds tensors this 2D network lacks: {unexpected[:3]}"
        self.model3d = build_model3d(config["model3d"], self.num_classes)
        if fresh and initial is not None:
            self.model3d.load_state_dict(initial["model3d"])
        self.model2d.to(device)
        self.model3d.to(device)
        t = config["train"]
        self.opt2d = torch.optim.AdamW([p for p in self.model2d.parameters() if p.requires_grad], lr=t["lr_2d"],
                                       weight_decay=t["weight_decay"])
        self.opt3d = torch.optim.AdamW([p for p in self.model3d.parameters() if p.requires_grad], lr=t["lr_3d"],
                                       weight_decay=t["weight_decay"])
        # One loss scale per network: an overflow in one network's float16 gradients must not shrink the other's.
        self.scalers = {net: torch.amp.GradScaler(device.type, enabled=self.amp.use_scaler) for net in ("2d", "3d")}
        self.micro_batch = int(config["train"]["micro_batch"] or config["sampling"]["batch_size"])
        teacher = config["teacher"]
        self.axes_2d = network_axes(config, plan.target_spacing)
        self.cross_view = teacher["cross_view"] and len(self.axes_2d) > 1  # one axis has no other view to learn from
        self.ema = ({"2d": EmaCopy(self.model2d, teacher["ema"]), "3d": EmaCopy(self.model3d, teacher["ema"])}
                    if teacher["ema"] else {})
        self.fit = LabeledFit()  # each network's running Dice on its labeled patches (teacher.directions=auto)
        self.step = 0
        self.history: list[dict] = []
        self.masks_version = -1  # which refresh point the pseudo-masks on disk belong to
        self._progress: dict | None = None  # the last progress event's fields
        self._last_event = self._last_log = 0.0
        # (seconds waiting for the batch, seconds of the whole step) of each step run() made in this process
        self.timings: list[tuple[float, float]] = []
        if not fresh:
            checkpoint.remove_partial(run_dir / CHECKPOINT)
            self._load_checkpoint()
        self.ranks.same_parameters(self.model2d, self.model3d)
        self.scalars = Scalars(run_dir, written=len(self.history), enabled=self.ranks.is_main)
        self.preview: Preview | None = None  # opened by run(): reading the image is not part of set-up

    # -- set-up ---------------------------------------------------------------------------------------------
    def _load_checkpoint(self) -> None:
        state = checkpoint.load(self.run_dir / CHECKPOINT, self.device)
        self.model2d.load_state_dict(state["model2d"])
        self.model3d.load_state_dict(state["model3d"])
        self.opt2d.load_state_dict(state["opt2d"])
        self.opt3d.load_state_dict(state["opt3d"])
        for net, scaler in self.scalers.items():  # checkpoints before per-network scalers had one "scaler"
            saved = state.get(f"scaler{net}", state.get("scaler"))
            if saved and scaler.is_enabled():  # empty when saved without loss scaling (CPU, bfloat16)
                scaler.load_state_dict(saved)
        self.step, self.history = state["step"], state["history"]
        self.fit = LabeledFit(state.get("labeled_dice"))  # absent from checkpoints made before it existed
        self.masks_version = state["masks_version"]
        for net, ema in self.ema.items():  # a run that turns teacher.ema on when resuming starts the copies now
            ema.load_state_dict(state.get(f"ema{net}") or (self.model2d if net == "2d" else self.model3d).state_dict())
        self.weights_2d = state.get("weights_2d", self.weights_2d)
        # an out-of-memory back-off is kept: the accumulation order, hence the exact result, depends on it
        self.micro_batch = state.get("micro_batch", self.micro_batch)
        if self.masks_version >= 0:
            paths = [self._mask_path(self.masks_version, i) for i in range(len(self.unlabeled_images))]
            if all(p.exists() for p in paths):
                self.unlabeled.set_masks([np.load(p) for p in paths])
            else:  # a run folder from before versioned masks: recompute them from the checkpoint's model
                self.masks_version = -1
        log.info("resuming at step %d of %d", self.step, self.total)

    def save_checkpoint(self) -> Path:
        if not self.ranks.is_main:  # rank 0 writes; the others wait until the file is complete
            self.ranks.barrier()
            return self.run_dir / CHECKPOINT
        path = checkpoint.save_atomic({
            "step": self.step, "model2d": self.model2d.state_dict(), "model3d": self.model3d.state_dict(),
            "opt2d": self.opt2d.state_dict(), "opt3d": self.opt3d.state_dict(),
            "scaler2d": self.scalers["2d"].state_dict(), "scaler3d": self.scalers["3d"].state_dict(),
            "history": self.history, "masks_version": self.masks_version, "micro_batch": self.micro_batch,
            "weights_2d": self.weights_2d, "labeled_dice": self.fit.dice,
            **{f"ema{net}": ema.state_dict() for net, ema in self.ema.items()},
        }, self.run_dir / CHECKPOINT)
        for old in (self.run_dir / "pseudo").glob("v*"):  # only the version the checkpoint names is needed now
            if old.name != f"v{self.masks_version}":
                shutil.rmtree(old, ignore_errors=True)
        self.events.emit("checkpoint", path=str(path), step=self.step)
        self.ranks.barrier()
        return path

    def write_preview(self, final: bool = False) -> None:
        """The chosen volume's prediction by the networks as they are now (``--preview``), at each checkpoint
        whose preview fits the budget (:meth:`Preview.due`) and at the end."""
        if self.preview is not None and self.preview.due(final):
            self.preview.write(self.model2d, self.model3d, self.config, self.plan, self.device, self.amp.dtype,
                               self.step, self.events)

    # -- pseudo-masks ---------------------------------------------------------------------------------------
    def _mask_path(self, version: int, index: int) -> Path:
        """Each refresh writes a new version: the one the last checkpoint names stays intact until a newer
        checkpoint replaces it, so a run killed after a refresh resumes with the masks it had then."""
        return self.run_dir / "pseudo" / f"v{version}" / f"{index:04d}.npy"

    def refresh_points(self) -> list[int]:
        """Steps at which the 3D model re-predicts the unlabeled volumes (start of stage 2, then refresh_at)."""
        if self.config["lrg"]["mode"] == "off" or not self.unlabeled_images:
            return []  # no unlabeled patch is ever drawn
        return refresh_steps(self.config)

    def _predict_volume(self, array: np.ndarray) -> np.ndarray:
        """Hard 3D-network prediction of a preprocessed volume (pseudo-masks and validation)."""
        model = self.model3d
        model.eval()
        predict = predictor("3d", self.model2d, self.model3d, self.axes_2d, self.config["model2d"]["chunk_slices"])
        inference = self.config["inference"]
        probabilities = predict_array(array, predict, self.config["sampling"]["patch_size"], self.device,
                                      inference["overlap"], inference["sw_batch_size"],
                                      autocast_dtype=self.amp.dtype)
        model.train()
        return probabilities.argmax(0).numpy().astype(np.uint8)

    def refresh_masks(self, version: int) -> None:
        """Hard 3D predictions of every unlabeled volume; used only to aim unlabeled crops at foreground."""
        if not self.unlabeled_images or not self.ranks.is_main:  # the others load them: _share_masks
            return
        started = time.monotonic()
        masks = []
        for i, array in enumerate(self.unlabeled_images):
            if self.stop.is_set():
                return  # the caller saves a checkpoint; masks are recomputed on resume
            masks.append(self._predict_volume(array))
            self._report(activity=f"pseudo-masks {i + 1}/{len(self.unlabeled_images)}")
            path = self._mask_path(version, i)
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                np.save(path, masks[-1])
            except OSError as err:  # this version is not named by any checkpoint yet: no harm done
                raise write_failed(path, err) from None
        self.unlabeled.set_masks(masks)
        self.masks_version = version
        log.info("pseudo-masks of %d unlabeled volumes refreshed in %.1f s", len(masks),
                 time.monotonic() - started)

    def _share_masks(self) -> None:
        """After rank 0 refreshed the pseudo-masks (or was stopped midway), the other ranks load what it wrote."""
        version = self.ranks.broadcast(self.masks_version)
        if version != self.masks_version:
            self.unlabeled.set_masks([np.load(self._mask_path(version, i)) for i in range(len(self.unlabeled_images))])
            self.masks_version = version

    def validate(self) -> float | None:
        if not self.validation or not self.ranks.is_main:
            return None
        scores = []
        for image, label in self.validation:
            scores += dice_scores(self._predict_volume(image), label, self.num_classes)
        return float(np.mean(scores))

    # -- one step -------------------------------------------------------------------------------------------
    def _students(self, step: int) -> tuple[bool, bool]:
        """(train 2D, train 3D) at ``step``: both in stage 1, alternating in stage 2 (2D first)."""
        if step < self.stage2:
            return True, True
        two_d_turn = ((step - self.stage2) // self.config["train"]["alternate_every"]) % 2 == 0
        return two_d_turn, not two_d_turn

    def _forward(self, network: str, x: torch.Tensor) -> torch.Tensor:
        """The student's logits; with ``teacher.triplanar`` the 2D network slices along its axes in turn."""
        if network == "3d":
            return self.model3d(x)
        return apply_2d(self.model2d, x, self._student_axis(), self.config["model2d"]["chunk_slices"], recompute=True)

    def _student_axis(self) -> int:
        """The slice axis the 2D network trains along at this step (its axes in turn)."""
        return self.axes_2d[self.step % len(self.axes_2d)]

    def _train_student(self, network: str, teacher: str | None, x_l: torch.Tensor, y_l: torch.Tensor | None,
                       x_u: torch.Tensor, x_teacher: torch.Tensor, patches: int | None = None) -> torch.Tensor:
        """One optimiser step of ``network``, learning from ``teacher``'s targets on ``x_u`` (see
        :meth:`teachers.LabeledFit.teacher`; None: ``x_u`` is empty), returning (loss, soft-Dice overlap, soft-Dice
        size) on the labeled patches (:func:`teachers.soft_dice_sums`), on the device; on CUDA out-of-memory,
        retries with half the micro-batch. ``patches``: the step's global batch size (all ranks), default this batch's.
        With several ranks, running out of memory is a collective decision: every rank retries, or none."""
        while True:
            try:
                return self._accumulate(network, teacher, x_l, y_l, x_u, x_teacher, patches)
            except torch.cuda.OutOfMemoryError as error:
                voted = isinstance(error, distributed.PeerOutOfMemory)  # learnt in _accumulate's all-reduce
            # Out of the except block: its traceback, which holds the failed step's tensors, is gone, so their
            # memory can really be released.
            torch.cuda.empty_cache()
            if not voted:  # the other ranks wait in _accumulate's all-reduce for this rank's vote
                optimizer = self.opt2d if network == "2d" else self.opt3d
                self.ranks.sum_gradients(optimizer.param_groups[0]["params"], torch.zeros(3, device=self.device),
                                         True)
            if self.micro_batch == 1:
                raise InputError("out of GPU memory even with one patch at a time; reduce "
                                 "sampling.patch_size or model2d.chunk_slices, or use --device cpu")
            self.micro_batch = max(1, self.micro_batch // 2)
            log.warning("out of GPU memory: continuing with micro-batches of %d patches", self.micro_batch)
            self.events.emit("warning", message=f"out of GPU memory; micro-batch reduced to {self.micro_batch}")

    @torch.no_grad()
    def _teacher_targets(self, teacher: str, x: torch.Tensor) -> torch.Tensor:
        """The frozen network's (or its EMA copy's) class probabilities on ``x``, sharpened by
        ``teacher.temperature``; the 2D teacher's are averaged over its slice axes (``teacher.triplanar``), the
        ``views`` teacher's over the 2D network's axes other than the one it trains along at this step."""
        network = "2d" if teacher == "views" else teacher
        live = self.model3d if network == "3d" else self.model2d
        model = self.ema[network].model if self.ema else live
        temperature = self.config["teacher"]["temperature"] or 1.0  # 0: hard labels of the T = 1 probabilities
        live.eval()  # EMA copies are always in eval mode
        if network == "3d":
            probabilities = torch.softmax(model(x).float() / temperature, 1)
        else:
            chunk = self.config["model2d"]["chunk_slices"]
            axes = self.axes_2d if teacher == "2d" else [a for a in self.axes_2d if a != self._student_axis()]
            probabilities = sum(torch.softmax(apply_2d(model, x, axis, chunk).float() / temperature, 1)
                                for axis in axes) / len(axes)
        live.train()
        if self.config["teacher"]["temperature"] == 0:
            return one_hot(probabilities.argmax(1), self.num_classes)
        return probabilities

    def _accumulate(self, network: str, teacher: str | None, x_l: torch.Tensor, y_l: torch.Tensor | None,
                    x_u: torch.Tensor, x_teacher: torch.Tensor, patches: int | None = None) -> torch.Tensor:
        """Loss and gradients over the batch in micro-batches. The loss is a mean of per-sample terms, so
        weighting each micro-batch by its share of the batch gives the full-batch gradient: exact as long as no
        network normalises with batch statistics (the 2D network never does, see models2d.SliceSegmenter; the
        3D network's default InstanceNorm does not; a 3D network configured with BatchNorm would make it
        approximate). ``x_teacher`` is
        what the teacher sees of each unlabeled patch in ``x_u`` (the same tensor, or its un-augmented crop).
        Returns (loss, soft-Dice overlap, size) of the student on the labeled patches, summed over the ranks."""
        optimizer = self.opt2d if network == "2d" else self.opt3d
        scaler = self.scalers[network]
        x = torch.cat([x_l, x_u]) if len(x_u) else x_l
        n_labeled = len(x_l)
        weighted = self.config["teacher"]["weighting"] == "confidence"
        optimizer.zero_grad(set_to_none=True)
        # loss, then the student's soft-Dice sums on the labeled patches; on the device: no host sync per micro-batch
        total = torch.zeros(3, device=self.device)
        for start in range(0, len(x), self.micro_batch):
            part = slice(start, min(start + self.micro_batch, len(x)))
            with torch.autocast(self.device.type, dtype=self.amp.dtype, enabled=self.amp.dtype is not None):
                targets, weights = [], []  # weights: per voxel, only with teacher.weighting=confidence
                if start < n_labeled:
                    targets.append(one_hot(y_l[part], self.num_classes))
                    weights.append(torch.ones_like(targets[-1][:, :1]))
                if part.stop > n_labeled:
                    unlabeled = x_teacher[max(start - n_labeled, 0):part.stop - n_labeled]
                    targets.append(self._teacher_targets(teacher, unlabeled))
                    weights.append(confidence_weight(targets[-1]) if weighted else None)
                weight = torch.cat(weights) if weighted else None
                logits = self._forward(network, x[part])
                loss = dice_kl_loss(logits, torch.cat(targets), weight)
                loss = loss * (part.stop - start) / (patches or len(x))
            scaler.scale(loss).backward()
            total[0] += loss.detach().float()
            if start < n_labeled:
                total[1:] += soft_dice_sums(logits[:n_labeled - start], targets[0])
        # Several ranks: the sum of their gradients is the global batch's (each weighted its patches by the
        # global count), and the all-reduce tells every rank whether one of them ran out of memory.
        total, failed = self.ranks.sum_gradients(optimizer.param_groups[0]["params"], total, False)
        if failed:
            raise distributed.PeerOutOfMemory()
        scaler.step(optimizer)
        scaler.update()
        if self.ema:
            self.ema[network].update(self.model2d if network == "2d" else self.model3d)
        return total

    def draw_batch(self, step: int, masks_version: int) -> Batch:
        """Everything random about step ``step``'s batch, from (seed, step) alone; the unlabeled crops also
        depend on the pseudo-masks (``masks_version`` names them). Runs on the prefetch thread: CPU only."""
        lrg = self.config["lrg"]
        factor = lr_factor(step, self.total, self.stage2, self.warmup)
        rng = step_rng(self.seed, step, 0)
        torch_seed = int(rng.integers(2**62)) + self.ranks.rank  # dropout etc.: a function of (seed, step, rank)
        share = unlabeled_share(lrg["mode"], step, self.stage2, self.total, factor, 1.0, lrg["share"], lrg["cap"])
        if not len(self.unlabeled):
            share = 0.0
        batch = self.config["sampling"]["batch_size"]
        n_unlabeled = split_batch(share, batch, rng)
        # "add": unlabeled patches come on top of a full labeled batch, so the supervised signal never shrinks
        # (docs/BENCHMARKS.md); "replace" (the reference code): they take labeled places.
        n_labeled = batch if lrg["unlabeled"] == "add" else batch - n_unlabeled
        mine = self.ranks.shard(n_labeled + n_unlabeled)  # this rank's share of the global batch
        unlabeled = mine[mine >= n_labeled] - n_labeled
        _, y_l, x_l = draw_patches(self.labeled, mine[mine < n_labeled], self.seed, step, 1)
        x_clean, _, x_u = draw_patches(self.unlabeled, unlabeled, self.seed, step, 2)
        x_clean = x_clean if self.config["teacher"]["input"] == "clean" else None
        if self.config["teacher"]["student_view"] == "strong" and len(x_u):  # the teacher keeps the usual view
            x_clean = x_u if x_clean is None else x_clean
            x_u = strong_views(self.unlabeled, x_u, unlabeled, self.seed, step)
        if self.device.type == "cuda":  # page-locked, so the copy to the GPU can overlap with computation
            x_l, y_l, x_u, x_clean = (t.pin_memory() if t is not None else None for t in (x_l, y_l, x_u, x_clean))
        return Batch(step, masks_version, torch_seed, x_l, y_l, x_u, x_clean, n_labeled, n_unlabeled)

    def train_step(self, batch: Batch | None = None) -> dict:
        """One step at ``self.step``; ``batch`` is that step's :meth:`draw_batch` (drawn here if not given)."""
        step, t = self.step, self.config["train"]
        batch = batch or self.draw_batch(step, self.masks_version)
        assert batch.step == step, f"batch of step {batch.step} given at step {step}"
        factor = lr_factor(step, self.total, self.stage2, self.warmup)
        for optimizer, peak in ((self.opt2d, t["lr_2d"]), (self.opt3d, t["lr_3d"])):
            for group in optimizer.param_groups:
                group["lr"] = peak * factor
        torch.manual_seed(batch.torch_seed)

        def to_device(x: torch.Tensor | None) -> torch.Tensor | None:
            return x.to(self.device, non_blocking=True) if x is not None else None

        x_l, y_l, x_u = to_device(batch.x_l), to_device(batch.y_l), to_device(batch.x_u)
        x_teacher = to_device(batch.x_clean) if batch.x_clean is not None else x_u  # one copy
        directions = self.config["teacher"]["directions"]
        results = {}  # network -> (loss, soft-Dice overlap, size) on the device
        taught = []  # the students that learnt from the other network's pseudo-labels in this step
        for network, trains in zip(("2d", "3d"), self._students(step)):
            teacher = self.fit.teacher(directions, network, self.cross_view) if trains else None
            if teacher is not None:
                results[network] = self._train_student(network, teacher, x_l, y_l, x_u, x_teacher, batch.patches)
                if batch.n_unlabeled:
                    taught.append(network)
            elif trains:  # labels only: the mean over them
                results[network] = self._train_student(network, None, x_l, y_l, x_u[:0], x_teacher[:0],
                                                       batch.n_labeled)
        values = dict(zip(results, torch.stack(list(results.values())).tolist()))  # the step's one host sync
        for network, (_, overlap, size) in values.items():
            self.fit.update(network, overlap, size)
        n_labeled, n_unlabeled = batch.n_labeled, batch.n_unlabeled
        return {"step": step, "stage": "warmup" if step < self.stage2 else "cotrain",
                "unlabeled_share": n_unlabeled / (n_labeled + n_unlabeled), "taught": taught,
                "lr_2d": t["lr_2d"] * factor,
                "lr_3d": t["lr_3d"] * factor, **{f"loss_{net}": values[net][0] if net in values else None
                                                  for net in ("2d", "3d")},
                **{f"train_dice_{net}": self.fit.dice[net] for net in ("2d", "3d")}}

    # -- the loop -------------------------------------------------------------------------------------------
    def _report(self, force: bool = False, activity: str | None = None) -> None:
        """A progress event and the new TensorBoard scalars at most every second (and a log line every ten),
        from steps and long pauses alike."""
        now = time.monotonic()
        if self._progress is None or not (force or now - self._last_event >= 1.0):
            return
        extra = {"activity": activity} if activity else {}
        self.events.emit("progress", **self._progress, **extra)
        self.scalars.write(self.history, self.timings)
        self._last_event = now
        if force or now - self._last_log >= 10:
            p = self._progress
            log.info("step %d/%d %s share %.2f loss2d %s loss3d %s eta %.0fs%s", p["step"], self.total, p["stage"],
                     p["unlabeled_share"], _fmt(p["loss_2d"]), _fmt(p["loss_3d"]), p["eta_s"],
                     f" ({activity})" if activity else "")
            self._last_log = now

    def run(self) -> Path:
        """Trains to the end (or raises Cancelled after saving a checkpoint); returns the run folder."""
        refresh = self.refresh_points()
        self.events.emit("start", total_steps=self.total, step=self.step, device=str(self.device),
                         weights_2d=self.weights_2d, stage2_start=self.stage2,
                         init_from=self.config.get("init_from"),
                         labeled=len(self.labeled), unlabeled=len(self.unlabeled),
                         plan=list((self.plan.experiment or {}).get("why", [])),
                         **({"ranks": self.ranks.world} if self.ranks.world > 1 else {}))
        log.info("training on %s: %d labeled, %d unlabeled volumes; 2D %s (%s); %d steps, co-training from %d",
                 self.device, len(self.labeled), len(self.unlabeled), self.config["model2d"]["name"],
                 self.weights_2d, self.total, self.stage2)
        if self.ranks.is_main:  # one file, one stream of events
            self.preview = Preview.open(self.config, self.plan, self.run_dir, self.events)
        prefetch = Prefetcher(self.draw_batch, self.config["train"]["prefetch"])
        try:
            self._loop(refresh, prefetch)
        finally:
            prefetch.close()
            self.scalars.close(self.history, self.timings)
        self.save_checkpoint()
        self.write_preview(final=True)
        if self.ranks.is_main:
            checkpoint.save_atomic({"model2d": self.model2d.state_dict(), "model3d": self.model3d.state_dict()},
                                   self.run_dir / MODEL)
        return self.run_dir

    def _loop(self, refresh: list[int], prefetch: Prefetcher) -> None:
        t = self.config["train"]
        while self.step < self.total:
            if self.ranks.any(self.stop.is_set()):  # all ranks stop at the same step
                self.save_checkpoint()
                raise Cancelled()
            due = [i for i, p in enumerate(refresh) if p <= self.step]
            if due and due[-1] > self.masks_version:
                prefetch.drop()  # it may be reading the masks about to be replaced; it is drawn again after
                self.refresh_masks(due[-1])
                self._share_masks()
                continue  # re-checks the stop flag before the step
            started = time.monotonic()
            batch = prefetch.take(self.step, self.masks_version)
            waited = time.monotonic() - started
            if self.step + 1 < self.total and self.step + 1 not in refresh:
                prefetch.ahead(self.step + 1, self.masks_version)  # while this step computes
            record = self.train_step(batch)
            self.timings.append((waited, time.monotonic() - started))  # train_step ends with a host sync
            self.step += 1
            if self.step % t["validate_every"] == 0 or self.step == self.total:
                record["val_dice"] = self.validate()
            self.history.append(record)
            eta = float(np.mean([took for _, took in self.timings[-50:]])) * (self.total - self.step)
            self._progress = {**record, "step": self.step, "total_steps": self.total, "eta_s": eta}
            # a validation Dice is always reported: the live chart must not miss the few there are
            self._report(force=self.step in (self.stage2, self.total) or "val_dice" in record)
            if self.step % t["checkpoint_every"] == 0 and self.step < self.total:
                self.save_checkpoint()
                self.write_preview()


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"

"""Who teaches in stage 2, and along which slice directions the 2D network works.

Two optional strengthenings of the reference's teacher (the raw other network, on the student's slice axis):

- ``teacher.ema`` > 0: each network has an exponential-moving-average copy that follows it after every optimiser
  step; the student learns from the EMA copy of the other network (mean-teacher style steadier targets).
- ``teacher.triplanar``: the 2D network is trained on slices along every axis whose in-plane spacing is close to
  isotropic (one axis per step, in turn) and, as a teacher, averages its probabilities over those axes: an
  ensemble of three views of the same patch instead of one. It predicts that way too (:func:`slicing.network_axes`).

- ``teacher.cross_view`` (with triplanar): when the 2D network does not learn from the 3D one, its slice
  directions teach each other: the student, trained along one axis at a step, learns on the unlabeled patches
  from its own frozen predictions along the other axes (multi-view co-training): a teacher that, unlike the 3D
  network early in training, is not weaker than its student. Measured: no gain on the template-derived tasks
  (docs/BENCHMARKS.md 13n).

and which way pseudo-labels flow (``teacher.directions``): both ways (the reference), from the 2D network to the 3D
one only, or ``auto``: from the 2D network to the 3D one, unless the 2D network has failed on the labeled patches
(:class:`LabeledFit`); then from the 3D network to the 2D one. Under ``auto`` a teacher also has to have learnt the
structure (:data:`LEARNT_FIT`): while neither has, both learn from labels alone, so a network that has not learnt
the structure never teaches.

Why "failed" and not "fits worse": the fit is measured on the training patches, where the from-scratch 3D network
overfits. On white matter it fitted them better than the pretrained 2D network on every co-training step (soft
Dice 0.71 against 0.64) while segmenting the test volumes worse (0.75 against 0.82); letting the better fit teach
reversed the useful direction (docs/BENCHMARKS.md section 13d). A 2D network that found nothing of a small
structure (ventricles: 0.05 against 0.23) is a failure that the training patches do show.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def soft_dice_sums(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(2,) tensor: the soft overlap 2·Σ p·y and the size Σ (p + y) over the foreground classes of a batch
    (``logits`` and one-hot ``target`` (N, K, ...)); sums, so micro-batches and ranks add up to the batch's."""
    probabilities = torch.softmax(logits.detach().float(), 1)[:, 1:]
    target = target[:, 1:]
    return torch.stack([2 * (probabilities * target).sum(), (probabilities + target).sum()])


#: A network whose running Dice on the labeled patches is below this share of the other's has failed to learn the
#: structure: it does not teach (``teacher.directions=auto``) and is left out of the output ensemble.
FAILED_FIT_SHARE = 0.5

#: Below this running Dice on its labeled patches a network has not learnt the structure yet, whatever the other
#: does: it does not teach (``auto``), and it is left out of the output ensemble. The lateral ventricles after 200
#: steps stayed at 0.02-0.22 for both networks (their pseudo-masks cut the 3D network's test Dice from 0.28-0.45
#: to 0.01-0.08); white matter was at 0.39 or above from the first co-training step (docs/BENCHMARKS.md §13f).
#: Chosen after seeing those two tasks, between them with a margin on each side.
LEARNT_FIT = 0.25


class LabeledFit:
    """Each network's running soft Dice on the labeled patches it trains on (an exponential moving average over
    its student steps; ``None`` before its first). Updated from values the step synchronises anyway."""

    DECAY = 0.9  # about the last ten student steps: steady against one odd batch, recent enough to follow training

    def __init__(self, dice: dict[str, float | None] | None = None):
        self.dice = dict(dice or {"2d": None, "3d": None})

    def update(self, network: str, overlap: float, size: float) -> None:
        if size <= 0:  # no labeled patch in this step (lrg.unlabeled=replace with an all-unlabeled batch)
            return
        value, old = overlap / size, self.dice[network]
        self.dice[network] = value if old is None else self.DECAY * old + (1 - self.DECAY) * value

    def learns_from_teacher(self, directions: str, student: str) -> bool:
        """Whether ``student``'s step uses the other network's pseudo-labels (else labeled patches only)."""
        if directions == "both":
            return True
        if directions == "2d_to_3d":
            return student == "3d"
        return (student == "2d") == self.failed("2d") and self.learnt(other_network(student))

    def teacher(self, directions: str, student: str, cross_view: bool) -> str | None:
        """Whose pseudo-labels ``student``'s step learns from on the unlabeled patches: the other network ("2d" or
        "3d"), ``"views"`` (the 2D network's own predictions along its other slice axes, ``teacher.cross_view``),
        or None (labeled patches only)."""
        if self.learns_from_teacher(directions, student):
            return other_network(student)
        if cross_view and student == "2d" and self.usable("2d"):
            return "views"
        return None

    def failed(self, network: str) -> bool:
        """Whether ``network`` fits the labeled patches below :data:`FAILED_FIT_SHARE` of the other's fit."""
        mine, other = self.dice[network], self.dice[other_network(network)]
        return mine is not None and other is not None and mine < FAILED_FIT_SHARE * other

    def learnt(self, network: str) -> bool:
        """Whether ``network`` fits the labeled patches at :data:`LEARNT_FIT` or above (or is not measured yet)."""
        return self.dice[network] is None or self.dice[network] >= LEARNT_FIT

    def usable(self, network: str) -> bool:
        """Whether ``network`` belongs in the output ensemble: it has learnt the structure and not failed."""
        return self.learnt(network) and not self.failed(network)


def unlabeled_unused(history: list[dict], fit: LabeledFit) -> str | None:
    """A message when co-training ran but no step learnt from pseudo-labels (under ``auto``, no network learnt the
    structure well enough to teach): the user got the labeled-only result and should know it. None otherwise."""
    cotrain = [r for r in history if r.get("stage") == "cotrain" and r.get("unlabeled_share")]
    if not cotrain or any(r.get("taught", True) for r in cotrain):  # records made before "taught" count as taught
        return None
    found = ", ".join(f"{net.upper()} {fit.dice[net]:.2f}" for net in ("2d", "3d") if fit.dice[net] is not None)
    return (f"the unlabeled volumes were not used: neither network learnt the structure on the labeled patches "
            f"well enough to teach the other (running Dice {found}; {LEARNT_FIT} is needed), so this is the "
            f"labeled-only result. Train longer (train.steps) or label more volumes")


def other_network(network: str) -> str:
    """The other of the two networks ("2d" <-> "3d")."""
    return "3d" if network == "2d" else "2d"


class EmaCopy:
    """A frozen copy of ``model`` kept at ``decay · copy + (1 − decay) · model`` after every :meth:`update`.
    Buffers (normalisation statistics) are copied as they are."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        # only trainable tensors can differ from the copy (frozen encoder weights never move)
        pairs = [(e, p) for e, p in zip(self.model.parameters(), model.parameters()) if p.requires_grad]
        torch._foreach_lerp_([e for e, _ in pairs], [p.detach() for _, p in pairs], 1.0 - self.decay)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)

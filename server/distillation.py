"""Knowledge distillation on the server's proxy set (Hinton et al. 2015; FedDF, Lin et al. 2020).

The teacher is fixed during a distillation round, so its logits on the proxy set
are computed once per round; a step then only runs the learner. Teachers:
``global``   the FedAvg-aggregated model;
``ensemble`` the mean of this round's client models' softened outputs (FedDF),
           mixed with the averaged model's by ``distill-anchor`` (:func:`ensemble_logits`).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flwr.app import ArrayRecord

from common.config import RunConfig
from common.data import Dataset
from common.models import build_model, build_student
from common.training import evaluate, predict_logits

EARLY_STOP_EVERY = 20  # steps between checks on the validation slice
EARLY_STOP_PATIENCE = 3  # checks without improvement before stopping
VALIDATION_FRACTION = 0.2  # of the proxy set, held out to choose among checkpoints (see ServerDistillation)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    alpha: float = 1.0,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, labels).

    The T^2 factor keeps the soft-target gradients' scale independent of T.
    Without labels (or with alpha = 1) only the soft-target term remains.
    """
    t = temperature
    soft = F.kl_div(
        F.log_softmax(student_logits / t, dim=1), F.softmax(teacher_logits / t, dim=1), reduction="batchmean"
    ) * (t * t)
    if labels is None or alpha >= 1.0:
        return soft
    return alpha * soft + (1.0 - alpha) * F.cross_entropy(student_logits, labels)


def ensemble_probabilities(models: Iterable[nn.Module], images: torch.Tensor, device: torch.device,
                           temperature: float = 1.0) -> torch.Tensor:
    """mean_k softmax(model_k(x) / T) on ``images`` (N, C, H, W): (N, classes). Models of any family.

    Raises:
        ValueError: no model.
    """
    total, count = None, 0
    for model in models:
        softened = F.softmax(predict_logits(model, images, device) / temperature, dim=1)
        total = softened if total is None else total + softened
        count += 1
    if total is None:
        raise ValueError("the ensemble needs at least one client model")
    return total / count


def anchored_logits(mixture: torch.Tensor, images: torch.Tensor, device: torch.device, temperature: float,
                    anchor: nn.Module | None = None, anchor_weight: float = 0.0) -> torch.Tensor:
    """T·log(w · softmax(anchor(x) / T) + (1 − w) · mixture): :func:`ensemble_logits` from the ensemble's
    probabilities (N, classes), so one ensemble teaches learners with different anchors (model families).

    Raises:
        ValueError: ``anchor_weight`` outside [0, 1], or > 0 without an anchor.
    """
    if not 0.0 <= anchor_weight <= 1.0 or (anchor_weight > 0 and anchor is None):
        raise ValueError(f"anchor_weight = {anchor_weight} needs an anchor model and 0 <= anchor_weight <= 1")
    if anchor_weight > 0:
        anchor_probs = F.softmax(predict_logits(anchor, images, device) / temperature, dim=1)
        mixture = anchor_weight * anchor_probs + (1.0 - anchor_weight) * mixture
    return temperature * torch.log(mixture.clamp_min(1e-12))


def ensemble_logits(models: Iterable[nn.Module], images: torch.Tensor, device: torch.device,
                    temperature: float = 1.0, anchor: nn.Module | None = None,
                    anchor_weight: float = 0.0) -> torch.Tensor:
    """FedDF's teacher on ``images`` (N, C, H, W): logits (N, classes) whose softmax at ``temperature`` is

        p = w · softmax(anchor(x) / T) + (1 − w) · mean_k softmax(model_k(x) / T),   w = ``anchor_weight``.

    FedDF's AVGLOGITS (Lin et al. 2020, Sec. 3) averages raw logits; under
    strong label skew a client that saw one class emits input-independent
    logits tens of times larger than the others' and alone decides every soft
    target (``docs/distillation.md``, "FedDF under strong skew"). Averaging probabilities
    (the authors' ``avg_probs`` option) caps each client at a 1/K share, and the
    anchor, the round's averaged model, keeps the teacher no worse than a mix
    of FedAvg and the ensemble (FedBE, Chen & Chao 2021, counts the averaged
    model among its teachers). Returned as T·log p, so :func:`distillation_loss`
    at the same T trains toward exactly p. The models may be of different
    families (architectures): only their outputs are mixed.

    Raises:
        ValueError: no client model, or ``anchor_weight`` outside [0, 1] (or > 0 without an anchor).
    """
    if not 0.0 <= anchor_weight <= 1.0 or (anchor_weight > 0 and anchor is None):
        raise ValueError(f"anchor_weight = {anchor_weight} needs an anchor model and 0 <= anchor_weight <= 1")
    mixture = ensemble_probabilities(models, images, device, temperature)
    return anchored_logits(mixture, images, device, temperature, anchor, anchor_weight)


@dataclass(frozen=True)
class DistillSettings:
    steps: int
    batch_size: int
    temperature: float
    alpha: float
    lr: float


class Distiller:
    """Trains one learner on a teacher's soft targets over the proxy set.

    Given a ``validation`` slice it checks accuracy there (against the slice's
    labels: true ones, or the teacher's top-1, see :class:`ServerDistillation`)
    before the first step and every few steps, stops early and keeps the best of
    those checkpoints, the learner as it came in included (for a fuse-back that
    is the averaged model: FedDF's fallback; for the student, last round's
    student); without one the step budget is all there is. The Adam state lives
    as long as the Distiller, so a student kept across rounds keeps its
    optimizer too.
    """

    def __init__(
        self,
        learner: nn.Module,
        proxy_train: Dataset,
        settings: DistillSettings,
        device: torch.device,
        use_labels: bool,
        seed: int,
    ):
        self.learner = learner.to(device)
        self.proxy_train = proxy_train
        self.settings = settings
        self.device = device
        self.use_labels = use_labels
        self.generator = torch.Generator().manual_seed(seed)
        self.optimizer = torch.optim.Adam(self.learner.parameters(), lr=settings.lr)

    def distill_round(self, teacher_logits: torch.Tensor, validation: Dataset | None = None) -> dict[str, float]:
        """Up to ``steps`` Adam steps toward ``teacher_logits`` (one row per proxy-train image).

        Returns ``steps`` taken, the last batch's ``loss``, ``seconds`` and, with
        a ``validation`` slice, ``kept-step``: the step whose weights were kept
        (0: the learner as it came in) and its ``validation-accuracy`` (top-1
        agreement with the slice's labels, in [0, 1]).
        """
        s, started = self.settings, time.perf_counter()
        # On the learner's device for the whole round: a step indexes its batch there (one copy a round).
        images, teacher_logits = self.proxy_train.images.to(self.device), teacher_logits.to(self.device)
        labels = self.proxy_train.labels.to(self.device) if self.use_labels else None
        best_acc, best_state, best_step, stale, loss, step = -1.0, None, 0, 0, torch.tensor(0.0), 0
        if validation is not None:
            best_acc = evaluate(self.learner, validation, self.device)["accuracy"]
            best_state = copy.deepcopy(self.learner.state_dict())
        for step in range(1, s.steps + 1):
            idx = torch.randint(len(images), (min(s.batch_size, len(images)),), generator=self.generator)
            self.learner.train()
            self.optimizer.zero_grad()
            idx = idx.to(self.device)
            loss = distillation_loss(self.learner(images[idx]), teacher_logits[idx], s.temperature, s.alpha,
                                     None if labels is None else labels[idx])
            loss.backward()
            self.optimizer.step()
            if validation is not None and (step % EARLY_STOP_EVERY == 0 or step == s.steps):
                accuracy = evaluate(self.learner, validation, self.device)["accuracy"]
                if accuracy > best_acc:
                    best_acc, best_state, best_step, stale = accuracy, copy.deepcopy(self.learner.state_dict()), step, 0
                else:
                    stale += 1
                    if stale >= EARLY_STOP_PATIENCE:
                        break
        stats: dict[str, float] = {"steps": step, "loss": loss.item()}
        if best_state is not None:
            self.learner.load_state_dict(best_state)
            stats.update({"kept-step": best_step, "validation-accuracy": best_acc})
        stats["seconds"] = time.perf_counter() - started
        return stats


class ServerDistillation:
    """What the server does after each aggregation when ``distill`` is not 'off'.

    Holds the student and the proxy set; builds the round's teacher logits
    (aggregated model or client ensemble), trains the student on them and, for
    FedDF's ``distill-target`` 'global'/'both', fine-tunes the aggregated model
    before it goes back to the clients. Client models live only inside ``run``.

    A ``validation`` slice (``VALIDATION_FRACTION`` of the proxy set) is held out
    when the proxy set is labelled or the run fuses back into the global model,
    and every learner keeps its best checkpoint on it (:class:`Distiller`). Its
    labels are the true ones when ``proxy-labelled``; otherwise they are the
    round's teacher's top-1 on the held-out images, so fusion keeps the averaged
    model unless distilling made it agree with the teacher on unseen proxy
    images more often than it already did (a label-free form of the FedDF
    authors' validation fallback, ``../shared/notes/feddf-fusion.md`` §2).
    """

    def __init__(self, config: RunConfig, proxy_set: Dataset, device: torch.device):
        self.config = config
        self.device = device
        self.settings = DistillSettings(
            config.distill_steps, config.distill_batch_size, config.distill_temperature,
            config.distill_alpha, config.distill_lr,
        )
        self.fuses_back = config.distill_target in ("global", "both")
        order = np.random.default_rng(config.seed).permutation(len(proxy_set))
        n_val = int(len(proxy_set) * VALIDATION_FRACTION) if config.proxy_labelled or self.fuses_back else 0
        self.validation = proxy_set.subset(np.sort(order[:n_val])) if n_val else None
        self.proxy_train = proxy_set.subset(np.sort(order[n_val:]))
        self.shape, self.num_classes = proxy_set.input_shape, proxy_set.num_classes
        self.student_distiller = (
            self._distiller(build_student(self.shape, self.num_classes))
            if config.distill_target in ("student", "both")
            else None
        )

    @property
    def student(self) -> nn.Module | None:
        """The compact model, when this run trains one."""
        return self.student_distiller.learner if self.student_distiller else None

    def state_dict(self) -> dict:
        """What a resumed run needs: the student, its Adam state and its batch generator's state."""
        d = self.student_distiller
        if d is None:
            return {}
        return {"student": {k: v.detach().cpu() for k, v in d.learner.state_dict().items()},
                "optimizer": d.optimizer.state_dict(), "generator": d.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (an empty dict when the run trains no student)."""
        if self.student_distiller is not None and state:
            d = self.student_distiller
            d.learner.load_state_dict(state["student"])
            d.optimizer.load_state_dict(state["optimizer"])
            d.generator.set_state(state["generator"])

    def _distiller(self, learner: nn.Module) -> Distiller:
        return Distiller(
            learner, self.proxy_train, self.settings, self.device, self.config.proxy_labelled, self.config.seed,
        )

    def _model(self, family: str, arrays: ArrayRecord) -> nn.Module:
        model = build_model(family, self.shape, self.num_classes)
        model.load_state_dict(arrays.to_torch_state_dict())
        return model

    def teacher_logits(self, family: str, averaged: ArrayRecord, clients: list[tuple[str, ArrayRecord]],
                       images: torch.Tensor, mixture: torch.Tensor | None = None) -> torch.Tensor:
        """This round's soft-target source on ``images`` (N, C, H, W) for a learner of ``family``: logits (N, classes).

        ``global``: ``averaged`` (that family's aggregated model) itself; ``ensemble``: :func:`ensemble_logits`
        over ``clients`` [(family, model)] anchored by ``averaged`` (``mixture``: the clients' probabilities on
        ``images``, when already computed).
        """
        anchor = self._model(family, averaged)
        if self.config.distill != "ensemble":
            return predict_logits(anchor, images, self.device)
        if mixture is None:
            mixture = ensemble_probabilities((self._model(f, a) for f, a in clients), images, self.device,
                                             self.settings.temperature)
        return anchored_logits(mixture, images, self.device, self.settings.temperature, anchor,
                               self.config.distill_anchor)

    def run(self, averaged: dict[str, ArrayRecord], clients: list[tuple[str, ArrayRecord]],
            fuse: list[str] | None = None) -> tuple[dict[str, ArrayRecord], dict]:
        """Distil this round: returns {family: its model, fine-tuned when fused back} and the stats.

        ``averaged``: {family: this round's aggregated model}, the global model's family first; ``clients``:
        [(family, client model)], every valid client model of every family; ``fuse``: the families to fuse
        back (those with a valid reply this round; default all). The teacher is ``global``: the first
        family's averaged model, or ``ensemble``: the mean of every client model's probabilities anchored
        by each learner's own family average (``distill-anchor``; the student's is the first family's: the
        global model). Stats: ``global`` (the first family's fuse-back), ``families`` ({family: its
        fuse-back}, with more than one family), ``student``, ``seconds``.
        """
        started = time.perf_counter()
        families, fuse = list(averaged), list(averaged) if fuse is None else list(fuse)
        validation, images = self.validation, self.proxy_train.images
        by_teacher = validation is not None and not self.config.proxy_labelled  # slice labelled by the teacher
        if by_teacher:
            images = torch.cat([images, validation.images])
        mixture = ensemble_probabilities((self._model(f, a) for f, a in clients), images, self.device,
                                         self.settings.temperature) if self.config.distill == "ensemble" else None
        teachers: dict[str, tuple[torch.Tensor, Dataset | None]] = {}

        def teacher(family: str) -> tuple[torch.Tensor, Dataset | None]:
            """(soft targets on proxy-train, validation slice) for a learner anchored by ``family``'s average."""
            if family not in teachers:
                logits = self.teacher_logits(family, averaged[family], clients, images, mixture)
                checked = validation
                if by_teacher:
                    n_train = len(self.proxy_train)
                    checked = dataclasses.replace(validation, labels=logits[n_train:].argmax(1).cpu())
                    logits = logits[:n_train]
                teachers[family] = (logits, checked)
            return teachers[family]

        models, stats, fused = dict(averaged), {}, {}
        if self.fuses_back:
            for family in fuse:
                learner = self._model(family, averaged[family])
                fused[family] = self._distiller(learner).distill_round(*teacher(family))
                models[family] = ArrayRecord(learner.cpu().state_dict())
            if families[0] in fused:
                stats["global"] = fused[families[0]]
            if len(families) > 1:
                stats["families"] = fused
        if self.student_distiller is not None:
            stats["student"] = self.student_distiller.distill_round(*teacher(families[0]))
        stats["seconds"] = time.perf_counter() - started
        return models, stats

"""Outlier exposure from unlabeled wild data: WOODS and SCONE, one implementation.

WOODS (Katz-Samuels, Nakhleh, Nowak and Li, "Training OOD Detectors in their Natural
Habitats", ICML 2022) fine-tunes a classifier on its labeled ID data plus a *wild* set, an
unlabeled mix of ID images and outliers. A logistic layer ``g(s) = w s + b`` on the negative
energy ``s = logsumexp(f)`` judges a sample OOD when ``sigmoid(g(s))`` is high. The problem

    minimise   mean_wild sigmoid(-g(s - eta))                 (wild data judged ID)
    subject to mean_ID sigmoid(g(s)) <= alpha                  (false alarms on ID data)
               CE_ID <= tau * CE_ID(pretrained model)          (classification kept)

is solved by their augmented Lagrangian: each constraint ``c <= 0`` enters the loss as
``lam c + mu/2 c^2`` when ``mu c + lam >= 0`` and as the constant ``-lam^2 / (2 mu)``
otherwise; after every epoch the multipliers move by ``lam += lr_lam c`` (or ``lam -= lr_lam
lam / mu`` in the second case) with ``c`` measured on the whole ID training set in eval mode,
and each penalty weight ``mu`` grows by 1.5x while its constraint is violated. Their defaults
(jkatzsam/woods_ood, CIFAR/train.py): alpha = 0.05, tau = 2, lr_lam = 1, mu = 1 initially,
growth 1.5, tolerance 0, and weight 1 on the wild term; the logistic layer is trained by the
same SGD as the network.

SCONE (Bai, Canal, Du, Kwon, Nowak and Li, "Feed Two Birds with One Scone", ICML 2023) is the
same objective with an energy margin ``eta`` in the wild term and a wild mix that also holds
covariate-shifted ID images; its official run script (deeplearning-wisc/scone, CIFAR/run.sh)
uses ``eta = -10``, 10 % outliers and 50 % corrupted ID images (``gaussian_noise``). WOODS is
``eta = 0`` with no shifted part. The ID term is cross-entropy or, with ``--method um``, the UM
loss, which then stands in for the cross-entropy inside the classification constraint.

Deviations from the authors' code:

* their ``lam2 = lam.cuda()`` makes the two multipliers one tensor, so both constraints
  update the same number: there a violated false-alarm constraint also switches the
  cross-entropy term on (weight ``lam``) while the classification constraint is slack, and a
  slack classification constraint lowers the false-alarm multiplier. Here each constraint
  keeps its own multiplier, as in the paper, so labeled data enter the loss only once the
  classification constraint binds (``alm_term``'s constant branch has no gradient);
* the wild mix is a fixed set drawn once per run (seeded, its composition written to
  ``wild.json``) and its ID part comes from the whole ID training set, which also trains the
  ID term; they hold out half the training set for the mix and draw a Bernoulli(pi) mask per
  batch. Holding data out would give these runs less labeled data than every other method.
  Its outlier part is ``pi`` times the ID training set (5,000 images on fmnist), drawn once;
  theirs draws each batch's outliers afresh from the whole outlier training split;
* the outliers of the mix are ``--wild`` (default: the benchmark's bundled auxiliary
  outliers, which share no image with the OOD test sets); in both papers they are a 70 %
  split of the *test* OOD dataset, whose other 30 % is then tested (the transductive setting
  the methods were made for). To reproduce that, pass a held-out split of an OOD set, never
  the images the evaluation tests;
* the covariate shift is made here: Gaussian noise of one of the five CIFAR-10-C
  ``gaussian_noise`` severities (std 0.04-0.10, Hendrycks and Dietterich, ICLR 2019), chosen
  per image, instead of loading CIFAR-10-C files; each image's noise comes from its own
  seeded stream and is added when a batch is fetched, so the mix never holds the training
  images (which may be streamed files) in memory;
* ID and wild batches are augmented with the recipe's augmentation, as the other outlier
  methods here do (none with ``--recipe woods`` or ``scone``); their code augments neither
  (so there the classification constraint compares unaugmented batches with the unaugmented
  reference loss);
* the multipliers move once per epoch of the whole ID training set (195 steps at batch 256
  on fmnist); their epoch is a ``zip`` of the ID, wild-ID and outlier loaders, which ends
  with the shortest (21 to 136 steps in their CIFAR settings), so they update more often per
  step;
* the constants are their command-line defaults (``AlmSettings``), which SCONE's run script
  uses; the WOODS paper's runs set ``constraint_tol = 0.05``, sweep ``lr_lam`` over {0.1, 1,
  2} and ``penalty_mult`` over {1.1, 1.5}, and pick the epoch and settings by the false
  negative rate on a validation wild mix. Here the last epoch is the model;
* the recipe (epochs, learning rate, schedule, batch) is the caller's, like every fine-tune
  here, by default ``paper-oe`` as for every outlier method (10 epochs at lr 0.01, cosine,
  batch 256, weight decay 1e-4, momentum 0.9). Theirs is ``--recipe woods`` or ``scone``:
  100 epochs, batch 128 ID + 128 wild, Nesterov SGD with weight decay 5e-4, lr halved at 50,
  75 and 90 % of the epochs, no augmentation, from lr 0.001 (WOODS) or 0.0001 (SCONE's run
  script; 0.0005 before its commit bd7cc61);
* under ``torchrun`` the logistic layer would not be synchronised: one process only.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from unleash_ood.data.auxiliary import check_aux, load_aux
from unleash_ood.data.base import Benchmark, ImageData
from unleash_ood.data.concat import ConcatData
from unleash_ood.data.streaming import sequential_batches
from unleash_ood.errors import UserError
from unleash_ood.method.outliers import OutlierObjective, register
from unleash_ood.outputs import forward_outputs
from unleash_ood.rng import numpy_rng, torch_generator
from unleash_ood.specs import WILD_METHODS as WILD_METHODS
from unleash_ood.specs import OutlierSpec
from unleash_ood.train import Recipe

# The standard deviations of CIFAR-10-C's gaussian_noise corruption, severities 1 to 5.
GAUSSIAN_SEVERITIES = (0.04, 0.06, 0.08, 0.09, 0.10)


@dataclass(frozen=True)
class AlmSettings:
    """The augmented Lagrangian's constants, the authors' defaults."""

    false_alarm: float = 0.05  # alpha: the allowed rate of ID judged OOD
    ce_tol: float = 2.0  # tau: the ID loss may grow to tau times the pretrained model's
    lr_lam: float = 1.0
    penalty_mult: float = 1.5
    constraint_tol: float = 0.0
    initial_weight: float = 1.0


def alm_term(c: torch.Tensor, lam: float, weight: float) -> torch.Tensor:
    """The augmented-Lagrangian term of a constraint ``c <= 0``, multiplier ``lam``, penalty
    weight ``weight``: ``lam c + weight/2 c^2``, or the constant ``-lam^2 / (2 weight)`` where
    ``weight c + lam < 0`` (the constraint is slack enough to drop)."""
    if weight * float(c.detach()) + lam >= 0:
        return lam * c + weight / 2 * c**2
    return torch.zeros_like(c) - lam**2 / (2 * weight)


@dataclass
class Multiplier:
    """One constraint's Lagrange multiplier and penalty weight, updated once per epoch."""

    lam: float = 0.0
    weight: float = 1.0

    def term(self, c: torch.Tensor) -> torch.Tensor:
        return alm_term(c, self.lam, self.weight)

    def update(self, c: float, alm: AlmSettings) -> None:
        """The authors' update from the epoch's constraint value ``c``: the multiplier first
        (with the current weight), then the weight grows while the constraint is violated."""
        if c * self.weight + self.lam >= 0:
            self.lam += alm.lr_lam * c
        else:
            self.lam -= alm.lr_lam * self.lam / self.weight
        if c > alm.constraint_tol:
            self.weight *= alm.penalty_mult


def false_alarm_rate(id_logits: torch.Tensor, logistic: nn.Linear) -> torch.Tensor:
    """Mean sigmoid OOD-probability the logistic layer gives the ID samples."""
    s = torch.logsumexp(id_logits, 1, keepdim=True)
    return torch.sigmoid(logistic(s)).mean()


def wild_id_rate(wild_logits: torch.Tensor, logistic: nn.Linear, margin: float) -> torch.Tensor:
    """Mean sigmoid ID-probability of the wild samples, their negative energy shifted by
    ``-margin`` first (SCONE's eta; 0 for WOODS)."""
    s = torch.logsumexp(wild_logits, 1, keepdim=True) - margin
    return torch.sigmoid(-logistic(s)).mean()


def gaussian_noise(x: torch.Tensor, std: np.ndarray, keys: np.ndarray, seed: int) -> torch.Tensor:
    """Float images ``x`` in [0, 1] plus Gaussian noise of std ``std[i]`` on image ``i``,
    clipped to [0, 1] and rounded to the uint8 grid. Image ``i``'s noise is drawn from the
    stream ``("wild-shift", keys[i])`` of ``seed``, so it is the same whichever batch asks."""
    out = np.empty(tuple(x.shape), dtype=np.float32)
    for i, (image, s, key) in enumerate(zip(x.numpy(), std, keys, strict=True)):
        noise = numpy_rng(seed, "wild-shift", int(key)).standard_normal(image.shape) * s
        out[i] = np.round(np.clip(image + noise, 0, 1) * 255) / 255
    return torch.from_numpy(out)


class ShiftedImages:
    """Covariate-shifted ID images: ``data`` with :func:`gaussian_noise` added as batches are
    fetched (nothing is decoded or copied up front, so ``data`` may be streamed files); an
    :class:`~unleash_ood.data.base.ImageData`. ``std`` and ``keys`` (the images' ID training
    indices, which key their noise) run along ``data``."""

    def __init__(self, data: ImageData, std: np.ndarray, keys: np.ndarray, seed: int):
        if not len(data) == len(std) == len(keys):
            raise ValueError(f"{len(data)} images, {len(std)} stds and {len(keys)} keys")
        self.data, self.std, self.keys, self.seed = data, np.asarray(std), np.asarray(keys), seed
        self.name, self.labels = f"{data.name}-shifted", data.labels

    def __len__(self) -> int:
        return len(self.data)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.data.shape

    def __getitems__(self, idx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = np.asarray(idx, dtype=np.int64)
        x, y = self.data.__getitems__(index.tolist())
        return gaussian_noise(x, self.std[index], self.keys[index], self.seed), y

    def batches(
        self, batch_size: int, workers: int = 0, pin_memory: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return sequential_batches(self, batch_size, workers, pin_memory)

    def subset(self, index: torch.Tensor | np.ndarray, name: str | None = None) -> ShiftedImages:
        index = np.asarray(torch.as_tensor(index, dtype=torch.int64))
        data = self.data.subset(index, name)
        return ShiftedImages(data, self.std[index], self.keys[index], self.seed)

    def with_labels(self, labels: torch.Tensor, name: str) -> ShiftedImages:
        return ShiftedImages(self.data.with_labels(labels, name), self.std, self.keys, self.seed)

    def fingerprint(self) -> str:
        h = hashlib.blake2b(digest_size=12)
        h.update(f"{self.data.fingerprint()}|{self.seed}|".encode())
        h.update(self.std.tobytes() + self.keys.tobytes())
        return h.hexdigest()


@dataclass
class WildMix:
    """The wild set: clean ID images, covariate-shifted ID images and outliers, in that
    order, with where each came from. ``images`` holds no pixels of its own: its parts are
    fetched as batches ask (ID images from the training set, in memory or streamed)."""

    images: ConcatData
    id_index: np.ndarray  # ID training indices of the clean part
    shifted_index: np.ndarray  # ID training indices of the shifted part
    shift_std: np.ndarray  # the noise std of each shifted image
    n_outliers: int
    source: str
    seed: int

    def composition(self) -> dict:
        """What ``wild.json`` records: positions ``[0, n_id)`` of the wild set are clean ID
        images, the next ``n_shifted`` shifted ones, the rest outliers (the first
        ``n_outliers`` of the seeded subset ``load_aux(source, ..., n_outliers, seed)``)."""
        return {
            "size": len(self.images),
            "n_id": len(self.id_index),
            "n_shifted": len(self.shifted_index),
            "n_outliers": self.n_outliers,
            "source": self.source,
            "seed": self.seed,
            "id_indices": self.id_index.tolist(),
            "shifted_indices": self.shifted_index.tolist(),
            "shift_std": self.shift_std.tolist(),
        }


def mix_counts(size: int, pi: float, shift: float) -> tuple[int, int, int]:
    """(clean ID, shifted ID, outliers) in a wild set of ``size`` images."""
    n_out = max(1, round(pi * size))
    n_shift = min(round(shift * size), size - n_out)
    return size - n_out - n_shift, n_shift, n_out


def build_wild_mix(
    id_train: ImageData, outliers: ImageData, source: str, pi: float, shift: float, seed: int
) -> WildMix:
    """A wild set as large as ``id_train`` allows (at most ``len(outliers) / pi`` images) with
    a fraction ``pi`` of outliers and ``shift`` of corrupted ID images, drawn from the stream
    ``"wild-mix"`` of ``seed``. No image is read here: ``id_train`` may be streamed files."""
    size = min(len(id_train), math.floor(len(outliers) / pi + 1e-9))
    n_id, n_shift, n_out = mix_counts(size, pi, shift)
    rng = numpy_rng(seed, "wild-mix")
    order = rng.permutation(len(id_train))
    id_index, shifted_index = np.sort(order[:n_id]), np.sort(order[n_id : n_id + n_shift])
    std = rng.choice(GAUSSIAN_SEVERITIES, size=n_shift)
    shifted = ShiftedImages(id_train.subset(shifted_index), std, shifted_index, seed)
    parts = [id_train.subset(id_index), shifted, outliers.subset(np.arange(n_out))]
    unlabelled = torch.full((size,), -1, dtype=torch.int64)
    images = ConcatData("wild", parts).with_labels(unlabelled, "wild")
    return WildMix(images, id_index, shifted_index, std, n_out, source, seed)


def load_wild_mix(spec: OutlierSpec, id_train: ImageData, seed: int) -> WildMix:
    """The wild mix of ``spec`` (``--wild``, ``--wild-pi``, the shifted fraction): outliers
    from ``spec.wild`` (any ``--aux`` source), at most ``--aux-size`` of them."""
    n_out = mix_counts(len(id_train), spec.wild_pi, spec.shift)[2]
    c, h, _ = id_train.shape
    outliers = load_aux(spec.wild, h, c, min(n_out, spec.aux_size), seed)
    if len(outliers) == 0:
        raise UserError(f"the wild outlier source {spec.wild!r} is empty; pass another --wild")
    return build_wild_mix(id_train, outliers, spec.wild, spec.wild_pi, spec.shift, seed)


@register(*WILD_METHODS)
class WildObjective(OutlierObjective):
    """WOODS / SCONE as a :class:`~unleash_ood.train.Trainer` objective.

    Wild batches come from the mix like outlier batches from ``--aux`` (a seeded per-epoch
    permutation, ``aux_ratio`` per ID image). The logistic layer is the objective's own
    parameter (:meth:`named_parameters`, optimised with the model); the multipliers, penalty
    weights and the pretrained model's loss are saved in the train state for ``--resume``.
    """

    def __init__(
        self,
        spec: OutlierSpec,
        mix: WildMix,
        xi: float | None,
        batch_size: int,
        epochs: int,
        augmentation: str,
        seed: int,
        id_train: ImageData,
        alm: AlmSettings = AlmSettings(),
        workers: int = 0,
    ):
        if spec.method not in WILD_METHODS:
            raise ValueError(f"WildObjective takes woods or scone, not {spec.method!r}")
        super().__init__(
            spec, mix.images, xi, batch_size, epochs, augmentation, seed, id_train, workers
        )
        self.mix, self.alm = mix, alm
        self.logistic = nn.Linear(1, 1)
        g = torch_generator(seed, "wild-logistic")
        with torch.no_grad():  # nn.Linear's own initialisation for one input: U(-1, 1)
            for p in self.logistic.parameters():
                p.copy_(torch.rand(p.shape, generator=g) * 2 - 1)
        self.false_alarm = Multiplier(weight=alm.initial_weight)
        self.classification = Multiplier(weight=alm.initial_weight)
        self.base_loss: float | None = None

    @classmethod
    def check_source(cls, spec: OutlierSpec) -> None:
        check_aux(spec.wild)

    @classmethod
    def outlier_source(cls, spec: OutlierSpec, benchmark: Benchmark, recipe: Recipe) -> WildMix:
        """The wild mix (built, or read back when resuming) instead of ``--aux``'s images."""
        return load_wild_mix(spec, benchmark.id_train, recipe.seed)

    def named_parameters(self):
        return self.logistic.named_parameters(prefix="logistic")

    def constraint_values(self, model: nn.Module) -> tuple[float, float]:
        """The false-alarm rate and the ID term over the whole ID training set (eval mode,
        no augmentation), as the authors measure them after each epoch."""
        device = next(model.parameters()).device
        logits = forward_outputs(model, self.id_train, device, workers=self.workers).logits
        with torch.no_grad():
            rate = false_alarm_rate(logits.to(self.logistic.weight.device), self.logistic)
            loss = self.id_loss(logits, self.id_train.labels)
        return float(rate), float(loss)

    def start_epoch(self, epoch: int, model: nn.Module, rank: int = 0, world: int = 1) -> None:
        if world > 1:
            raise UserError("--outliers woods and scone train on one process; drop torchrun")
        super().start_epoch(epoch, model, rank, world)
        if self.base_loss is None:  # the pretrained model's loss, the bound's reference
            device = next(model.parameters()).device
            logits = forward_outputs(model, self.id_train, device, workers=self.workers).logits
            self.base_loss = float(nn.functional.cross_entropy(logits, self.id_train.labels))
        else:  # after an epoch of training (also when resuming: the state is pre-update)
            rate, loss = self.constraint_values(model)
            self.false_alarm.update(rate - self.alm.false_alarm, self.alm)
            self.classification.update(loss - self.alm.ce_tol * self.base_loss, self.alm)

    def state_dict(self) -> dict[str, torch.Tensor]:
        f, c = self.false_alarm, self.classification
        return {
            "wild/alm": torch.tensor(
                [f.lam, f.weight, c.lam, c.weight, self.base_loss], dtype=torch.float64
            ),
            **{f"wild/{k}": p.detach() for k, p in self.named_parameters()},
        }

    def load_state_dict(self, state: dict[str, torch.Tensor], model: nn.Module) -> None:
        f, c = self.false_alarm, self.classification
        f.lam, f.weight, c.lam, c.weight, self.base_loss = state["wild/alm"].tolist()
        with torch.no_grad():
            for k, p in self.named_parameters():
                p.copy_(state[f"wild/{k}"])

    def __call__(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor):
        wild = self.stream.next(x.device)
        n = x.shape[0]
        logits = net(torch.cat([x, wild]))
        id_term = self.id_loss(logits[:n], y)
        loss = (
            self.classification.term(id_term - self.alm.ce_tol * self.base_loss)
            + self.spec.lam * wild_id_rate(logits[n:], self.logistic, self.spec.margin)
            + self.false_alarm.term(
                false_alarm_rate(logits[:n], self.logistic) - self.alm.false_alarm
            )
        )
        return loss, logits[:n]

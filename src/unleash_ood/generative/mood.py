"""MOOD, small: masked-image-modelling pretraining (stage 1, :mod:`.mim`), fine-tuning the
pretrained ViT as a classifier on the ID labels (stage 2), then the library's feature-space
scorers on the fine-tuned model (Li, Chen, Yu, He, Liu, Jia, "Rethinking Out-of-distribution
(OOD) Detection: Masked Image Modeling is All You Need", CVPR 2023; dvlab-research/MOOD).

A run folder holds stage 1 as every detector run does (``config.json``, ``log.txt``,
``checkpoints/``: the ``mim`` detector) and stage 2 in ``finetune/``: a plain classifier run of
the :class:`~unleash_ood.models.vit.ViT` (``finetune/checkpoints/epoch_NNN``, ``last``), so
``unleash evaluate --checkpoint RUN/finetune/checkpoints/last`` and every scorer work on it.
``--resume`` continues whichever stage was interrupted.

Stage 2 reuses the library's classifier :class:`~unleash_ood.train.Trainer` (labels, accuracy,
classifier checkpoints, exact resume) rather than the detector trainer, whose models see no
labels, with Adam in place of its SGD (:class:`FinetuneTrainer`): BEiT fine-tunes with AdamW,
and SGD leaves a small ViT far behind (on 6,000 Fashion-MNIST images, 3 epochs: 43 % validation
accuracy at SGD lr 0.05 against 69 % with Adam lr 1e-3). Deviations from MOOD's fine-tuning
(its README's command: AdamW at lr 2e-5 with weight decay 1e-8, layer-wise lr decay 0.9, 5
warm-up epochs, drop path 0.4, RandAugment, label smoothing 0.1, 100 epochs): Adam betas
(0.9, 0.999) without weight decay (the trainer's is coupled L2), no layer decay, warm-up or
regularisers, cosine decay, the stage-1 augmentation, ``finetune_epochs`` (default 30) at
``finetune_lr`` (default 1e-3).

MOOD scores with SSD's Mahalanobis distance to one Gaussian of all L2-normalised training
features (``eval_with_features.py``, ``--metric mahalanobis``), whose training features it
extracts with the training augmentation on (RandAugment, colour jitter, random erasing,
crops); the default here is that score, ``ssd``, on the features of unaugmented images, and
any other scorer can be asked for (``mahalanobis``, class-conditional, was the default
before). The features are the mean of the tokens each
normalised by the last LayerNorm, where theirs normalise the mean (``fc_norm``).

Stage 1 differs most: MOOD fine-tunes BEiT weights pretrained on ImageNet-22k (its README),
optionally after more masked-image modelling on the ID data, with DALL-E tokens as targets;
here stage 1 is masked-image modelling on the ID training images alone, from scratch, with
pixel targets (:mod:`.mim`).

Not offered: BEiT's released weights in place of stage 1. They are ViT-B/16 and ViT-L/16 at
224x224 (86M / 304M parameters) with relative position biases, layer scale and a CLS token,
in a ``.pth`` pickle: they fit neither this ViT's layout nor its size, and running them on
28x28 / 32x32 benchmarks means upsampling every image 7-8 times into a model two orders of
magnitude past a CPU's budget. A BEiT already fine-tuned on the ID classes (what MOOD's
released checkpoints are) is a classifier, not a stage 1: ``unleash evaluate --model
timm:beit_base_patch16_224 --weights FILE --resize 224`` takes it where timm is installed
(a one-line error where it is not), with any scorer.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unleash_ood.checkpoint import (
    atomic_write_json,
    checkpoint_paths,
    load_checkpoint,
    model_spec,
    read_sidecar,
)
from unleash_ood.data.base import Benchmark
from unleash_ood.errors import UserError
from unleash_ood.evaluate import Evaluation, evaluate
from unleash_ood.generative import create_detector
from unleash_ood.generative.mim import MaskedImageModel
from unleash_ood.generative.trainer import (
    DetectorEpoch,
    DetectorRecipe,
    load_detector,
    train_detector,
)
from unleash_ood.models import create_model
from unleash_ood.rng import seed_global
from unleash_ood.scores.base import Scorer
from unleash_ood.train import EpochStats, Recipe, Trainer, check_fresh, resume_point

FINETUNE_DIR = "finetune"
FINETUNE_EPOCHS = 30
FINETUNE_LR = 1e-3
ADAM_BETA2 = 0.999
DEFAULT_SCORES = "ssd"


def finetune_recipe(
    pretrain: DetectorRecipe,
    model: MaskedImageModel,
    epochs: int | None = None,
    lr: float | None = None,
) -> Recipe:
    """Stage 2's recipe: the ViT of ``model``'s encoder, Adam (beta1 ``momentum``) at ``lr``
    for ``epochs`` (defaults 1e-3 and 30), the stage-1 batch size, augmentation and seed."""
    if lr is not None and not 0 < lr < float("inf"):
        raise UserError(f"--finetune-lr must be a positive number, not {lr!r}")
    return Recipe(
        model="vit",
        model_kwargs={"image_size": model.input_size, **model.arch},
        epochs=FINETUNE_EPOCHS if epochs is None else epochs,
        batch_size=pretrain.batch_size,
        lr=FINETUNE_LR if lr is None else lr,
        momentum=0.9,
        weight_decay=0.0,
        schedule="cosine",
        augment=pretrain.augment,
        seed=pretrain.seed,
    )


class FinetuneTrainer(Trainer):
    """The classifier trainer with Adam: the recipe's ``momentum`` is beta1, beta2 is 0.999,
    its ``weight_decay`` Adam's coupled L2 term. Checkpoints and resume are the trainer's
    (its train-state files hold Adam's moments and step counts)."""

    def make_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        r = self.recipe
        return torch.optim.Adam(
            params, lr=r.lr, betas=(r.momentum, ADAM_BETA2), weight_decay=r.weight_decay
        )


def train_mood(
    benchmark: Benchmark,
    recipe: DetectorRecipe,
    out: Path,
    device: torch.device,
    resume: bool = False,
    progress: bool = True,
    finetune_epochs: int | None = None,
    finetune_lr: float | None = None,
) -> tuple[list[DetectorEpoch], list[EpochStats]]:
    """Both stages into ``out``: masked-image pretraining of ``recipe`` on the ID training
    images (labels unused), then fine-tuning on the ID labels into ``out/finetune``. With
    ``resume`` an unfinished stage 1 continues, then stage 2 continues or starts."""
    if recipe.model != MaskedImageModel.kind:
        raise UserError(f"train_mood trains --kind mim, not {recipe.model!r}")
    c, h, _ = benchmark.image_shape
    model = create_detector(recipe.model, c, h, **recipe.model_kwargs)  # bad options: now
    stage2 = finetune_recipe(recipe, model, finetune_epochs, finetune_lr)
    ft_out = out / FINETUNE_DIR
    if not resume:
        check_fresh(ft_out)
    pretrained = train_detector(benchmark, recipe, out, device, resume, progress)
    return pretrained, _finetune(benchmark, stage2, out, device, progress, resume)


def _finetune(
    benchmark: Benchmark,
    recipe: Recipe,
    out: Path,
    device: torch.device,
    progress: bool,
    resume: bool,
) -> list[EpochStats]:
    """Stage 2: the ViT, its encoder from ``out``'s last stage-1 checkpoint and a fresh
    head, trained on the ID labels into ``out/finetune``."""
    mim, meta = load_detector(out, device)
    seed_global(recipe.seed, "init")  # the head's initial weights
    vit = create_model(
        "vit",
        num_classes=benchmark.num_classes,
        in_channels=mim.in_channels,
        **recipe.model_kwargs,
    )
    vit.encoder.load_state_dict(mim.encoder.state_dict())
    ft_out = out / FINETUNE_DIR
    pretraining = {"kind": mim.kind, "epoch": meta["epoch"], "options": mim.options()}
    trainer = FinetuneTrainer(
        vit,
        recipe,
        benchmark.id_train,
        benchmark.id_val,
        ft_out,
        device,
        model_spec(vit, "vit", mim.input_size, recipe.model_kwargs),
        progress=progress,
        extra_meta={"benchmark": benchmark.name, "pretraining": pretraining, "optimizer": "adam"},
    )
    ft_out.mkdir(parents=True, exist_ok=True)
    if resume and resume_point(ft_out) is not None:
        trainer.resume()
    else:
        atomic_write_json(
            ft_out / "config.json",
            {
                "command": "detector train --kind mim (stage 2: fine-tuning)",
                "benchmark": benchmark.name,
                "recipe": asdict(recipe),
                "pretraining": pretraining,
            },
        )
    return trainer.fit()


def is_mood(meta: dict[str, Any]) -> bool:
    """Whether a sidecar belongs to a MOOD run: its stage-1 detector or its classifier."""
    kind, pretraining = MaskedImageModel.kind, meta.get("pretraining")
    from_mim = isinstance(pretraining, dict) and pretraining.get("kind") == kind
    return meta.get("architecture") == kind or from_mim


def finetuned_checkpoint(path: str | os.PathLike) -> Path:
    """The fine-tuned classifier of a MOOD run folder (its ``finetune/checkpoints/last``), or
    ``path`` itself when it names a stage-2 checkpoint."""
    p = Path(path)
    if not (p / "checkpoints").is_dir():
        if read_sidecar(p).get("detector"):
            raise UserError(
                f"{p} is a stage-1 (masked-image) checkpoint, which scores nothing; give the "
                f"run folder or a checkpoint of its {FINETUNE_DIR}/ stage"
            )
        return p
    last = p / FINETUNE_DIR / "checkpoints" / "last"
    if not all(f.is_file() for f in checkpoint_paths(last)):
        raise UserError(
            f"{p} holds no fine-tuned classifier yet; finish stage 2 with 'unleash detector "
            f"train --kind mim --out {p} --resume' and the same flags"
        )
    return last


def evaluate_mood(
    path: str | os.PathLike,
    benchmark: Benchmark,
    scorers: list[Scorer],
    splits: list[str],
    device: torch.device,
    batch_size: int = 256,
    progress: bool = False,
) -> tuple[Evaluation, dict[str, Any]]:
    """The fine-tuned classifier of MOOD run ``path`` scored by ``scorers`` on ``benchmark``
    (the library's evaluator: fitting on ID train, ID accuracy, every OOD set); returns the
    evaluation and the classifier's sidecar."""
    model, meta = load_checkpoint(
        finetuned_checkpoint(path), device, benchmark.num_classes, benchmark.image_shape
    )
    ev = evaluate(
        model,
        benchmark,
        scorers,
        splits=splits,
        device=device,
        batch_size=batch_size,
        progress=progress,
    )
    return ev, meta

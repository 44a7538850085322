"""Training a generative detector: the library's recipe, epoch seeding, checkpoints and
``--resume``, with the Adam optimiser the generative papers use.

It keeps :mod:`unleash_ood.train`'s guarantees: the randomness of epoch ``e`` (shuffle and
the model's own draws, e.g. the VAE's latent samples) comes from generators seeded with
``(seed, e)``, and a checkpoint holds the weights, the recipe and the epoch while
``train_state_<epoch>.safetensors`` holds Adam's moments and step counts, so resuming from the
last checkpoint reproduces an uninterrupted run exactly on a CPU. Unlike the classifier
trainer it runs in one process (no ``torchrun``), and it validates with the model's own
deterministic loss on the ID validation split (there is no accuracy to report). Each batch is one
call of the model's ``train_step`` (backpropagating its loss, or, for AMA, critic steps and an
autoencoder step), with Adam over the model's ``param_groups``. Kinds whose authors select an
epoch keep ``checkpoints/best`` by :func:`selection_auroc` on the OOD validation sets.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tqdm.auto import tqdm

from unleash_ood.augment import augment
from unleash_ood.checkpoint import (
    atomic_write_json,
    checkpoint_paths,
    read_sidecar,
    save_checkpoint,
)
from unleash_ood.data.base import Benchmark, ImageSet
from unleash_ood.device import prepare_model, to_device
from unleash_ood.errors import UserError
from unleash_ood.generative import MODELS, GenerativeModel, create_detector
from unleash_ood.metrics import ood_metrics
from unleash_ood.rng import seed_global
from unleash_ood.train import (
    Recipe,
    append_log,
    check_fresh,
    epoch_generator,
    global_batches,
    resume_run,
    save_epoch,
)


@dataclass
class DetectorRecipe(Recipe):
    """A :class:`~unleash_ood.train.Recipe` for Adam: ``model`` is the detector kind,
    ``momentum`` Adam's beta1 and ``beta2`` its second, ``weight_decay`` Adam's (coupled) L2
    term; ``grad_clip`` > 0 clips each of the model's clip groups to that norm."""

    beta2: float = 0.999
    grad_clip: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.model not in MODELS:
            raise UserError(f"unknown detector kind {self.model!r}; choose {', '.join(MODELS)}")
        if self.nesterov:
            raise UserError("Adam has no Nesterov momentum; drop --nesterov")
        for flag, beta in (("--momentum", self.momentum), ("--beta2", self.beta2)):
            if not 0 <= beta < 1:
                raise UserError(f"{flag} is one of Adam's betas: it must lie in [0, 1), not {beta}")
        if not self.grad_clip >= 0:
            raise UserError(f"--grad-clip must be >= 0 (0: off), not {self.grad_clip}")


# Each kind's defaults, from its authors' code.
DEFAULT_RECIPES: dict[str, DetectorRecipe] = {
    # VAE4OOD train_one.py: Adam lr 3e-4, beta1 0.9, weight decay 3e-5, batch 64, 200 epochs,
    # gradient norms clipped to 100, no augmentation.
    "vae": DetectorRecipe(
        model="vae",
        epochs=200,
        batch_size=64,
        lr=3e-4,
        momentum=0.9,
        beta2=0.999,
        weight_decay=3e-5,
        schedule="constant",
        augment="none",
        grad_clip=100.0,
    ),
    # somepago/AMA train.py: Adam lr 3e-4, betas (0, 0.9) for critic and generator (the
    # encoder's beta1 0.5 is the model's own), batch 256, 100 epochs, lr /10 three times
    # (here the library's step schedule), no weight decay, no clipping, no augmentation.
    "ama": DetectorRecipe(
        model="ama",
        epochs=100,
        batch_size=256,
        lr=3e-4,
        momentum=0.0,
        beta2=0.9,
        weight_decay=0.0,
        schedule="step",
        augment="none",
    ),
    # clear-nus/diffpath configs/train_config.yaml: Adam lr 1e-4, batch 128, constant lr, no
    # weight decay (500k iterations there; epochs here).
    "diffusion": DetectorRecipe(
        model="diffusion",
        epochs=100,
        batch_size=128,
        lr=1e-4,
        momentum=0.9,
        beta2=0.999,
        weight_decay=0.0,
        schedule="constant",
        augment="none",
    ),
    # MOOD's stage 1 after BEiT's README recipe: Adam betas (0.9, 0.999), gradient norm
    # clipped to 3, cosine decay; crop and flip (BEiT adds colour jitter and random resized
    # crops). Its lr 1.5e-3 is for batch 2048 over 800 epochs (MOOD's script defaults: lr 5e-4,
    # batch 64, 300 epochs, no clipping); a small ViT on batch 256 takes 1e-3 here, and
    # neither the warm-up epochs nor AdamW's decoupled weight decay 0.05 exist in this
    # trainer (Adam's coupled L2 of 0.05 would be far stronger), so weight decay is 0.
    "mim": DetectorRecipe(
        model="mim",
        epochs=100,
        batch_size=256,
        lr=1e-3,
        momentum=0.9,
        beta2=0.999,
        weight_decay=0.0,
        schedule="cosine",
        augment="crop+flip",
        grad_clip=3.0,
    ),
}


@dataclass
class DetectorEpoch:
    """One epoch's summary: the mean training loss (and its named parts) and the mean
    deterministic loss on the ID validation split."""

    epoch: int
    lr: float
    train_loss: float
    val_loss: float
    seconds: float
    parts: dict[str, float] = field(default_factory=dict)


def detector_spec(model: GenerativeModel) -> dict[str, Any]:
    """What a sidecar needs to rebuild ``model``."""
    return {
        "architecture": model.kind,
        "detector": True,
        "model_kwargs": model.options(),
        "in_channels": model.in_channels,
        "input_size": model.input_size,
    }


def checkpoint_of(path: str | os.PathLike) -> Path:
    """A run directory's ``checkpoints/last``, or ``path`` itself when it names a checkpoint."""
    p = Path(path)
    return p / "checkpoints" / "last" if (p / "checkpoints").is_dir() else p


def load_detector(
    path: str | os.PathLike, device: torch.device | str = "cpu"
) -> tuple[GenerativeModel, dict[str, Any]]:
    """Rebuild a detector from its sidecar and load its weights (safetensors only)."""
    meta = read_sidecar(checkpoint_of(path))
    if not meta.get("detector"):
        raise UserError(
            f"{path} is a classifier checkpoint; use 'unleash evaluate' for it, or give a run "
            "of 'unleash detector train'"
        )
    model = create_detector(
        meta["architecture"], meta["in_channels"], meta["input_size"], **meta["model_kwargs"]
    )
    weights, _ = checkpoint_paths(checkpoint_of(path))
    try:
        model.load_state_dict(load_file(str(weights)))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise UserError(
            f"{weights} does not hold this {meta['architecture']} detector ({e})"
        ) from e
    return model.to(device).eval(), meta


@torch.no_grad()
def validation_loss(model: GenerativeModel, data: ImageSet, device: torch.device) -> float:
    """Mean of the model's deterministic per-sample loss (its ``forward``) over ``data``."""
    model.eval()
    total = sum(float(model(to_device(x, device)).double().sum()) for x, _ in data.batches(256))
    return total / len(data)


@torch.no_grad()
def selection_auroc(
    model: GenerativeModel, id_val: ImageSet, ood_val: dict[str, ImageSet], device: torch.device
) -> float:
    """Mean AUROC of ``-model(x)`` (higher = more ID-like) of the ID validation split against
    each OOD validation set: the epoch-selection criterion, which reads no test set."""
    model.eval()

    def scores(data: ImageSet) -> torch.Tensor:
        return torch.cat(
            [-model(to_device(x, device)).double().cpu() for x, _ in data.batches(256)]
        )

    s_id = scores(id_val).numpy()
    return sum(ood_metrics(s_id, scores(d).numpy())["auroc"] for d in ood_val.values()) / len(
        ood_val
    )


class DetectorTrainer:
    """Trains a detector of ``recipe.model`` on ``train`` into ``out/checkpoints``."""

    def __init__(
        self,
        model: GenerativeModel,
        recipe: DetectorRecipe,
        train: ImageSet,
        val: ImageSet,
        out: Path,
        device: torch.device,
        benchmark: str,
        progress: bool = True,
        ood_val: dict[str, ImageSet] | None = None,
    ):
        if len(train) < recipe.batch_size:
            raise UserError(
                f"the training set ({len(train)}) is smaller than one batch "
                f"({recipe.batch_size}); lower --batch-size"
            )
        self.recipe, self.train, self.val, self.out = recipe, train, val, out
        self.ckpt_dir, self.device, self.progress = out / "checkpoints", device, progress
        self.model = prepare_model(model, device)
        self.spec = {**detector_spec(model), "benchmark": benchmark}
        self.opt = torch.optim.Adam(
            model.param_groups(),
            lr=recipe.lr,
            betas=(recipe.momentum, recipe.beta2),
            weight_decay=recipe.weight_decay,
        )
        self.start_epoch = 0
        # Epoch selection on OOD validation sets, for the kinds whose authors select epochs.
        self.ood_val = (ood_val or {}) if model.selects_epoch else {}
        self.best = -float("inf")

    def resume(self) -> None:
        """Continue from ``checkpoints/last``: weights, Adam state, epoch, best selection."""
        self.start_epoch, _ = resume_run(self.out, self.recipe, self.model, self.opt)
        if self.ood_val and (self.ckpt_dir / "best.json").is_file():
            self.best = read_sidecar(self.ckpt_dir / "best")["selection"]["auroc"]

    def train_epoch(self, epoch: int) -> tuple[float, dict[str, float]]:
        r = self.recipe
        for group in self.opt.param_groups:
            group["lr"] = r.lr_at(epoch)
        g = epoch_generator(r.seed, epoch)
        seed_global(r.seed, "epoch-layers", epoch)  # the model's own draws
        self.model.train()
        sums: dict[str, torch.Tensor] = {}
        steps = len(self.train) // r.batch_size
        bar = tqdm(
            global_batches(len(self.train), r.batch_size, g),
            total=steps,
            desc=f"epoch {epoch + 1}/{r.epochs}",
            leave=False,
            disable=not self.progress,
        )
        for step, idx in enumerate(bar):
            x, _ = self.train.__getitems__(idx)
            x = to_device(augment(x, r.augment, g, padding=x.shape[-1] // 8), self.device)
            loss, parts = self.model.train_step(x, self.opt, r.grad_clip)
            for k, v in {"loss": loss.detach(), **parts}.items():
                sums[k] = sums.get(k, 0) + v
            if step % 25 == 0 and not bar.disable:
                bar.set_postfix(loss=f"{float(sums['loss']) / (step + 1):.2f}")
        means = {k: float(v) / steps for k, v in sums.items()}
        return means.pop("loss"), means

    def fit(self) -> list[DetectorEpoch]:
        r, history = self.recipe, []
        for epoch in range(self.start_epoch, r.epochs):
            t0 = time.perf_counter()
            loss, parts = self.train_epoch(epoch)
            done = epoch + 1
            if done % r.save_every == 0 or done == r.epochs:
                val = validation_loss(self.model, self.val, self.device)
                stats = DetectorEpoch(
                    done, r.lr_at(epoch), loss, val, time.perf_counter() - t0, parts
                )
                selection = self.select(stats)
                self.save(stats)
                history.append(stats)
                self.log(stats, selection)
        return history

    def meta(self, stats: DetectorEpoch) -> dict[str, Any]:
        return {"recipe": asdict(self.recipe), "epoch": stats.epoch, "metrics": asdict(stats)}

    def select(self, stats: DetectorEpoch) -> float | None:
        """The epoch's OOD-validation AUROC (None without selection); a better epoch than any
        before becomes ``checkpoints/best``. It is written before the epoch's own files, so
        a crash in between leaves a resume that recomputes the same value, not a lost best."""
        if not self.ood_val:
            return None
        auroc = selection_auroc(self.model, self.val, self.ood_val, self.device)
        if auroc > self.best:
            self.best = auroc
            rule = "mean AUROC of the ID validation split against the OOD validation sets"
            selection = {"rule": rule, "auroc": auroc, "sets": sorted(self.ood_val)}
            meta = {**self.meta(stats), "selection": selection}
            save_checkpoint(self.ckpt_dir / "best", self.model, self.spec, **meta)
        return auroc

    def save(self, stats: DetectorEpoch) -> None:
        save_epoch(self.ckpt_dir, stats.epoch, self.model, self.spec, self.opt, self.meta(stats))

    def log(self, s: DetectorEpoch, selection: float | None = None) -> None:
        parts = "  ".join(f"{k} {v:.3f}" for k, v in s.parts.items())
        chosen = "" if selection is None else f"  ood-val auroc {selection:.4f}"
        line = (
            f"epoch {s.epoch:3d}  lr {s.lr:.2e}  train loss {s.train_loss:.3f}  {parts}  "
            f"val loss {s.val_loss:.3f}{chosen}  {s.seconds:.1f}s"
        )
        append_log(self.out, line, echo=True)  # --no-progress hides bars, not these lines


def detector_recipe(kind: str, **overrides: Any) -> DetectorRecipe:
    """``kind``'s default recipe with ``overrides`` (None values ignored) on top."""
    if kind not in DEFAULT_RECIPES:
        raise UserError(f"unknown detector kind {kind!r}; choose {', '.join(DEFAULT_RECIPES)}")
    return replace(DEFAULT_RECIPES[kind], **{k: v for k, v in overrides.items() if v is not None})


def train_detector(
    benchmark: Benchmark,
    recipe: DetectorRecipe,
    out: Path,
    device: torch.device,
    resume: bool = False,
    progress: bool = True,
) -> list[DetectorEpoch]:
    """Train ``recipe.model`` from scratch on ``benchmark``'s ID training split (labels
    unused), checkpointing into ``out``; ``resume`` continues the run in ``out``. Kinds that
    select epochs keep ``checkpoints/best`` by the OOD validation sets; no test set is read."""
    if not resume:
        check_fresh(out)
    seed_global(recipe.seed, "init")
    c, h, _ = benchmark.image_shape
    model = create_detector(recipe.model, c, h, **recipe.model_kwargs)
    trainer = DetectorTrainer(
        model,
        recipe,
        benchmark.id_train,
        benchmark.id_val,
        out,
        device,
        benchmark.name,
        progress,
        benchmark.ood_val,
    )
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        trainer.resume()
    else:
        atomic_write_json(
            out / "config.json",
            {
                "command": "detector train",
                "benchmark": benchmark.name,
                "recipe": asdict(recipe),
                "train_size": len(benchmark.id_train),
            },
        )
    return trainer.fit()

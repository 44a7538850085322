"""One readable training loop: SGD, a per-epoch schedule, a checkpoint every k epochs, resume,
and DistributedDataParallel under ``torchrun`` with the global batch size preserved.

Every random choice of epoch ``e`` (shuffling, augmentation, dropout) is drawn from named
streams of ``(seed, e)`` (:mod:`unleash_ood.rng`). The RNG state at an epoch boundary is
therefore a function of the recipe and the epoch, and resuming from the last complete
checkpoint (weights, momentum buffers, epoch; the schedule is a function of the epoch)
reproduces an uninterrupted run.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from unleash_ood.augment import augment
from unleash_ood.checkpoint import (
    atomic_write_bytes,
    atomic_write_json,
    checkpoint_paths,
    epoch_checkpoints,
    load_checkpoint,
    model_spec,
    read_sidecar,
    read_tensors,
    save_checkpoint,
)
from unleash_ood.context import RunContext
from unleash_ood.data.base import ImageData
from unleash_ood.data.noise import TrainingData
from unleash_ood.data.streaming import load_batches
from unleash_ood.device import Dist as Dist
from unleash_ood.device import init_distributed as init_distributed
from unleash_ood.device import prepare_model, to_device
from unleash_ood.errors import UserError
from unleash_ood.metrics import accuracy
from unleash_ood.models import Classifier, create_model
from unleash_ood.outputs import forward_outputs
from unleash_ood.rng import seed_global, torch_generator
from unleash_ood.rundir import append_log as append_log
from unleash_ood.specs import SCHEDULES as SCHEDULES
from unleash_ood.specs import Recipe as Recipe

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class Objective:
    """A training loss and the hooks the :class:`Trainer` calls around it, every one always.

    ``objective(net, x, y)`` gives ``(loss, ID logits)`` each step; ``start_epoch`` runs before
    every epoch (POEM re-selects its outliers, DOE switches on); ``named_parameters`` are
    parameters of the objective's own (WOODS's logistic layer), trained by the same optimizer
    and saved beside the model's state; ``state_dict`` / ``load_state_dict`` hold what
    ``--resume`` must restore. The hooks do nothing here, so a plain loss defines
    ``__call__`` alone.
    """

    def __call__(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor):
        raise NotImplementedError

    def start_epoch(self, epoch: int, model: nn.Module, rank: int = 0, world: int = 1) -> None:
        """Called before every epoch."""

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return iter(())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor], model: nn.Module) -> None:
        """Restore what :meth:`state_dict` saved."""


class LossObjective(Objective):
    """A plain function ``(net, x, y) -> (loss, logits)`` as an :class:`Objective`."""

    def __init__(self, fn: LossFn):
        self.fn = fn

    def __call__(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor):
        return self.fn(net, x, y)


def _cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    logits = model(x)
    return F.cross_entropy(logits, y), logits


cross_entropy = LossObjective(_cross_entropy)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of epoch ``epoch``'s shuffle and augmentation."""
    return torch_generator(seed, "epoch", epoch)


def global_batches(n: int, batch_size: int, g: torch.Generator) -> Iterator[torch.Tensor]:
    """Shuffled index batches of the global batch size; the ragged last batch is dropped."""
    perm = torch.randperm(n, generator=g)
    for start in range(0, n - batch_size + 1, batch_size):
        yield perm[start : start + batch_size]


def _epoch_path(ckpt_dir: Path, epoch: int) -> Path:
    return ckpt_dir / f"epoch_{epoch:03d}"


STATE_FILE = re.compile(r"train_state_(\d+)\.safetensors")


def _state_path(ckpt_dir: Path, epoch: int) -> Path:
    return ckpt_dir / f"train_state_{epoch:03d}.safetensors"


_ADAM_STATE = ("step", "exp_avg", "exp_avg_sq")


def _optimizer_key(key: str, name: str) -> str:
    """``momentum/<param>`` for SGD's buffer (the key older states hold), else
    ``optimizer/<key>/<param>``."""
    return f"momentum/{name}" if key == "momentum_buffer" else f"optimizer/{key}/{name}"


def objective_parameters(objective: Objective) -> dict[str, nn.Parameter]:
    """The objective's own parameters by name, prefixed ``objective.`` (none for most)."""
    return {f"objective.{n}": p for n, p in objective.named_parameters()}


def _write_train_state(
    ckpt_dir: Path,
    epoch: int,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    objective_state: dict[str, torch.Tensor] | None = None,
    own: dict[str, nn.Parameter] | None = None,
) -> None:
    """The optimizer's per-parameter tensors (SGD momentum buffers; Adam's moments and step)
    by parameter name (the model's, and the objective's ``own``) and the objective's own
    state (e.g. POEM's outlier buffer)."""
    names = {p: n for n, p in [*model.named_parameters(), *(own or {}).items()]}
    tensors = {
        _optimizer_key(key, names[p]): t.detach().cpu().contiguous()
        for p, s in opt.state.items()
        for key, t in s.items()
        if isinstance(t, torch.Tensor)
    }
    for key, t in (objective_state or {}).items():
        tensors[f"objective/{key}"] = t.detach().cpu().contiguous()
    path = _state_path(ckpt_dir, epoch)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"epoch": str(epoch)})
    os.replace(tmp, path)


def save_epoch(
    ckpt_dir: Path,
    epoch: int,
    model: Classifier,
    spec: dict[str, Any],
    opt: torch.optim.Optimizer,
    meta: dict[str, Any],
    objective_state: dict[str, torch.Tensor] | None = None,
    own: dict[str, nn.Parameter] | None = None,
) -> None:
    """Save epoch ``epoch`` so that a crash at any point leaves a run ``--resume`` continues.

    Every file is replaced atomically, in this order: ``epoch_k`` (weights, then sidecar), the
    train state of ``k``, ``last`` (a convenience copy), and only then the older train states
    are removed. Resuming reads the newest epoch whose checkpoint and train state are both
    complete (:func:`resume_point`), never ``last``, so a crash between any two writes falls
    back to epoch ``k - 1`` or continues from ``k``.
    """
    save_checkpoint(_epoch_path(ckpt_dir, epoch), model, spec, **meta)
    _write_train_state(ckpt_dir, epoch, model, opt, objective_state, own)
    save_checkpoint(ckpt_dir / "last", model, spec, **meta)
    for old in ckpt_dir.glob("train_state_*.safetensors"):
        if old != _state_path(ckpt_dir, epoch):
            old.unlink(missing_ok=True)


def _load_train_state(
    ckpt_dir: Path,
    epoch: int,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    own: dict[str, nn.Parameter] | None = None,
) -> dict[str, torch.Tensor]:
    """Restore the optimizer's per-parameter tensors; returns the objective's saved state.
    Adam's ``step`` counts stay on the CPU, where the optimizer keeps them."""
    tensors = read_tensors(_state_path(ckpt_dir, epoch))
    for name, p in [*model.named_parameters(), *(own or {}).items()]:
        for key in ("momentum_buffer", *_ADAM_STATE):
            t = tensors.get(_optimizer_key(key, name))
            if t is not None:
                opt.state[p][key] = t if key == "step" else t.to(p.device)
    prefix = "objective/"
    return {k[len(prefix) :]: t for k, t in tensors.items() if k.startswith(prefix)}


def resume_point(out: Path) -> int | None:
    """The newest epoch of the run in ``out`` whose checkpoint (weights and sidecar) and train
    state all exist, or None when no epoch was saved completely."""
    ckpt_dir = out / "checkpoints"
    states = (STATE_FILE.fullmatch(p.name) for p in ckpt_dir.glob("train_state_*"))
    saved = (int(m[1]) for m in states if m)
    complete = [
        e for e in saved if all(p.is_file() for p in checkpoint_paths(_epoch_path(ckpt_dir, e)))
    ]
    return max(complete, default=None)


def check_resumable(out: Path) -> None:
    """Refuse ``--resume`` of a folder that holds no checkpoint to continue from."""
    if resume_point(out) is None:
        raise UserError(f"{out} holds no run to resume; drop --resume to start it afresh")


def check_fresh(out: Path) -> None:
    """Refuse to start afresh over a run that ``--resume`` could continue. A folder whose
    first save never completed holds nothing to lose and is written over."""
    if resume_point(out) is not None:
        raise UserError(
            f"{out} already holds a training run; pass --resume to continue it "
            f"or choose another --out"
        )


def resume_run(
    out: Path,
    recipe: Recipe,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    own: dict[str, nn.Parameter] | None = None,
) -> tuple[int, dict[str, torch.Tensor]]:
    """Load the newest complete epoch of ``out`` and its optimizer state into ``model`` and
    ``opt``, once its recipe is checked to be ``recipe``; returns its epoch and the
    objective's state. ``last`` is rewritten from that epoch, in case a crash tore it."""
    epoch = resume_point(out)
    if epoch is None:
        raise UserError(f"{out} holds no run to resume; drop --resume to start it afresh")
    ckpt_dir = out / "checkpoints"
    saved = _epoch_path(ckpt_dir, epoch)
    meta = read_sidecar(saved)
    if meta.get("recipe") != asdict(recipe):
        raise UserError(
            f"cannot resume {out}: its recipe differs from the flags given; "
            f"rerun with the same flags"
        )
    model.load_state_dict(read_tensors(checkpoint_paths(saved)[0]))
    for src, dst in zip(checkpoint_paths(saved), checkpoint_paths(ckpt_dir / "last"), strict=True):
        atomic_write_bytes(dst, src.read_bytes())
    return epoch, _load_train_state(ckpt_dir, epoch, model, opt, own)


@dataclass
class EpochStats:
    """One epoch's summary. ``train_loss`` is the objective (for UM always >= xi, so it hides
    where the fit stands); ``train_ce`` is the plain cross-entropy of the same ID batches."""

    epoch: int
    lr: float
    train_loss: float
    train_acc: float
    val_acc: float
    seconds: float
    train_ce: float = float("nan")


class Trainer:
    """Trains ``model`` on ``train`` with ``recipe``, checkpointing into ``out/checkpoints``.

    ``train`` and ``val`` may be held in memory or streamed from files (any
    :class:`~unleash_ood.data.base.ImageData`); ``workers`` processes fetch the shuffled
    batches ahead of the step (decoding them, for streamed files).
    """

    def __init__(
        self,
        model: Classifier,
        recipe: Recipe,
        train: ImageData,
        val: ImageData,
        out: Path,
        device: torch.device,
        spec: dict[str, Any],
        objective: Objective | LossFn = cross_entropy,
        progress: bool = True,
        extra_meta: dict[str, Any] | None = None,
        on_save: Callable[[int, Classifier, dict], None] | None = None,
        workers: int = 0,
    ):
        if not isinstance(objective, Objective):  # a plain loss function
            objective = LossObjective(objective)
        recipe.check()
        self.recipe, self.train_set, self.val_set = recipe, train, val
        self.workers = workers
        self.dist, self.device = init_distributed(device)
        if recipe.batch_size % self.dist.world:
            raise UserError(
                f"batch size {recipe.batch_size} does not split over "
                f"{self.dist.world} processes; use a multiple of {self.dist.world}"
            )
        if len(train) < recipe.batch_size:
            raise UserError(
                f"the training set ({len(train)}) is smaller than one batch "
                f"({recipe.batch_size}); lower --batch-size"
            )
        self.model = prepare_model(model, self.device)
        self.net: nn.Module = self.model
        if self.dist.world > 1:
            self.net = nn.parallel.DistributedDataParallel(self.model)
        self.own = objective_parameters(objective)
        for p in self.own.values():
            p.data = p.data.to(self.device)
        self.opt = self.make_optimizer(
            [p for p in self.model.parameters() if p.requires_grad] + list(self.own.values())
        )
        self.out, self.ckpt_dir = out, out / "checkpoints"
        self.spec, self.objective, self.progress = spec, objective, progress
        self.extra_meta = extra_meta or {}
        self.on_save = on_save  # e.g. a Tracker: evaluates each saved epoch
        self.start_epoch = 0

    def make_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """SGD with the recipe's momentum, Nesterov and weight decay (a subclass may differ:
        MOOD's fine-tuning takes Adam)."""
        r = self.recipe
        return torch.optim.SGD(
            params, lr=r.lr, momentum=r.momentum, nesterov=r.nesterov, weight_decay=r.weight_decay
        )

    def resume(self) -> None:
        """Continue from ``checkpoints/last`` (model, momentum, epoch)."""
        self.start_epoch, state = resume_run(self.out, self.recipe, self.model, self.opt, self.own)
        self.objective.load_state_dict(state, self.model)

    def train_epoch(self, epoch: int) -> tuple[float, float, float]:
        """One epoch; returns the mean objective, accuracy and plain CE on the ID batches."""
        r, d = self.recipe, self.dist
        for group in self.opt.param_groups:
            group["lr"] = r.lr_at(epoch)
        g = epoch_generator(r.seed, epoch)
        seed_global(r.seed, "epoch-layers", epoch)  # dropout and other global-RNG layers
        self.objective.start_epoch(epoch, self.model, d.rank, d.world)
        self.net.train()
        # Running sums stay on the device: reading them every step would stall a GPU.
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        n_batches = len(self.train_set) // r.batch_size
        batches = global_batches(len(self.train_set), r.batch_size, g)
        bar = tqdm(
            load_batches(self.train_set, batches, self.workers, self.device.type == "cuda"),
            total=n_batches,
            desc=f"epoch {epoch + 1}/{r.epochs}",
            leave=False,
            disable=not (self.progress and d.main),
        )
        for step, (x, y) in enumerate(bar):
            x = augment(x, r.augment, g, padding=x.shape[-1] // 8)[d.rank :: d.world]
            x = to_device(x, self.device)
            y = y[d.rank :: d.world].to(self.device, non_blocking=True)
            # Gradients are cleared first: an objective may accumulate some itself (DOE).
            self.opt.zero_grad(set_to_none=True)
            loss, logits = self.objective(self.net, x, y)
            loss.backward()
            self.opt.step()
            sums += torch.stack(
                [
                    loss.detach() * y.numel(),
                    (logits.argmax(1) == y).sum(),
                    torch.tensor(y.numel(), device=self.device),
                    F.cross_entropy(logits.detach(), y, reduction="sum"),
                ]
            ).double()
            if step % 25 == 0 and not bar.disable:
                s = sums.tolist()
                bar.set_postfix(
                    loss=f"{s[0] / s[2]:.4f}", ce=f"{s[3] / s[2]:.4f}", acc=f"{s[1] / s[2]:.3f}"
                )
        if self.dist.world > 1:
            dist.all_reduce(sums)
        loss_sum, correct, count, ce_sum = sums.tolist()
        return loss_sum / count, correct / count, ce_sum / count

    def fit(self) -> list[EpochStats]:
        r, history = self.recipe, []
        for epoch in range(self.start_epoch, r.epochs):
            t0 = time.perf_counter()
            loss, acc, ce = self.train_epoch(epoch)
            done = epoch + 1
            if self.dist.main and (done % r.save_every == 0 or done == r.epochs):
                val_acc = accuracy(
                    forward_outputs(
                        self.model, self.val_set, self.device, workers=self.workers
                    ).logits,
                    self.val_set.labels,
                )
                stats = EpochStats(
                    done, r.lr_at(epoch), loss, acc, val_acc, time.perf_counter() - t0, ce
                )
                self.save(stats)
                history.append(stats)
                self.log(stats)
                if self.on_save:
                    self.on_save(stats.epoch, self.model, asdict(stats))
            self.dist.barrier()
        return history

    def save(self, stats: EpochStats) -> None:
        meta = {
            "recipe": asdict(self.recipe),
            "epoch": stats.epoch,
            "metrics": asdict(stats),
            **self.extra_meta,
        }
        state = self.objective.state_dict()
        save_epoch(
            self.ckpt_dir, stats.epoch, self.model, self.spec, self.opt, meta, state, self.own
        )

    def log(self, s: EpochStats) -> None:
        line = (
            f"epoch {s.epoch:3d}  lr {s.lr:.4f}  train loss {s.train_loss:.4f}  "
            f"train CE {s.train_ce:.4f}  "
            f"train acc {100 * s.train_acc:.2f}  val acc {100 * s.val_acc:.2f}  "
            f"{s.seconds:.1f}s"
        )
        append_log(self.out, line, echo=True)  # --no-progress hides bars, not these lines


def replay_saves(
    run: Path,
    on_save: Callable[[int, Classifier, dict], None],
    device: torch.device,
    benchmark,
    progress: bool = True,
) -> None:
    """Hand every saved epoch of ``run`` to ``on_save``, as the trainer does while training
    (for runs whose checkpoints were made elsewhere, e.g. copied from a search)."""
    found = epoch_checkpoints(run)
    for epoch, path in tqdm(found, desc="epochs", disable=not progress):
        model, meta = load_checkpoint(path, device, benchmark.num_classes, benchmark.image_shape)
        on_save(epoch, model, meta.get("metrics", {}))


def pretrain(
    benchmark,
    recipe: Recipe,
    out: Path,
    device: torch.device | str = "auto",
    resume: bool = False,
    progress: bool = True,
    on_save: Callable[[int, Classifier, dict], None] | None = None,
    train_data: TrainingData | None = None,
    workers: int = 0,
) -> list[EpochStats]:
    """:func:`pretrain_run` in a :class:`~unleash_ood.context.RunContext` made here;
    ``workers`` processes decode streamed training and validation images."""
    ctx = RunContext.open(benchmark, out, device, progress, workers)
    return pretrain_run(ctx, recipe, resume, on_save, train_data)


def pretrain_run(
    ctx: RunContext,
    recipe: Recipe,
    resume: bool = False,
    on_save: Callable[[int, Classifier, dict], None] | None = None,
    train_data: TrainingData | None = None,
) -> list[EpochStats]:
    """Train ``recipe.model`` from scratch on the ID training split of ``ctx.benchmark``, or
    on the subset / noisy labels ``train_data`` describes (recorded in every checkpoint, so
    fine-tunes of the model train on the same data; flipped indices in
    ``out/label_noise.json``)."""
    benchmark, out = ctx.benchmark, ctx.out
    if resume:
        check_resumable(out)
    train_data = train_data or TrainingData()
    train_set, flipped = train_data.apply(benchmark.id_train)
    seed_global(recipe.seed, "init")
    c, h, _ = benchmark.image_shape
    model = create_model(
        recipe.model,
        num_classes=benchmark.num_classes,
        in_channels=c,
        mean=benchmark.mean,
        std=benchmark.std,
        **recipe.model_kwargs,
    )
    spec = model_spec(model, recipe.model, h, recipe.model_kwargs)
    data_meta = {} if train_data.is_full else {"train_data": train_data.to_dict()}
    trainer = Trainer(
        model,
        recipe,
        train_set,
        benchmark.id_val,
        out,
        ctx.device,
        spec,
        progress=ctx.progress,
        extra_meta={"benchmark": benchmark.name, **data_meta},
        on_save=on_save,
        workers=ctx.workers,
    )
    if ctx.main:
        if not resume:
            check_fresh(out)
        out.mkdir(parents=True, exist_ok=True)
        if not resume:
            atomic_write_json(
                out / "config.json",
                {
                    "command": "pretrain",
                    "benchmark": benchmark.name,
                    "recipe": asdict(recipe),
                    "train_data": train_data.to_dict(),
                    "train_size": len(train_set),
                    "workers": ctx.workers,
                },
            )
            if train_data.label_noise:
                atomic_write_json(
                    out / "label_noise.json",
                    {**train_data.to_dict(), "flipped": flipped.tolist()},
                )
    if resume:
        trainer.resume()
    return trainer.fit()

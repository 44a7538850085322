"""Fine-tuning a well-trained model with UM, UMAP or the plain cross-entropy control (or
MODE's ALPA, :mod:`unleash_ood.method.alpa`).

``ce`` is the identical fine-tune without the constraint: every UM/UMAP number needs it beside
it, because a few more epochs at a small learning rate change OOD metrics on their own.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from unleash_ood.checkpoint import (
    atomic_write_json,
    load_checkpoint,
    read_sidecar,
    save_checkpoint,
    spec_of,
)
from unleash_ood.context import RunContext
from unleash_ood.data.base import Benchmark
from unleash_ood.data.noise import TrainingData
from unleash_ood.errors import UserError
from unleash_ood.evaluate import evaluate
from unleash_ood.method.alpa import AlpaObjective, check_alpa_model
from unleash_ood.method.constraint import (
    UMObjective,
    XiEstimate,
    estimate_loss_constraint,
    mean_train_loss,
)
from unleash_ood.method.outliers import outlier_class
from unleash_ood.method.wild import WildObjective
from unleash_ood.models.masked import apply_umap, export_dense, mask_sparsity
from unleash_ood.rng import seed_global
from unleash_ood.specs import METHODS as METHODS
from unleash_ood.specs import PAPER_RECIPE
from unleash_ood.specs import RECIPES as RECIPES
from unleash_ood.specs import FinetuneSpec as FinetuneSpec
from unleash_ood.specs import default_recipe_name as default_recipe_name
from unleash_ood.specs import finetune_recipe as finetune_recipe
from unleash_ood.train import (
    Objective,
    Recipe,
    Trainer,
    check_fresh,
    cross_entropy,
    replay_saves,
    resume_point,
)

FINETUNE_RECIPE = PAPER_RECIPE  # earlier name of the default recipe


@dataclass
class XiChoice:
    """How xi was chosen: ``given``, ``estimate`` (random-mask) or ``validate`` (grid)."""

    source: str
    xi: float | None
    train_loss: float | None = None
    estimate: dict[str, Any] | None = None
    grid: list[dict[str, Any]] = field(default_factory=list)


def noop_error(xi: float, train_loss: float) -> UserError:
    return UserError(
        f"xi = {xi:.4g} is not above the model's own training loss {train_loss:.4g} (eval mode, "
        f"augmented training set), so UM would train exactly like --method ce; pass a larger "
        f"--xi, try --xi validate, or run --method ce"
    )


def with_method_layers(model: torch.nn.Module, spec: FinetuneSpec, seed: int) -> torch.nn.Module:
    """A mask-training method (UMAP, mask-CE) wraps every conv/linear layer in a learnable
    mask; UM and CE train all weights."""
    if spec.trains != "mask":
        return model
    return apply_umap(model, keep=spec.keep, train_weights=spec.train_weights, seed=seed)


def make_objective(
    benchmark: Benchmark,
    spec: FinetuneSpec,
    recipe: Recipe,
    xi: float | None,
    workers: int = 0,
    channels: int | None = None,
) -> Objective:
    """The training loss: CE or UM on the ID term, plus the registered outlier method's term
    when asked for (:data:`~unleash_ood.method.outliers.OUTLIER_OBJECTIVES`); for ALPA, CE
    plus its local term on the last feature map of ``channels`` channels. ``workers``
    processes decode streamed images in the passes the objective makes over data."""
    if spec.loss == "alpa":
        if channels is None:
            raise ValueError("ALPA's objective needs the channels of the model's last map")
        return AlpaObjective(
            channels, spec.alpa_weight, spec.alpa_temperature, spec.alpa_dim, recipe.seed
        )
    if spec.outliers is None:
        return UMObjective(xi) if xi is not None else cross_entropy
    method = outlier_class(spec.outliers.method)
    return method.build(spec.outliers, benchmark, recipe, xi, workers)


def run_finetune(
    ctx: RunContext,
    start: Path,
    spec: FinetuneSpec,
    recipe: Recipe,
    xi: float | None,
    resume: bool = False,
    on_save=None,
    extra: dict | None = None,
) -> Path:
    """One fine-tune with a fixed xi (None for CE) into ``ctx.out``; returns the dense
    ``final`` checkpoint (written by the main process)."""
    benchmark, out, device = ctx.benchmark, ctx.out, ctx.device
    model, meta = load_checkpoint(start, device, benchmark.num_classes, benchmark.image_shape)
    dense_spec = spec_of(meta)
    seed_global(recipe.seed, "init")
    model = with_method_layers(model, spec, recipe.seed)
    data_meta = {"train_data": meta["train_data"]} if "train_data" in meta else {}
    umap = (
        {"keep": spec.keep, "train_weights": spec.train_weights} if spec.trains == "mask" else None
    )
    info = {
        "from": str(start),
        "method": spec.method,
        "xi": xi,
        **({"outliers": asdict(spec.outliers)} if spec.outliers else {}),
        **(extra or {}),
    }
    objective = make_objective(benchmark, spec, recipe, xi, ctx.workers, model.feature_dim)
    if isinstance(objective, WildObjective) and ctx.main:  # which images are ID, shifted, outliers
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "wild.json", objective.mix.composition())
    trainer = Trainer(
        model,
        recipe,
        benchmark.id_train,
        benchmark.id_val,
        out,
        device,
        dense_spec,
        objective=objective,
        progress=ctx.progress,
        on_save=on_save,
        workers=ctx.workers,
        extra_meta={
            "benchmark": benchmark.name,
            "finetune": info,
            **data_meta,
            **({"umap": umap} if umap else {}),
        },
    )
    if resume and resume_point(out) is not None:  # else xi was chosen but no epoch saved
        trainer.resume()
    history = trainer.fit()
    if not trainer.dist.main:
        return out / "checkpoints" / "final"
    dense = model
    if spec.trains == "mask":
        dense = export_dense(model)
        atomic_write_json(out / "sparsity.json", mask_sparsity(model))
    final = out / "checkpoints" / "final"
    metrics = (
        asdict(history[-1])
        if history
        else read_sidecar(out / "checkpoints" / "last").get("metrics")
    )
    save_checkpoint(
        final,
        dense,
        dense_spec,
        recipe=asdict(recipe),
        epoch=recipe.epochs,
        metrics=metrics,
        benchmark=benchmark.name,
        finetune=info,
        **data_meta,
    )
    return final


def _estimate(model, ctx: RunContext, spec: FinetuneSpec, recipe: Recipe) -> XiEstimate:
    return estimate_loss_constraint(
        model,
        ctx.benchmark.id_train,
        spec.mask_fraction,
        recipe.seed,
        spec.n_masks,
        recipe.augment,
        ctx.device,
        reduction=spec.xi_reduction,
        progress=ctx.progress,
        workers=ctx.workers,
    )


def choose_xi(ctx: RunContext, start: Path, spec: FinetuneSpec, recipe: Recipe) -> XiChoice:
    """Resolve ``spec.xi`` to a number, refusing values at which UM would do nothing."""
    if spec.loss != "um":  # CE and ALPA have no constraint
        return XiChoice("none", None)
    bench = ctx.benchmark
    model, _ = load_checkpoint(start, ctx.device, bench.num_classes, bench.image_shape)
    if spec.xi == "validate":
        return validate_xi(ctx, model, start, spec, recipe)
    if spec.xi == "estimate":
        est = _estimate(model, ctx, spec, recipe)
        choice = XiChoice("estimate", est.xi, est.train_loss, est.to_dict())
    else:
        label = "training loss" if ctx.progress else None
        loss = mean_train_loss(
            model,
            bench.id_train,
            recipe.augment,
            recipe.seed,
            ctx.device,
            progress=label,
            workers=ctx.workers,
        )
        choice = XiChoice("given", float(spec.xi), loss)
    if choice.xi <= choice.train_loss:
        raise noop_error(choice.xi, choice.train_loss)
    return choice


def validate_xi(
    ctx: RunContext, model, start: Path, spec: FinetuneSpec, recipe: Recipe
) -> XiChoice:
    """Fine-tune once per candidate xi (multiples of the random-mask estimate, each into
    ``ctx.out/xi_search``) and keep the one with the best mean Energy AUROC on the OOD
    *validation* sets among candidates whose ID validation accuracy stays within
    ``acc_tolerance`` of the starting model's."""
    bench, device = ctx.benchmark, ctx.device
    est = _estimate(model, ctx, spec, recipe)
    kw = {"splits": ("val",), "device": device, "progress": False, "workers": ctx.workers}
    base_acc = evaluate(model, bench, "energy", **kw).accuracy["id_val"]
    candidates = sorted({round(est.xi * f, 6) for f in spec.xi_grid})
    candidates = [x for x in candidates if x > est.train_loss]
    if not candidates:
        raise noop_error(max(est.xi * f for f in spec.xi_grid), est.train_loss)
    grid = []
    for xi in candidates:
        run = ctx.out / "xi_search" / f"xi_{xi:.6g}"
        final = run / "checkpoints" / "final"
        if not final.with_suffix(".json").exists():
            run_finetune(ctx.under(run), start, spec, recipe, xi)
        ctx.barrier()  # the main process writes ``final``; every process reads it
        tuned, _ = load_checkpoint(final, device)
        ev = evaluate(tuned, bench, "energy", **kw)
        grid.append(
            {
                "xi": xi,
                "id_val_acc": ev.accuracy["id_val"],
                "val_auroc": ev.row("energy", split="val")["auroc"],
                "run": str(run),
            }
        )
    best = select_xi(grid, base_acc, spec.acc_tolerance)
    return XiChoice("validate", best["xi"], est.train_loss, est.to_dict(), grid)


def select_xi(grid: list[dict[str, Any]], base_acc: float, acc_tolerance: float) -> dict:
    """The ``--xi validate`` rule: among candidates (dicts with ``xi``, ``id_val_acc`` and
    ``val_auroc``, the mean Energy AUROC on the OOD *validation* sets) whose ID validation
    accuracy is within ``acc_tolerance`` of the starting model's ``base_acc``, the one with the
    best ``val_auroc``; if none is within it, the best of all."""
    eligible = [g for g in grid if g["id_val_acc"] >= base_acc - acc_tolerance] or grid
    return max(eligible, key=lambda g: g["val_auroc"])


def with_start_training_data(benchmark: Benchmark, start: Path) -> Benchmark:
    """``benchmark`` with the ID training set the start checkpoint was trained on."""
    data = TrainingData.from_dict(read_sidecar(start).get("train_data"))
    return replace(benchmark, id_train=data.apply(benchmark.id_train)[0])


def finetune(
    benchmark: Benchmark,
    start: Path,
    spec: FinetuneSpec,
    recipe: Recipe,
    out: Path,
    device: torch.device | str = "auto",
    resume: bool = False,
    progress: bool = True,
    on_save=None,
    recipe_name: str | None = None,
    workers: int = 0,
) -> tuple[Path, XiChoice]:
    """:func:`finetune_run` in a :class:`~unleash_ood.context.RunContext` made here;
    ``workers`` processes decode streamed images in every pass over data."""
    ctx = RunContext.open(benchmark, out, device, progress, workers)
    return finetune_run(ctx, start, spec, recipe, resume, on_save, recipe_name)


def finetune_run(
    ctx: RunContext,
    start: Path,
    spec: FinetuneSpec,
    recipe: Recipe,
    resume: bool = False,
    on_save=None,
    recipe_name: str | None = None,
) -> tuple[Path, XiChoice]:
    """Choose xi (unless resuming), fine-tune, and write ``out/xi.json`` and the final model.

    The model is fine-tuned on the training data it was trained on: a start checkpoint that
    records a subset or label noise (``unleash pretrain --label-noise``) brings it along.

    Under ``torchrun`` every process (``ctx`` has joined the group and taken its own GPU)
    chooses xi the same way (the estimate is deterministic) and fine-tunes its shard; only the
    main process writes, and the others wait for it before reading what it wrote.
    """
    spec.check()
    recipe.check()
    if read_sidecar(start).get("watermark"):
        raise UserError(
            f"{start} is a watermarked model (a frozen model plus an input pattern); "
            f"fine-tune the model it was made from"
        )
    if spec.outliers is not None:
        outlier_class(spec.outliers.method).check_source(spec.outliers)
    ctx = ctx.on(with_start_training_data(ctx.benchmark, start))
    out = ctx.out
    if spec.loss == "alpa":
        if ctx.dist.world > 1:
            raise UserError("--method alpa trains on one process; drop torchrun")
        check_alpa_model(load_checkpoint(start, ctx.device)[0])
    xi_file = out / "xi.json"
    if resume:
        if not xi_file.exists():
            raise UserError(
                f"cannot resume {out}: it has no xi.json (the run never started training); "
                f"drop --resume to start it afresh"
            )
        choice = XiChoice(**json.loads(xi_file.read_text()))
    else:
        check_fresh(out)
        choice = choose_xi(ctx, start, spec, recipe)
        if ctx.main:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(xi_file, asdict(choice))
            atomic_write_json(
                out / "config.json",
                {
                    "command": "finetune",
                    "from": str(start),
                    "spec": asdict(spec),
                    "recipe_name": recipe_name,
                    "recipe": asdict(recipe),
                    "train_size": len(ctx.benchmark.id_train),
                    "processes": ctx.dist.world,
                    "workers": ctx.workers,
                },
            )
    if choice.source == "validate" and not resume:
        chosen = next(Path(g["run"]) for g in choice.grid if g["xi"] == choice.xi)
        if ctx.main:
            shutil.copytree(chosen / "checkpoints", out / "checkpoints")
            if on_save is not None:  # e.g. --track: the chosen run's epochs, as if trained here
                replay_saves(out, on_save, ctx.device, ctx.benchmark, ctx.progress)
        ctx.barrier()
        return out / "checkpoints" / "final", choice
    extra = {"xi_source": choice.source, "recipe_name": recipe_name}
    final = run_finetune(ctx, start, spec, recipe, choice.xi, resume, on_save, extra)
    return final, choice

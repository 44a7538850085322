"""``unleash pretrain``, ``unleash finetune`` (UM, UMAP, the CE control, outlier exposure) and
``unleash track`` (OOD metrics of every saved epoch)."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from unleash_ood.cli.args import (
    add_data_args,
    add_device_args,
    add_own_model_args,
    add_recipe_args,
    add_spec_flags,
    add_workers_arg,
    check_own_model_args,
    count,
    load_own_model,
    model_kwargs,
    positive_int,
    recipe_from,
)
from unleash_ood.errors import UserError
from unleash_ood.rundir import OWN_START, check_writable, is_run_folder
from unleash_ood.specs import (
    DEFAULT_WEIGHT,
    LOSSES,
    METHODS,
    OUTLIER_METHODS,
    RECIPES,
    TRAINS,
    FinetuneSpec,
    OutlierSpec,
    Recipe,
    default_recipe_name,
    finetune_recipe,
    method_named,
)

# Each handler imports what it needs (PyTorch included) when it runs, so that the parser, and
# with it ``unleash --help``, loads nothing heavy.


def _epoch_tracker(args: argparse.Namespace, bench, device):
    """The ``--track`` / ``track`` evaluator of every saved epoch, from the tracking flags."""
    from unleash_ood.scores import parse_scorer_list
    from unleash_ood.track import Tracker

    parse_scorer_list(args.scores)  # fail on a bad name before any heavy work
    return Tracker(
        bench,
        args.scores,
        Path(args.out),
        device,
        args.eval_batch_size,
        args.recompute_bn,
        progress=not args.no_progress,
        workers=args.workers,
    )


def _add_track_args(p: argparse.ArgumentParser) -> None:
    """The flags of what tracking evaluates: scorers, BatchNorm recomputation, batch size."""
    p.add_argument("--scores", default="energy,msp", help="scorers to track, or 'all'")
    p.add_argument(
        "--recompute-bn",
        action="store_true",
        help="recompute BatchNorm statistics on training data before evaluating",
    )
    p.add_argument(
        "--eval-batch-size",
        type=positive_int,
        default=512,
        help="batch size of the OOD evaluations",
    )


def _add_training_run_args(p: argparse.ArgumentParser) -> None:
    """Run directory, resume, tracking, device and data flags of the training commands."""
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--track", action="store_true", help="evaluate OOD metrics at every save")
    _add_track_args(p)
    add_device_args(p)
    add_workers_arg(p)
    add_data_args(p)


def cmd_pretrain(args: argparse.Namespace) -> None:
    """Train a classifier from scratch, checkpointing (and optionally tracking) each epoch."""
    from unleash_ood.context import RunContext
    from unleash_ood.data import load_benchmark
    from unleash_ood.data.noise import TrainingData
    from unleash_ood.train import pretrain_run

    check_writable(Path(args.out))
    recipe = recipe_from(args, model=args.model, model_kwargs=model_kwargs(args.model_arg))
    train_data = TrainingData(args.train_size, args.label_noise, recipe.seed)
    bench = load_benchmark(args.benchmark, args.data_dir)
    ctx = RunContext.open(
        bench, args.out, args.device, progress=not args.no_progress, workers=args.workers
    )
    tracker = _epoch_tracker(args, bench, ctx.device) if args.track else None
    history = pretrain_run(ctx, recipe, args.resume, tracker, train_data)
    if history:
        last = history[-1]
        print(
            f"trained {args.model} to epoch {last.epoch}: train loss {last.train_loss:.4f}, "
            f"val acc {100 * last.val_acc:.2f}; checkpoints in {args.out}/checkpoints/"
        )


def cmd_track(args: argparse.Namespace) -> None:
    """OOD metrics of every saved epoch of a run, and the epoch the validation sets select."""
    from unleash_ood.checkpoint import epoch_checkpoints
    from unleash_ood.data import load_benchmark
    from unleash_ood.device import resolve_device
    from unleash_ood.scores import parse_scorer_list
    from unleash_ood.track import track_run

    parse_scorer_list(args.scores)
    epoch_checkpoints(Path(args.out))  # a run without epochs fails before the data loads
    tracker = _epoch_tracker(
        args, load_benchmark(args.benchmark, args.data_dir), resolve_device(args.device)
    )
    track_run(Path(args.out), tracker)
    sel = json.loads((Path(args.out) / "track_selection.json").read_text())
    print(
        f"tracked {len({r['epoch'] for r in tracker.rows})} epochs into {args.out}/track.csv "
        f"and track.png; validation-selected epoch {sel['selected_epoch']} "
        f"(final {sel.get('final_epoch')})"
    )


OUTLIER_FLAGS = (
    "aux",
    "aux_size",
    "aux_ratio",
    "m_in",
    "m_out",
    "poem_keep",
    "doe_warmup",
    "wild_pi",
)


FINETUNE_FLAGS = (
    "n_masks",
    "mask_fraction",
    "xi_reduction",
    "xi_grid",
    "acc_tolerance",
    "keep",
    "train_weights",
    "alpa_weight",
    "alpa_temperature",
    "alpa_dim",
)


def _finetune_recipe(
    args: argparse.Namespace, method: str, outliers: bool, **fixed
) -> tuple[str, Recipe]:
    """A fine-tune's recipe name and recipe: ``--recipe`` (default: paper, or paper-oe with
    outliers) with the benchmark's augmentation unless the recipe fixes its own, every flag
    given explicitly on top, and ``fixed`` last."""
    name = args.recipe or default_recipe_name(outliers)
    base = finetune_recipe(method, name, benchmark=args.benchmark)
    return name, recipe_from(args, base, **fixed)


def _outlier_spec(args: argparse.Namespace) -> OutlierSpec | None:
    """The outlier-exposure settings of the flags; None without --outliers, whose flags it then
    refuses."""
    if args.outliers is None:
        wild = (args.wild, args.wild_margin, args.wild_shift)
        if any(v is not None for v in wild) or args.wild_pi != OutlierSpec.wild_pi:
            raise UserError("--wild and its flags need --outliers woods or scone")
        return None
    return OutlierSpec(
        method=args.outliers,
        weight=args.aux_weight,
        wild=args.wild,
        wild_margin=args.wild_margin,
        wild_shift=args.wild_shift,
        **{name: getattr(args, name) for name in OUTLIER_FLAGS},
    )


def _method(args: argparse.Namespace) -> str:
    """``--method``, or the method that ``--loss`` x ``--trains`` names."""
    if args.loss is None and args.trains is None:
        return args.method or FinetuneSpec().method
    if args.loss is None or args.trains is None:
        raise UserError("--loss and --trains go together (or use --method alone)")
    if args.method is not None:
        raise UserError("give either --method or --loss with --trains, not both")
    return method_named(args.loss, args.trains)


def _own_start(ctx, model, resume: bool) -> Path:
    """``RUN/start``: your own model (``--model``) as the checkpoint the fine-tune starts from,
    written once; a resumed run keeps the one it started from, if the flags still name it."""
    from unleash_ood.checkpoint import own_model_spec, read_sidecar, save_checkpoint

    start = ctx.out / OWN_START
    if resume and start.with_suffix(".json").is_file():
        if read_sidecar(start).get("source") != json.loads(json.dumps(model.source)):
            raise UserError(
                f"cannot resume {ctx.out}: it started from another model ({start}.json says "
                f"which); rerun with the same --model, --weights and their flags"
            )
    elif ctx.main:
        spec = own_model_spec(model, ctx.benchmark.image_shape[-1])
        save_checkpoint(start, model, spec, benchmark=ctx.benchmark.name, source=model.source)
    ctx.barrier()
    return start


def cmd_finetune(args: argparse.Namespace) -> None:
    """Fine-tune a trained model with UM, UMAP, the CE control or ALPA, optionally with outlier
    exposure."""
    from unleash_ood.checkpoint import read_sidecar
    from unleash_ood.context import RunContext
    from unleash_ood.data import load_benchmark
    from unleash_ood.method.finetune import finetune_run
    from unleash_ood.models.external import own_model_options

    check_writable(Path(args.out))
    check_own_model_args(args, "from_")
    # fail on a missing checkpoint before loading data
    start = read_sidecar(args.from_) if args.from_ else {"architecture": args.model}
    spec = FinetuneSpec(
        method=_method(args),
        xi=args.xi,
        outliers=_outlier_spec(args),
        **{name: getattr(args, name) for name in FINETUNE_FLAGS},
    )
    recipe_name, recipe = _finetune_recipe(
        args,
        spec.method,
        spec.outliers is not None,
        model=start["architecture"],
        model_kwargs=start.get("model_kwargs", {}),
    )
    bench = load_benchmark(args.benchmark, args.data_dir)
    own = load_own_model(args, bench) if args.model else None
    if own is not None:
        recipe = replace(recipe, model_kwargs=own_model_options(own))
    ctx = RunContext.open(
        bench, args.out, args.device, progress=not args.no_progress, workers=args.workers
    )
    start_path = Path(args.from_) if own is None else _own_start(ctx, own, args.resume)
    tracker = _epoch_tracker(args, bench, ctx.device) if args.track else None
    try:
        final, choice = finetune_run(
            ctx, start_path, spec, recipe, args.resume, tracker, recipe_name
        )
    except UserError:
        if own is not None and ctx.main and not is_run_folder(ctx.out):
            for suffix in (".safetensors", ".json"):  # refused before training: leave nothing
                start_path.with_suffix(suffix).unlink(missing_ok=True)
        raise
    xi = "none (no loss constraint)" if choice.xi is None else f"{choice.xi:.4g} ({choice.source})"
    if choice.estimate:
        per_mask = ", ".join(f"{v:.4g}" for v in choice.estimate["per_mask"])
        xi += f"; per mask {per_mask}, {choice.estimate.get('reduction', 'mean')} taken"
    with_oe = f" and {args.outliers} outlier exposure" if args.outliers else ""
    print(
        f"fine-tuned with {spec.method}{with_oe} (recipe {recipe_name}: "
        f"{count(recipe.epochs, 'epoch')}, "
        f"lr {recipe.lr} {recipe.schedule}), xi {xi}; final model: {final}.safetensors"
    )


def _add_outlier_args(p: argparse.ArgumentParser) -> None:
    """The flags of outlier exposure, the wild mix's included."""
    d = OutlierSpec()
    g = p.add_argument_group("outlier exposure")
    g.add_argument(
        "--outliers",
        choices=OUTLIER_METHODS,
        help="add an outlier term: oe, energy (Energy-OE), poem, doe, or woods/scone (from an "
        "unlabeled wild mix, see --wild); the ID term stays "
        "--method's (ce, or the UM loss)",
    )
    add_spec_flags(g, OutlierSpec, OUTLIER_FLAGS[:3], d)
    g.add_argument(
        "--aux-weight",
        type=float,
        help="weight of the outlier term (default: "
        + ", ".join(f"{k} {v}" for k, v in DEFAULT_WEIGHT.items())
        + ")",
    )
    add_spec_flags(g, OutlierSpec, OUTLIER_FLAGS[3:7], d)
    g.add_argument(
        "--wild",
        default=None,
        metavar="SOURCE",
        help="woods/scone: outliers of the unlabeled wild mix, any --aux source (default: "
        "bundled); the mix's composition goes to wild.json",
    )
    add_spec_flags(g, OutlierSpec, OUTLIER_FLAGS[7:], d)
    g.add_argument(
        "--wild-margin",
        type=float,
        default=None,
        help="woods/scone: energy margin eta of the wild term (default: woods 0, scone -10)",
    )
    g.add_argument(
        "--wild-shift",
        type=float,
        default=None,
        help="woods/scone: covariate-shifted ID fraction of the mix (default: woods 0, scone 0.5)",
    )


def add_parsers(sub) -> None:
    """``unleash pretrain``, ``unleash finetune`` and ``unleash track``."""
    p = sub.add_parser("pretrain", help="train a classifier from scratch, checkpointing each epoch")
    p.add_argument("--model", default="cnn", help="architecture (cnn, resnet18, wrn40_2, ...)")
    p.add_argument(
        "--model-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="architecture option, e.g. width=64 (repeatable)",
    )
    add_recipe_args(p, Recipe())
    p.set_defaults(augment=None)  # unset: the benchmark's (specs.benchmark_augmentation)
    p.add_argument(
        "--train-size",
        type=positive_int,
        default=None,
        help="train on a seeded class-stratified subset of this many images (default: all)",
    )
    p.add_argument(
        "--label-noise",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="flip this fraction of the training labels to a random other class (seeded; "
        "the flipped indices go to label_noise.json; test labels are untouched)",
    )
    _add_training_run_args(p)
    p.set_defaults(func=cmd_pretrain)

    d = FinetuneSpec()
    p = sub.add_parser("finetune", help="fine-tune a trained model with UM, UMAP or plain CE")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--from",
        dest="from_",
        metavar="CKPT",
        help="well-trained checkpoint to start from",
    )
    which.add_argument(
        "--model",
        metavar="SOURCE:NAME",
        help="your own classifier instead: torchvision:NAME or timm:NAME, with --weights; "
        "saved as RUN/start, a checkpoint every command takes",
    )
    add_own_model_args(p)
    p.add_argument(
        "--method",
        default=None,
        choices=METHODS,
        help=f"um (loss constraint), umap (learned mask + constraint), ce (control), mask-ce "
        f"(learned mask, plain CE), alpa (CE plus MODE's attention-based local term, for the "
        f"mode scorer); or give --loss and --trains (default: {d.method})",
    )
    p.add_argument(
        "--loss",
        choices=LOSSES,
        default=None,
        help="the ID loss, with --trains instead of --method: ce, um (the loss constraint) "
        "or alpa (with --trains weights)",
    )
    p.add_argument(
        "--trains",
        choices=TRAINS,
        default=None,
        help="what fine-tuning changes, with --loss: the weights, or a learned mask over them",
    )
    p.add_argument(
        "--xi",
        default=d.xi,
        help="loss constraint: estimate (random-mask estimate), validate (grid on "
        "OOD validation data) or a number",
    )
    add_spec_flags(p, FinetuneSpec, FINETUNE_FLAGS, d)
    _add_outlier_args(p)
    p.add_argument(
        "--recipe",
        choices=tuple(RECIPES),
        default=None,
        help="paper: the official 100 epochs at lr 0.1 cosine from the well-trained model "
        "(alpa: MODE's 500 epochs of batch 128); "
        "paper-oe: 10 epochs at lr 0.01 (the default with --outliers); quick: a 3-epoch "
        "demonstration, not the method's result; woods, scone: those authors' 100 epochs of "
        "batch 128, Nesterov, lr 0.001 or 0.0001 halved at 50, 75 and 90%%, no augmentation. "
        "Any recipe flag below overrides its value (default: paper, or paper-oe with "
        "--outliers)",
    )
    add_recipe_args(p, None)
    _add_training_run_args(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("track", help="OOD metrics of every saved epoch of a training run")
    p.add_argument("out", metavar="RUN", help="run directory written by 'unleash pretrain'")
    p.set_defaults(out_name="RUN")  # what messages about the run folder call it
    _add_track_args(p)
    add_workers_arg(p)
    add_data_args(p)
    add_device_args(p)
    p.set_defaults(func=cmd_track)

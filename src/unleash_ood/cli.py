"""The ``unleash`` command: thin sub-commands over the library's API."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from functools import partial
from pathlib import Path

from unleash_ood.errors import UserError
from unleash_ood.heap import reuse_batch_buffers
from unleash_ood.rundir import append_log, check_out, check_writable, holds_files, out_lock
from unleash_ood.specs import (
    DEFAULT_WEIGHT,
    DETECTOR_KINDS,
    LOSSES,
    METHODS,
    OUTLIER_METHODS,
    RECIPES,
    TRAINS,
    WATERMARK_PRESETS,
    WATERMARK_SCORES,
    FinetuneSpec,
    OutlierSpec,
    Recipe,
    WatermarkSpec,
    benchmark_augmentation,
    default_recipe_name,
    finetune_recipe,
    method_named,
    watermark_preset,
)

# Every sub-command's handler imports what it needs (PyTorch included) when it runs, so that
# the parser, and with it ``unleash --help``, loads nothing heavy.


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--benchmark",
        default="fmnist",
        help="benchmark suite (see 'unleash datasets') or a benchmark .json / .yaml file",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="folder holding datasets (also $UNLEASH_DATA; default: system locations)",
    )


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--batch-size", type=positive_int, default=512, help="evaluation batch size")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _config(args: argparse.Namespace) -> dict:
    """The command line as a JSON-able dict, for the run directory's config.json."""
    return {k: v for k, v in vars(args).items() if k != "func"}


def cmd_datasets(args: argparse.Namespace) -> None:
    from unleash_ood.data import DATASETS, SUITES, availability, data_roots
    from unleash_ood.report import markdown_table

    where = availability(args.data_dir)
    print(f"Looked in: {', '.join(str(r) for r in data_roots(args.data_dir))}\n")
    print(
        markdown_table(
            ["dataset", "size", "available", "description"],
            [[n, f"{d.size:,}", where[n] or "no", d.description] for n, d in DATASETS.items()],
        )
    )
    print()
    rows = []
    for name, suite in SUITES.items():
        missing = [d for d in suite.datasets if not where.get(d)]
        rows.append(
            [name, "yes" if not missing else f"missing {', '.join(missing)}", suite.description]
        )
    print(markdown_table(["suite", "available", "description"], rows))


def cmd_evaluate(args: argparse.Namespace) -> None:
    from unleash_ood.data import load_benchmark
    from unleash_ood.device import autocast_dtype, init_distributed, resolve_device
    from unleash_ood.evaluate import evaluate
    from unleash_ood.report import LEGEND, evaluation_markdown, ranking_markdown, write_evaluation
    from unleash_ood.scores import parse_scorer_list
    from unleash_ood.tune import check_grid, parse_grids

    out = Path(args.out)
    check_out(out)
    if args.cache and Path(args.cache).exists() and not Path(args.cache).is_dir():
        raise UserError(f"--cache {args.cache} is a file; give a folder for the cached outputs")
    _check_model_args(args)
    scorers = parse_scorer_list(args.scores)  # fail on a bad name before any heavy work
    if args.grid and not args.tune:
        raise UserError("--grid sets the search of --tune; add --tune")
    if args.cache_fp16 and not args.cache:
        raise UserError("--cache-fp16 sets how --cache stores features; add --cache FOLDER")
    grids = parse_grids(args.grid) if args.grid else None
    for name, grid in (grids or {}).items():
        check_grid(name, grid)
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    ctx, device = init_distributed(resolve_device(args.device))
    autocast_dtype(args.autocast, device)
    bench = load_benchmark(args.benchmark, args.data_dir)
    model, meta, model_name = _evaluation_model(args, bench, device)
    ev = evaluate(
        model,
        bench,
        scorers,
        splits=splits,
        device=device,
        batch_size=args.batch_size,
        cache_dir=args.cache,
        progress=not args.no_progress,
        tune=args.tune,
        grids=grids,
        autocast=args.autocast,
        workers=args.workers,
        fit_samples=args.fit_samples,
        seed=args.seed,
        cache_fp16=args.cache_fp16,
    )
    if not ctx.main:  # under torchrun every process has the metrics; one writes them
        return
    write_evaluation(
        ev,
        out,
        config={
            **_config(args),
            "checkpoint_meta": meta,
            "sizes": bench.sizes(),
            "processes": ctx.world,
        },
        model=model_name,
    )
    if len(ev.scorers()) > 1:
        accuracy = ", ".join(f"{k} accuracy {100 * v:.2f}" for k, v in ev.accuracy.items())
        summary = (
            f"# {ev.benchmark}: scorers by mean AUROC over the OOD test sets\n\n{accuracy}\n\n"
            f"{ranking_markdown(ev)}\n\n{LEGEND}"
        )
    else:
        summary = evaluation_markdown(ev, summary_only=True)
    given = f"--checkpoint {args.checkpoint}" if args.checkpoint else f"--model {args.model}"
    append_log(out, f"unleash evaluate {given}\n{summary}")
    print(summary)
    print(f"Full tables and plots in {out}/")


# Flags that describe a model given by --model (a torchvision/timm architecture), not a checkpoint.
_OWN_MODEL_FLAGS = ("weights", "head", "class_map", "resize", "crop", "gray_to_rgb")


def _check_model_args(args: argparse.Namespace) -> None:
    """--model needs --weights; the own-model flags mean nothing with --checkpoint."""
    if args.model and args.weights is None:
        raise UserError(f"--model {args.model} needs --weights FILE (or --weights none)")
    if args.checkpoint:
        given = [f for f in _OWN_MODEL_FLAGS if getattr(args, f) not in (None, False)]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise UserError(f"{flag} goes with --model; a --checkpoint carries its own settings")
    if args.class_map and not Path(args.class_map).is_file():
        raise UserError(f"--class-map {args.class_map} does not exist; give a JSON file")


def _evaluation_model(args: argparse.Namespace, bench, device) -> tuple:
    """(model, what config.json records about it, its name for plots) from --checkpoint or
    from --model/--weights, checked against the benchmark's classes and images."""
    if args.checkpoint:
        from unleash_ood.checkpoint import load_checkpoint

        model, meta = load_checkpoint(args.checkpoint, device, bench.num_classes, bench.image_shape)
        return model, meta, args.checkpoint
    from unleash_ood.models import Preprocess, load_model

    model = load_model(
        args.model,
        args.weights,
        num_classes=bench.num_classes,
        input_shape=bench.image_shape,
        head=args.head,
        class_map=args.class_map,
        preprocess=Preprocess(args.resize, args.crop, args.gray_to_rgb),
    )
    return model, model.source, args.model


def _model_kwargs(pairs: list[str]) -> dict:
    """``--model-arg width=64`` -> {"width": 64}; values are parsed as JSON where they can be."""
    import json

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise UserError(f"--model-arg expects key=value, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _tracker(args: argparse.Namespace, bench, device):
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


def cmd_track(args: argparse.Namespace) -> None:
    from unleash_ood.checkpoint import epoch_checkpoints
    from unleash_ood.data import load_benchmark
    from unleash_ood.device import resolve_device
    from unleash_ood.scores import parse_scorer_list
    from unleash_ood.track import track_run

    parse_scorer_list(args.scores)
    epoch_checkpoints(Path(args.out))  # a run without epochs fails before the data loads
    tracker = _tracker(
        args, load_benchmark(args.benchmark, args.data_dir), resolve_device(args.device)
    )
    track_run(Path(args.out), tracker)
    sel = json.loads((Path(args.out) / "track_selection.json").read_text())
    print(
        f"tracked {len({r['epoch'] for r in tracker.rows})} epochs into {args.out}/track.csv "
        f"and track.png; validation-selected epoch {sel['selected_epoch']} "
        f"(final {sel.get('final_epoch')})"
    )


def cmd_pretrain(args: argparse.Namespace) -> None:
    from unleash_ood.context import RunContext
    from unleash_ood.data import load_benchmark
    from unleash_ood.data.noise import TrainingData
    from unleash_ood.train import pretrain_run

    check_writable(Path(args.out))
    recipe = _recipe_from(args, model=args.model, model_kwargs=_model_kwargs(args.model_arg))
    train_data = TrainingData(args.train_size, args.label_noise, recipe.seed)
    bench = load_benchmark(args.benchmark, args.data_dir)
    ctx = RunContext.open(
        bench, args.out, args.device, progress=not args.no_progress, workers=args.workers
    )
    tracker = _tracker(args, bench, ctx.device) if args.track else None
    history = pretrain_run(ctx, recipe, args.resume, tracker, train_data)
    if history:
        last = history[-1]
        print(
            f"trained {args.model} to epoch {last.epoch}: train loss {last.train_loss:.4f}, "
            f"val acc {100 * last.val_acc:.2f}; checkpoints in {args.out}/checkpoints/"
        )


_FLAG_TYPES = {"int": int, "float": float, "str": str}


def _add_spec_flags(
    p: argparse.ArgumentParser,
    spec,
    names: Sequence[str],
    defaults,
    recipe: str = "the --recipe's value",
    helps: dict[str, str] | None = None,
) -> None:
    """One ``--field-name`` flag per field of the spec dataclass ``spec`` in ``names``, from the
    field's type and :func:`~unleash_ood.specs.knob` metadata. ``defaults`` is an instance
    whose values the flags default to, or None when a named recipe supplies every value a
    flag does not set (``finetune --recipe``, ``detector train --kind``); the help then names
    that default with ``recipe``. ``helps`` replaces the help of some fields."""
    fields = {f.name: f for f in dataclasses.fields(spec)}
    for name in names:
        f = fields[name]
        default = None if defaults is None else getattr(defaults, name)
        text = (helps or {}).get(name, f.metadata["help"]).replace("%", "%%")
        if defaults is None:
            text += f" (default: {recipe})"
        kwargs = {"default": default, "help": text}
        if f.type == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.type == "tuple[float, ...]":
            kwargs.update(type=number_list, default=",".join(map(str, default)))
        else:
            kwargs.update(type=_FLAG_TYPES[f.type], choices=f.metadata["choices"])
        p.add_argument("--" + name.replace("_", "-"), **kwargs)


def _add_recipe_args(p: argparse.ArgumentParser, defaults, **named) -> None:
    """Optimisation flags shared by the training commands (see :func:`_add_spec_flags`)."""
    _add_spec_flags(p, Recipe, RECIPE_FLAGS, defaults, **named)


RECIPE_FLAGS = (
    "epochs",
    "batch_size",
    "lr",
    "momentum",
    "nesterov",
    "weight_decay",
    "schedule",
    "augment",
    "seed",
    "save_every",
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


def _recipe_from(args: argparse.Namespace, base=None, **fixed):
    """The recipe of the flags: ``base``'s values (default: Recipe() with the benchmark's
    augmentation) with every flag given explicitly (not None) on top, and ``fixed`` last."""
    given = {k: getattr(args, k) for k in RECIPE_FLAGS if getattr(args, k) is not None}
    base = base or Recipe(augment=benchmark_augmentation(args.benchmark))
    return replace(base, **given, **fixed)


def _finetune_recipe(
    args: argparse.Namespace, method: str, outliers: bool, **fixed
) -> tuple[str, Recipe]:
    """A fine-tune's recipe name and recipe: ``--recipe`` (default: paper, or paper-oe with
    outliers) with the benchmark's augmentation unless the recipe fixes its own, every flag
    given explicitly on top, and ``fixed`` last."""
    name = args.recipe or default_recipe_name(outliers)
    base = finetune_recipe(method, name, benchmark=args.benchmark)
    return name, _recipe_from(args, base, **fixed)


def _outlier_spec(args: argparse.Namespace) -> OutlierSpec | None:
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


def cmd_finetune(args: argparse.Namespace) -> None:
    from unleash_ood.checkpoint import read_sidecar
    from unleash_ood.context import RunContext
    from unleash_ood.data import load_benchmark
    from unleash_ood.method.finetune import finetune_run

    check_writable(Path(args.out))
    start = read_sidecar(args.from_)  # fail on a missing checkpoint before loading data
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
    ctx = RunContext.open(
        bench, args.out, args.device, progress=not args.no_progress, workers=args.workers
    )
    tracker = _tracker(args, bench, ctx.device) if args.track else None
    final, choice = finetune_run(
        ctx, Path(args.from_), spec, recipe, args.resume, tracker, recipe_name
    )
    xi = "none (no loss constraint)" if choice.xi is None else f"{choice.xi:.4g} ({choice.source})"
    if choice.estimate:
        per_mask = ", ".join(f"{v:.4g}" for v in choice.estimate["per_mask"])
        xi += f"; per mask {per_mask}, {choice.estimate.get('reduction', 'mean')} taken"
    with_oe = f" and {args.outliers} outlier exposure" if args.outliers else ""
    print(
        f"fine-tuned with {spec.method}{with_oe} (recipe {recipe_name}: {recipe.epochs} epochs, "
        f"lr {recipe.lr} {recipe.schedule}), xi {xi}; final model: {final}.safetensors"
    )


def cmd_watermark(args: argparse.Namespace) -> None:
    from unleash_ood.checkpoint import read_sidecar
    from unleash_ood.data import load_benchmark
    from unleash_ood.device import resolve_device
    from unleash_ood.method.watermark import check_watermark_out, run_watermark

    out = Path(args.out)
    check_watermark_out(out, args.resume)
    read_sidecar(args.from_)  # fail on a missing checkpoint before loading data
    spec = WatermarkSpec(
        score=args.score,
        preset=args.preset or watermark_preset(args.benchmark),
        epochs=args.epochs,
        batch_size=args.batch_size,
        alpha=args.alpha,
        sigma=args.sigma,
        rho=args.rho,
        beta=args.beta,
        t_in=args.t_in,
        t_out=args.t_out,
        seed=args.seed,
    )
    device = resolve_device(args.device)
    bench = load_benchmark(args.benchmark, args.data_dir)
    final = run_watermark(
        bench, args.from_, spec, out, device, progress=not args.no_progress, resume=args.resume
    )
    print(
        f"learned a {spec.score} watermark in {spec.epochs} epochs; watermarked model: "
        f"{final}.safetensors (evaluate it with 'unleash evaluate --checkpoint {final}'); "
        f"pattern in {out}/watermark.safetensors and watermark.png"
    )


def _add_watermark_parser(sub) -> None:
    d = WatermarkSpec()
    p = sub.add_parser(
        "watermark", help="learn an input pattern that makes a frozen model a better detector"
    )
    p.add_argument("--from", dest="from_", required=True, metavar="CKPT", help="frozen model")
    p.add_argument(
        "--score", choices=WATERMARK_SCORES, default=d.score, help="the score the pattern serves"
    )
    p.add_argument("--epochs", type=positive_int, default=d.epochs, help="passes over the data")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="ID per step")
    p.add_argument("--alpha", type=float, default=d.alpha, help="signed step size")
    p.add_argument(
        "--preset",
        choices=tuple(WATERMARK_PRESETS),
        default=None,
        help="whose official settings fill the flags below (default: cifar100 for "
        "--benchmark cifar100, else cifar10)",
    )
    for name, text in (
        ("sigma", "std of the Gaussian noise the pattern learns to reject"),
        ("rho", "radius of the sharpness-aware perturbation"),
        ("beta", "weight of the outlier term"),
        ("t_in", "energy: scale of the ID penalty"),
        ("t_out", "energy: scale of the noise penalty"),
    ):
        per_score = "; ".join(
            f"{preset}: " + ", ".join(f"{k} {v[name]}" for k, v in scores.items())
            for preset, scores in WATERMARK_PRESETS.items()
        )
        p.add_argument(
            f"--{name.replace('_', '-')}", type=float, default=None, help=f"{text} ({per_score})"
        )
    p.add_argument("--seed", type=int, default=d.seed, help="seed of shuffling, flips and noise")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--no-progress", action="store_true", help="no progress lines")
    _add_data_args(p)
    p.set_defaults(func=cmd_watermark)


def cmd_atypical(args: argparse.Namespace) -> None:
    import csv
    import io

    from unleash_ood.checkpoint import atomic_write_bytes, atomic_write_json, load_checkpoint
    from unleash_ood.data import load_benchmark
    from unleash_ood.data.noise import TrainingData
    from unleash_ood.device import resolve_device
    from unleash_ood.method.atypical import atypicality, plot_grid, precision_at_k, ranking_rows

    out = Path(args.out)
    check_out(out)
    device = resolve_device(args.device)
    bench = load_benchmark(args.benchmark, args.data_dir)
    model, meta = load_checkpoint(args.from_, device, bench.num_classes, bench.image_shape)
    # The samples the model was trained on, with the labels it was trained on (a noisy run's).
    train, flipped = TrainingData.from_dict(meta.get("train_data")).apply(bench.id_train)
    a = atypicality(
        model,
        train,
        args.mask_fraction,
        args.n_masks,
        args.seed,
        device,
        progress=not args.no_progress,
        workers=args.workers,
    )
    rows = ranking_rows(a, train.labels.numpy())
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", {"command": "atypical", **_config(args)})
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["rank", "index", "label", "prediction", "loss", "masked_loss", "delta"])
    w.writerows(rows)
    atomic_write_bytes(out / "atypical.csv", buf.getvalue().encode())
    plot_grid(a, train, bench.class_names, out / "atypical.png")
    lines = [
        f"ranked {len(rows):,} training samples into {out}/atypical.csv and atypical.png; "
        f"mean loss {a.loss.mean():.4f} -> {a.masked_loss.mean():.4f} under "
        f"{args.n_masks} random masks of {100 * args.mask_fraction:.1f} %"
    ]
    if len(flipped):
        found = precision_at_k(a, flipped)
        atomic_write_json(out / "label_noise_precision.json", found)
        cells = ", ".join(f"{k} {v:.3f}" for k, v in found.items() if k.startswith("precision"))
        lines.append(
            f"flipped labels among the most atypical: {cells} (chance {found['chance']:.3f}); "
            f"in {out}/label_noise_precision.json"
        )
    append_log(out, "\n".join(lines))
    print("\n".join(lines))


def cmd_demo(args: argparse.Namespace) -> None:
    import time

    from unleash_ood.checkpoint import atomic_write_json
    from unleash_ood.data import data_roots
    from unleash_ood.demo import DemoPlan, run_demo
    from unleash_ood.device import resolve_device

    out = Path(args.out or time.strftime("unleash-demo-%Y%m%d-%H%M%S"))
    if holds_files(out):
        raise UserError(f"{out} is not empty; choose another --out")
    if args.quick and args.train:
        raise UserError("--quick already retrains (with the quick recipe); pass one of the two")
    plan = DemoPlan.quick() if args.quick else DemoPlan(train=args.train)
    device = resolve_device(args.device)
    data_roots(args.data_dir)  # a missing --data-dir fails before the run folder is made
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", {"command": "demo", **_config(args)})
    result = run_demo(out, args.data_dir, device, plan, progress=not args.no_progress)
    print((out / "demo.md").read_text())
    print(f"finished in {result['seconds'] / 60:.1f} min; tables and plots in {out}/")


def _add_training_run_args(p: argparse.ArgumentParser) -> None:
    """Run directory, resume, tracking, device and data flags of the training commands."""
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--track", action="store_true", help="evaluate OOD metrics at every save")
    _add_track_args(p)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_workers_arg(p)
    _add_data_args(p)


def _add_workers_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workers",
        type=non_negative_int,
        default=0,
        help="processes decoding streamed image files (benchmark files, imagenet-openood) in "
        "every pass over data: training, validation, xi's estimate, outlier batches, tracking "
        "(default: 0, none)",
    )


def _add_outlier_args(p: argparse.ArgumentParser) -> None:
    d = OutlierSpec()
    g = p.add_argument_group("outlier exposure")
    g.add_argument(
        "--outliers",
        choices=OUTLIER_METHODS,
        help="add an outlier term: oe, energy (Energy-OE), poem, doe, or woods/scone (from an "
        "unlabeled wild mix, see --wild); the ID term stays "
        "--method's (ce, or the UM loss)",
    )
    _add_spec_flags(g, OutlierSpec, OUTLIER_FLAGS[:3], d)
    g.add_argument(
        "--aux-weight",
        type=float,
        help="weight of the outlier term (default: "
        + ", ".join(f"{k} {v}" for k, v in DEFAULT_WEIGHT.items())
        + ")",
    )
    _add_spec_flags(g, OutlierSpec, OUTLIER_FLAGS[3:7], d)
    g.add_argument(
        "--wild",
        default=None,
        metavar="SOURCE",
        help="woods/scone: outliers of the unlabeled wild mix, any --aux source (default: "
        "bundled); the mix's composition goes to wild.json",
    )
    _add_spec_flags(g, OutlierSpec, OUTLIER_FLAGS[7:], d)
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


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line that says where help is (not the usage block)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see '{self.prog} --help'\n")


def non_negative_int(text: str) -> int:
    """An argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def fraction(text: str) -> float:
    """An argparse type: a number strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}")
    return value


def number_list(text: str) -> tuple[float, ...]:
    """An argparse type: comma-separated numbers."""
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        msg = f"expected numbers separated by commas, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where there is none to show (None, off, empty)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        if default is None or default is False or default == [] or default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def cmd_detector_train(args: argparse.Namespace) -> None:
    from unleash_ood.data import load_benchmark
    from unleash_ood.device import resolve_device
    from unleash_ood.generative.trainer import detector_recipe, train_detector

    recipe = detector_recipe(
        args.kind,
        model_kwargs=_model_kwargs(args.model_arg) or None,
        **{k: getattr(args, k) for k in (*RECIPE_FLAGS, "beta2", "grad_clip")},
    )
    finetune = {"finetune_epochs": args.finetune_epochs, "finetune_lr": args.finetune_lr}
    if args.kind != "mim" and any(v is not None for v in finetune.values()):
        raise UserError("--finetune-epochs and --finetune-lr set stage 2 of --kind mim only")
    device = resolve_device(args.device)
    bench = load_benchmark(args.benchmark, args.data_dir)
    if args.kind == "mim":
        _train_mood(args, bench, recipe, device, finetune)
        return
    history = train_detector(
        bench, recipe, Path(args.out), device, resume=args.resume, progress=not args.no_progress
    )
    if history:
        last = history[-1]
        print(
            f"trained a {args.kind} detector to epoch {last.epoch}: train loss "
            f"{last.train_loss:.3f}, val loss {last.val_loss:.3f}; checkpoints in "
            f"{args.out}/checkpoints/"
        )


def _train_mood(args: argparse.Namespace, bench, recipe, device, finetune: dict) -> None:
    """``detector train --kind mim``: both stages of MOOD into ``--out``."""
    from unleash_ood.generative.mood import FINETUNE_DIR, train_mood

    out = Path(args.out)
    _, tuned = train_mood(bench, recipe, out, device, args.resume, not args.no_progress, **finetune)
    if tuned:
        last = tuned[-1]
        print(
            f"pretrained and fine-tuned a ViT (MOOD) to epoch {last.epoch}: val acc "
            f"{100 * last.val_acc:.2f}; classifier in {out / FINETUNE_DIR / 'checkpoints'}/"
        )


def _evaluate_mood(args: argparse.Namespace) -> None:
    """``detector evaluate`` of a MOOD run: its fine-tuned classifier and classifier scorers."""
    from unleash_ood.checkpoint import read_sidecar
    from unleash_ood.data import load_benchmark
    from unleash_ood.device import resolve_device
    from unleash_ood.generative.mood import DEFAULT_SCORES, evaluate_mood, finetuned_checkpoint
    from unleash_ood.report import evaluation_markdown, write_evaluation
    from unleash_ood.scores import parse_scorer_list

    scorers = parse_scorer_list(args.scores or DEFAULT_SCORES)  # bad names: before any work
    classifier = finetuned_checkpoint(args.from_)
    meta = read_sidecar(classifier)
    bench = load_benchmark(args.benchmark or meta.get("benchmark", "fmnist"), args.data_dir)
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    device = resolve_device(args.device)
    ev, meta = evaluate_mood(
        classifier, bench, scorers, splits, device, args.batch_size, not args.no_progress
    )
    out = Path(args.out)
    write_evaluation(
        ev,
        out,
        config={**_config(args), "checkpoint_meta": meta, "sizes": bench.sizes()},
        model=str(classifier),
    )
    print(evaluation_markdown(ev, summary_only=True))
    print(f"Full tables and histograms in {out}/")


def cmd_detector_evaluate(args: argparse.Namespace) -> None:
    from unleash_ood.checkpoint import read_sidecar
    from unleash_ood.data import load_benchmark
    from unleash_ood.device import resolve_device
    from unleash_ood.generative import parse_detector_scores
    from unleash_ood.generative.evaluate import evaluate_detector
    from unleash_ood.generative.mood import is_mood
    from unleash_ood.generative.trainer import checkpoint_of, load_detector
    from unleash_ood.report import evaluation_markdown, write_evaluation

    sidecar = read_sidecar(checkpoint_of(args.from_))
    if is_mood(sidecar):
        _evaluate_mood(args)
        return
    kind = sidecar["architecture"]
    scores = parse_detector_scores(args.scores or "all", kind)  # bad names: before any work
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    device = resolve_device(args.device)
    model, meta = load_detector(args.from_, device)
    if (args.scores or "all") == "all":  # the kind's scores this model can give
        scores = [s for s in scores if s.applies_to(model)]
    bench = load_benchmark(args.benchmark or meta.get("benchmark", "fmnist"), args.data_dir)
    if bench.image_shape != (meta["in_channels"], meta["input_size"], meta["input_size"]):
        raise UserError(
            f"the detector takes {meta['in_channels']}x{meta['input_size']}x"
            f"{meta['input_size']} images but {bench.name} has "
            f"{'x'.join(map(str, bench.image_shape))}; use a detector trained on it"
        )
    ev = evaluate_detector(
        model, bench, scores, splits, device, args.batch_size, progress=not args.no_progress
    )
    out = Path(args.out)
    params = {s.name: s.params() for s in scores}
    write_evaluation(
        ev,
        out,
        config={**_config(args), "checkpoint_meta": meta, "scores": params, "sizes": bench.sizes()},
    )
    print(evaluation_markdown(ev, summary_only=True))
    print(f"Full tables and histograms in {out}/")


def _add_detector_commands(sub) -> None:
    """``unleash detector train|evaluate``: OOD detectors that need no classifier."""
    det = sub.add_parser("detector", help="generative OOD detectors that need no classifier")
    dsub = det.add_subparsers(dest="detector_command", required=True)
    dsub.add_parser = partial(dsub.add_parser, formatter_class=_HelpFormatter)

    p = dsub.add_parser("train", help="train a generative detector on ID images alone")
    p.add_argument("--kind", required=True, choices=DETECTOR_KINDS, help="detector model to train")
    p.add_argument(
        "--model-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model option, e.g. width=16 or lossy=none (repeatable)",
    )
    _add_recipe_args(
        p,
        None,
        recipe="the --kind's own recipe",
        helps={"augment": "none, flip, crop, crop+flip"},
    )
    p.add_argument("--beta2", type=float, default=None, help="Adam's beta2 (--momentum: beta1)")
    p.add_argument("--grad-clip", type=float, default=None, help="gradient-norm clip, 0 = off")
    p.add_argument(
        "--finetune-epochs",
        type=positive_int,
        default=None,
        help="--kind mim: epochs of stage 2, fine-tuning on the ID labels (default 30)",
    )
    p.add_argument(
        "--finetune-lr",
        type=float,
        default=None,
        help="--kind mim: Adam learning rate of stage 2 (default 0.001)",
    )
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_data_args(p)
    p.set_defaults(func=cmd_detector_train)

    p = dsub.add_parser("evaluate", help="score ID and OOD sets with a trained detector")
    p.add_argument(
        "--from", dest="from_", required=True, metavar="RUN", help="detector run or checkpoint"
    )
    p.add_argument(
        "--scores",
        default=None,
        help="comma-separated scores with optional parameters (error_reduction:lam=2), or all "
        "(the default: every score the detector can give); for a mim run classifier scorers, "
        "default ssd (MOOD's score)",
    )
    p.add_argument("--splits", default="test", help="OOD splits to report: test, val or val,test")
    p.add_argument("--out", required=True, help="run directory for tables and plots")
    p.add_argument("--benchmark", default=None, help="benchmark (default: the detector's own)")
    p.add_argument("--data-dir", default=None, help="folder holding datasets")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--batch-size", type=int, default=256, help="scoring batch size")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_detector_evaluate)


def _add_own_model_args(p: argparse.ArgumentParser) -> None:
    """Flags of ``evaluate --model``: weights, head, class map and the model's preprocessing."""
    p.add_argument(
        "--weights",
        default=None,
        help="with --model: a .safetensors or .pth state dict, or none for random weights",
    )
    p.add_argument(
        "--head", default=None, help="with --model: the final nn.Linear (default: found)"
    )
    p.add_argument(
        "--class-map",
        default=None,
        metavar="JSON",
        help='with --model: {"<benchmark class>": <model output>, ...} for a head of other '
        "classes (e.g. ImageNet's 1000)",
    )
    p.add_argument(
        "--resize",
        type=positive_int,
        default=None,
        help="with --model: resize images so their shorter side has this many pixels",
    )
    p.add_argument(
        "--crop", type=positive_int, default=None, help="with --model: then centre-crop this size"
    )
    p.add_argument(
        "--gray-to-rgb",
        action="store_true",
        help="with --model: repeat a grey image's channel for an RGB model",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="unleash",
        description="OOD detection for image classifiers (Unleashing Mask).",
        formatter_class=_HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser = partial(sub.add_parser, formatter_class=_HelpFormatter)

    p = sub.add_parser("datasets", help="list datasets and suites, and which are available here")
    p.add_argument("--data-dir", default=None, help="folder holding datasets")
    p.set_defaults(func=cmd_datasets)

    p = sub.add_parser(
        "evaluate", help="score a checkpoint or your own model on a benchmark with post-hoc scorers"
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="checkpoint (.safetensors + .json sidecar)")
    which.add_argument(
        "--model",
        metavar="SOURCE:NAME",
        help="your own classifier instead: torchvision:NAME or timm:NAME, with --weights",
    )
    _add_own_model_args(p)
    p.add_argument("--scores", default="msp,energy", help="comma-separated scorer names, or 'all'")
    p.add_argument("--splits", default="test", help="OOD splits to report: test, val or val,test")
    p.add_argument("--out", required=True, help="run directory for tables and plots")
    p.add_argument("--cache", default=None, help="folder to cache features/logits between runs")
    p.add_argument(
        "--tune",
        action="store_true",
        help="choose scorer hyperparameters on the OOD validation sets (never a test set)",
    )
    p.add_argument(
        "--grid",
        default=None,
        help="with --tune, replace a scorer's search grid, e.g. knn:k=10/50/100",
    )
    p.add_argument(
        "--cache-fp16", action="store_true", help="store cached features in float16 (half size)"
    )
    p.add_argument(
        "--workers",
        type=non_negative_int,
        default=0,
        help="processes decoding streamed image files (benchmark files, imagenet-openood)",
    )
    p.add_argument(
        "--fit-samples",
        type=positive_int,
        default=None,
        metavar="N",
        help="fit scorers on a class-stratified sample of N ID training images (default: all)",
    )
    p.add_argument(
        "--seed", type=non_negative_int, default=0, help="seed of the --fit-samples draw"
    )
    _add_data_args(p)
    _add_run_args(p)
    p.add_argument(
        "--autocast",
        choices=("none", "bf16", "fp16"),
        default="none",
        help="mixed precision of the forward pass: bf16, fp16 (GPU only) or none (float32)",
    )
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("pretrain", help="train a classifier from scratch, checkpointing each epoch")
    p.add_argument("--model", default="cnn", help="architecture (cnn, resnet18, wrn40_2, ...)")
    p.add_argument(
        "--model-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="architecture option, e.g. width=64 (repeatable)",
    )
    _add_recipe_args(p, Recipe())
    p.set_defaults(augment=None)  # unset: the benchmark's (specs.benchmark_augmentation)
    p.add_argument(
        "--train-size",
        type=int,
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
    p.add_argument(
        "--from",
        dest="from_",
        required=True,
        metavar="CKPT",
        help="well-trained checkpoint to start from",
    )
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
    _add_spec_flags(p, FinetuneSpec, FINETUNE_FLAGS, d)
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
    _add_recipe_args(p, None)
    _add_training_run_args(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("atypical", help="rank training samples by how atypical they are")
    p.add_argument(
        "--from",
        dest="from_",
        required=True,
        metavar="CKPT",
        help="checkpoint to analyse (a path, or a shipped model's name such as fmnist_cnn)",
    )
    p.add_argument("--out", required=True, help="folder for atypical.csv and atypical.png")
    p.add_argument("--n-masks", type=positive_int, default=5, help="random masks averaged")
    p.add_argument(
        "--mask-fraction", type=fraction, default=0.035, help="fraction of weights zeroed per layer"
    )
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the random masks")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_workers_arg(p)
    _add_data_args(p)
    p.set_defaults(func=cmd_atypical)

    p = sub.add_parser("demo", help="UM, UMAP and the CE control on the embedded benchmark")
    p.add_argument("--out", default=None, help="run directory (default: unleash-demo-<time>)")
    p.add_argument(
        "--train",
        action="store_true",
        help="remake the CE, UM and UMAP fine-tunes with the paper recipe instead of loading "
        "the shipped ones (hours on a CPU)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="remake them with the 3-epoch quick recipe on 10,000 images: the mechanics in a "
        "few minutes, not the method's result",
    )
    p.add_argument("--data-dir", default=None, help="folder holding Fashion-MNIST")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("track", help="OOD metrics of every saved epoch of a training run")
    p.add_argument("out", metavar="RUN", help="run directory written by 'unleash pretrain'")
    p.set_defaults(out_name="RUN")  # what messages about the run folder call it
    _add_track_args(p)
    _add_workers_arg(p)
    _add_data_args(p)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_track)

    _add_watermark_parser(sub)
    _add_detector_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    reuse_batch_buffers()
    try:
        with _run_folder_lock(args):
            args.func(args)
    except UserError as e:
        print(f"unleash {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = "; rerun it with --resume to continue from the last saved epoch"
        hint = hint if _resumable(args) else ""
        print(f"unleash {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    finally:
        _leave_process_group()
    return 0


def _run_folder_lock(args: argparse.Namespace) -> AbstractContextManager:
    """The lock on ``--out`` for commands that write one; under torchrun rank 0 holds it."""
    out = getattr(args, "out", None)
    if out is None or os.environ.get("RANK", "0") != "0":
        return nullcontext()
    return out_lock(Path(out), getattr(args, "out_name", "--out"))


def _resumable(args: argparse.Namespace) -> bool:
    """Whether the interrupted command saves epochs that ``--resume`` continues from."""
    return hasattr(args, "resume") and getattr(args, "out", None) is not None


def _leave_process_group() -> None:
    """Under torchrun, shut the process group down before exit: gloo's threads still running
    at interpreter shutdown abort the process (``terminate called without an active
    exception``), failing a run that had finished."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())

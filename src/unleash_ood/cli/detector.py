"""``unleash detector train|evaluate``: generative OOD detectors that need no classifier."""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

from unleash_ood.cli.args import (
    RECIPE_FLAGS,
    HelpFormatter,
    add_data_args,
    add_device_args,
    add_recipe_args,
    model_kwargs,
    positive_int,
    run_config,
)
from unleash_ood.errors import UserError
from unleash_ood.specs import DETECTOR_KINDS

# Each handler imports what it needs (PyTorch included) when it runs, so that the parser, and
# with it ``unleash --help``, loads nothing heavy.


def cmd_detector_train(args: argparse.Namespace) -> None:
    """Train a generative detector on ID images alone with its kind's recipe and any flags on
    top."""
    from unleash_ood.data import load_benchmark
    from unleash_ood.device import resolve_device
    from unleash_ood.generative.trainer import detector_recipe, train_detector

    recipe = detector_recipe(
        args.kind,
        model_kwargs=model_kwargs(args.model_arg) or None,
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
            f"trained the {args.kind} detector to epoch {last.epoch}: train loss "
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
    bench = load_benchmark(_benchmark_of(args, meta), args.data_dir)
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    device = resolve_device(args.device)
    ev, meta = evaluate_mood(
        classifier, bench, scorers, splits, device, args.batch_size, not args.no_progress
    )
    out = Path(args.out)
    write_evaluation(
        ev,
        out,
        config={**run_config(args), "checkpoint_meta": meta, "sizes": bench.sizes()},
        model=str(classifier),
    )
    print(evaluation_markdown(ev, summary_only=True))
    print(f"Full tables and histograms in {out}/")


def _benchmark_of(args: argparse.Namespace, meta: dict) -> str:
    """``--benchmark``, or the suite the detector was trained on, which its sidecar names; a
    benchmark file is recorded by its name only, so it must be given again."""
    from unleash_ood.data import SUITES

    if args.benchmark:
        return args.benchmark
    name = meta.get("benchmark", "fmnist")
    if name not in SUITES:
        raise UserError(
            f"{args.from_} was trained on benchmark {name!r}, which is no built-in suite; "
            f"pass its .json / .yaml file with --benchmark"
        )
    return name


def cmd_detector_evaluate(args: argparse.Namespace) -> None:
    """Score ID and OOD sets with a trained detector (or a MOOD run's classifier)."""
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
    benchmark = _benchmark_of(args, sidecar)
    device = resolve_device(args.device)
    model, meta = load_detector(args.from_, device)
    if (args.scores or "all") == "all":  # the kind's scores this model can give
        scores = [s for s in scores if s.applies_to(model)]
    bench = load_benchmark(benchmark, args.data_dir)
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
        config={
            **run_config(args),
            "checkpoint_meta": meta,
            "scores": params,
            "sizes": bench.sizes(),
        },
    )
    print(evaluation_markdown(ev, summary_only=True))
    print(f"Full tables and histograms in {out}/")


def add_parsers(sub) -> None:
    """``unleash detector train|evaluate``: OOD detectors that need no classifier."""
    det = sub.add_parser("detector", help="generative OOD detectors that need no classifier")
    dsub = det.add_subparsers(dest="detector_command", required=True)
    dsub.add_parser = partial(dsub.add_parser, formatter_class=HelpFormatter)

    p = dsub.add_parser("train", help="train a generative detector on ID images alone")
    p.add_argument("--kind", required=True, choices=DETECTOR_KINDS, help="detector model to train")
    p.add_argument(
        "--model-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model option, e.g. width=16 or lossy=none (repeatable)",
    )
    add_recipe_args(
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
    add_device_args(p)
    add_data_args(p)
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
    add_device_args(p)
    p.add_argument("--batch-size", type=positive_int, default=256, help="scoring batch size")
    p.set_defaults(func=cmd_detector_evaluate)

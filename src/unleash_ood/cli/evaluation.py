"""``unleash datasets`` and ``unleash evaluate``: what data is here, and post-hoc scoring of a
checkpoint or of a user's own torchvision / timm classifier."""

from __future__ import annotations

import argparse
from pathlib import Path

from unleash_ood.cli.args import (
    add_data_args,
    add_own_model_args,
    add_run_args,
    check_own_model_args,
    load_own_model,
    non_negative_int,
    positive_int,
    run_config,
)
from unleash_ood.errors import UserError
from unleash_ood.rundir import append_log, check_out, check_writable

# Each handler imports what it needs (PyTorch included) when it runs, so that the parser, and
# with it ``unleash --help``, loads nothing heavy.


def cmd_datasets(args: argparse.Namespace) -> None:
    """List datasets and suites, and where each was found."""
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
    """Score a checkpoint or the user's own classifier with post-hoc scorers, one forward pass
    per dataset."""
    from unleash_ood.data import load_benchmark
    from unleash_ood.device import autocast_dtype, init_distributed, resolve_device
    from unleash_ood.evaluate import evaluate
    from unleash_ood.report import LEGEND, evaluation_markdown, ranking_markdown, write_evaluation
    from unleash_ood.scores import parse_scorer_list
    from unleash_ood.tune import check_grid, parse_grids

    out = Path(args.out)
    check_out(out)
    if args.cache:
        check_writable(Path(args.cache), "--cache")
    check_own_model_args(args, "checkpoint")
    scored = {s.name for s in parse_scorer_list(args.scores)}  # fail before any heavy work
    if args.grid and not args.tune:
        raise UserError("--grid sets the search of --tune; add --tune")
    if args.cache_fp16 and not args.cache:
        raise UserError("--cache-fp16 sets how --cache stores features; add --cache FOLDER")
    grids = parse_grids(args.grid) if args.grid else None
    for name, grid in (grids or {}).items():
        check_grid(name, grid)
        if name not in scored:
            raise UserError(
                f"--grid searches {name}, which --scores does not list; add it to --scores "
                "or drop its grid"
            )
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    ctx, device = init_distributed(resolve_device(args.device))
    autocast_dtype(args.autocast, device)
    bench = load_benchmark(args.benchmark, args.data_dir)
    model, meta, model_name = _evaluation_model(args, bench, device)
    ev = evaluate(
        model,
        bench,
        args.scores,  # checked above; "all" passed as such leaves out what cannot run
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
            **run_config(args),
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


def _evaluation_model(args: argparse.Namespace, bench, device) -> tuple:
    """(model, what config.json records about it, its name for plots) from --checkpoint or
    from --model/--weights, checked against the benchmark's classes and images."""
    if args.checkpoint:
        from unleash_ood.checkpoint import load_checkpoint

        model, meta = load_checkpoint(args.checkpoint, device, bench.num_classes, bench.image_shape)
        return model, meta, args.checkpoint
    model = load_own_model(args, bench)
    return model, model.source, args.model


def add_parsers(sub) -> None:
    """``unleash datasets`` and ``unleash evaluate``."""
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
    add_own_model_args(p)
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
    add_data_args(p)
    add_run_args(p)
    p.add_argument(
        "--autocast",
        choices=("none", "bf16", "fp16"),
        default="none",
        help="mixed precision of the forward pass: bf16, fp16 (GPU only) or none (float32)",
    )
    p.set_defaults(func=cmd_evaluate)

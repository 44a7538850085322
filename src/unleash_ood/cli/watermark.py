"""``unleash watermark``: a learned input pattern that makes a frozen model a better detector."""

from __future__ import annotations

import argparse
from pathlib import Path

from unleash_ood.cli.args import add_data_args, add_device_args, count, positive_int
from unleash_ood.specs import WATERMARK_PRESETS, WATERMARK_SCORES, WatermarkSpec, watermark_preset

# Each handler imports what it needs (PyTorch included) when it runs, so that the parser, and
# with it ``unleash --help``, loads nothing heavy.


def cmd_watermark(args: argparse.Namespace) -> None:
    """Learn a watermark for a frozen model and save the model that applies it."""
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
        f"learned a {spec.score} watermark in {count(spec.epochs, 'epoch')}; watermarked model: "
        f"{final}.safetensors (evaluate it with 'unleash evaluate --checkpoint {final}'); "
        f"pattern in {out}/watermark.safetensors and watermark.png"
    )


def add_parsers(sub) -> None:
    """``unleash watermark``."""
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
    add_device_args(p, progress="no progress lines")
    add_data_args(p)
    p.set_defaults(func=cmd_watermark)

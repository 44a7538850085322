"""``unleash atypical``: training samples ranked by how much random masks raise their loss."""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

from unleash_ood.cli.args import (
    add_data_args,
    add_device_args,
    add_workers_arg,
    fraction,
    non_negative_int,
    positive_int,
    run_config,
)
from unleash_ood.rundir import append_log, check_out

# Each handler imports what it needs (PyTorch included) when it runs, so that the parser, and
# with it ``unleash --help``, loads nothing heavy.


def cmd_atypical(args: argparse.Namespace) -> None:
    """Rank the training samples a checkpoint was trained on by the loss random masks add (the
    paper's atypicality); with label noise, how many flipped labels are among the top."""
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
    atomic_write_json(out / "config.json", {"command": "atypical", **run_config(args)})
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


def add_parsers(sub) -> None:
    """``unleash atypical``."""
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
    add_device_args(p)
    add_workers_arg(p)
    add_data_args(p)
    p.set_defaults(func=cmd_atypical)

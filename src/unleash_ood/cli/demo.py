"""``unleash demo``: UM, UMAP and the CE control on the embedded benchmark."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from unleash_ood.cli.args import add_device_args, run_config
from unleash_ood.errors import UserError
from unleash_ood.rundir import holds_files

# Each handler imports what it needs (PyTorch included) when it runs, so that the parser, and
# with it ``unleash --help``, loads nothing heavy.


def cmd_demo(args: argparse.Namespace) -> None:
    """The shipped model beside its CE / UM / UMAP fine-tunes, then a short live UM fine-
    tune."""
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
    atomic_write_json(out / "config.json", {"command": "demo", **run_config(args)})
    result = run_demo(out, args.data_dir, device, plan, progress=not args.no_progress)
    print((out / "demo.md").read_text())
    print(f"finished in {result['seconds'] / 60:.1f} min; tables and plots in {out}/")


def add_parsers(sub) -> None:
    """``unleash demo``."""
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
    add_device_args(p)
    p.set_defaults(func=cmd_demo)

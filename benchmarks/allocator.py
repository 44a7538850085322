"""The C allocator's settings and the CPU's forward and training passes.

    python benchmarks/allocator.py [--images 20000] [--repeats 2]

The command line sets glibc's mmap and trim thresholds to 256 MiB at start
(``unleash_ood.heap.reuse_batch_buffers``), so that a batch's large buffers reuse the blocks
the previous batch freed instead of fresh mappings whose pages the kernel zeroes. A setting
that cannot be undone within a process, so each side runs in fresh processes, alternately
(``--repeats`` each), and the best of each side is compared:

- ``batch-buffers``: the thresholds as the command line sets them;
- ``defaults``: glibc's own (a dynamic mmap threshold of at most 32 MiB).

Each process times, on the shipped ``fmnist_cnn``: a plain no-grad forward pass over the ID
training, ID test and OOD test images (batch 512, channels-last), and one training epoch of
``Trainer.train_epoch`` over ``--images`` training images (batch 256, the paper recipe's
batch, horizontal flips). Prints both sides' times, CPU times and page faults,
and batch-buffers / defaults.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import benchmark_model

from unleash_ood.data import load_benchmark
from unleash_ood.device import prepare_model, to_device
from unleash_ood.heap import reuse_batch_buffers
from unleash_ood.train import Recipe, Trainer

SIDES = ("batch-buffers", "defaults")
SHIPPED = Path(__file__).resolve().parent.parent / "src" / "unleash_ood" / "weights" / "fmnist_cnn"


def timed(fn) -> dict[str, float]:
    """Wall, user and kernel CPU seconds and minor page faults of ``fn()``."""
    a, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    fn()
    wall, b = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF)
    return {
        "wall": wall,
        "user": b.ru_utime - a.ru_utime,
        "sys": b.ru_stime - a.ru_stime,
        "faults": b.ru_minflt - a.ru_minflt,
    }


def child(side: str, images: int) -> dict[str, dict[str, float]]:
    """One side's measurements, in this fresh process."""
    if side == "batch-buffers" and not reuse_batch_buffers():
        raise SystemExit(
            "the allocator could not be set (no glibc mallopt, or set by the environment)"
        )
    cpu = torch.device("cpu")
    bench = load_benchmark("fmnist")
    model = prepare_model(benchmark_model(bench, str(SHIPPED)), cpu).eval()
    datasets = [bench.id_train, bench.id_test, *bench.ood_test.values()]

    @torch.inference_mode()
    def forward() -> None:
        for data in datasets:
            for x, _ in data.batches(512):
                model(to_device(x, cpu))

    train = bench.id_train.subset(torch.arange(min(images, len(bench.id_train))))
    trainer = Trainer(
        benchmark_model(bench, str(SHIPPED)),
        Recipe(epochs=1, batch_size=256),
        train,
        bench.id_val,
        Path(tempfile.mkdtemp()),
        cpu,
        spec={},
        progress=False,
    )
    return {"forward": timed(forward), "train epoch": timed(lambda: trainer.train_epoch(0))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=20000, help="training images in the epoch")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.images)))
        return

    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    for _ in range(args.repeats):
        for side in SIDES:
            command = [sys.executable, __file__, "--child", side, "--images", str(args.images)]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            runs[side].append(json.loads(out.splitlines()[-1]))
    print(
        f"fresh processes, alternately, best of {args.repeats} (wall s, user s, kernel s, faults)"
    )
    best = {}
    for part in ("forward", "train epoch"):
        for side in SIDES:
            b = min((r[part] for r in runs[side]), key=lambda m: m["wall"])
            best[part, side] = b["wall"]
            print(
                f"  {part:11s} {side:13s} {b['wall']:7.2f} {b['user']:7.2f} {b['sys']:6.2f} "
                f"{b['faults']:10,}"
            )
        print(
            f"  {part}: batch-buffers / defaults {best[part, SIDES[0]] / best[part, SIDES[1]]:.3f}"
        )


if __name__ == "__main__":
    main()

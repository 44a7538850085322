"""Epoch time of the library's training loop relative to a minimal hand-written loop.

    python benchmarks/train_overhead.py [--images 20000] [--repeats 3]

Same model, data, batch size, optimiser and channels-last batches on both sides; no
augmentation, so the ratio measures the loop itself (sharding, bookkeeping, progress bar,
checkpoint and validation are outside the timed epoch). Target <= 1.05.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import benchmark_model, best_of

from unleash_ood.data import load_benchmark
from unleash_ood.device import to_device
from unleash_ood.train import Recipe, Trainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--benchmark", default="fmnist")
    p.add_argument("--images", type=int, default=20000, help="training images per epoch")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    bench = load_benchmark(args.benchmark)
    train = bench.id_train.subset(torch.arange(min(args.images, len(bench.id_train))))
    recipe = Recipe(epochs=args.repeats * 2, batch_size=args.batch_size, augment="none")
    device = torch.device("cpu")
    ours = Trainer(
        benchmark_model(bench, None),
        recipe,
        train,
        bench.id_val,
        Path(tempfile.mkdtemp()),
        device,
        spec={},
        progress=True,
    )
    model = benchmark_model(bench, None).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(
        model.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay
    )
    epoch = iter(range(10**6))

    def minimal() -> None:
        model.train()
        perm = torch.randperm(len(train))
        for s in range(0, len(train) - args.batch_size + 1, args.batch_size):
            x, y = train.__getitems__(perm[s : s + args.batch_size])
            loss = F.cross_entropy(model(to_device(x, device)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    t = best_of({"minimal": minimal, "ours": lambda: ours.train_epoch(next(epoch))}, args.repeats)
    print(f"{len(train):,} images, batch {args.batch_size}")
    print(f"minimal loop: {t['minimal']:.2f} s/epoch; Trainer.train_epoch: {t['ours']:.2f} s")
    print(f"ratio ours / minimal: {t['ours'] / t['minimal']:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()

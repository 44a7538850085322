"""Cost of the Unleashing Mask machinery relative to what it replaces, measured in one run.

    python benchmarks/method_overhead.py [--steps 40] [--repeats 3]

* UM training step / CE training step (same model, batch, optimiser). Target <= 1.02.
* UMAP training step (masked layers, scores trained) / dense CE step. Target <= 1.5.
* xi estimation, per mask (copy, mask, mean CE over the training set) / one evaluation pass
  over the training set. Target <= 1.1. (``estimate_loss_constraint`` adds one more such pass
  for the model's own loss, used to refuse a no-op xi.)
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from _common import benchmark_model, best_of, stepper

from unleash_ood.data import load_benchmark
from unleash_ood.device import prepare_model, to_device
from unleash_ood.evaluate import forward_outputs
from unleash_ood.method.constraint import UMObjective, masked_copy, mean_train_loss
from unleash_ood.method.umap import apply_umap
from unleash_ood.train import cross_entropy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    cpu = torch.device("cpu")
    bench = load_benchmark("fmnist")
    data = bench.id_train
    batches = [
        tuple(t for t in data.__getitems__(range(i, i + args.batch_size)))
        for i in range(0, args.steps * args.batch_size, args.batch_size)
    ]
    batches = [(to_device(x, cpu), y) for x, y in batches]

    def fresh():
        return prepare_model(benchmark_model(bench, args.checkpoint), cpu)

    xi = float(F.cross_entropy(fresh()(batches[0][0]), batches[0][1])) + 1.0
    steps = best_of(
        {
            "ce": stepper(fresh(), cross_entropy, batches),
            "um": stepper(fresh(), UMObjective(xi), batches),
            "umap": stepper(
                prepare_model(apply_umap(fresh(), keep=0.8), cpu), cross_entropy, batches
            ),
        },
        args.repeats,
    )
    model = fresh()
    passes = best_of(
        {
            "eval": lambda: forward_outputs(model, data, cpu),
            "xi": lambda: mean_train_loss(
                masked_copy(model, 0.035, torch.Generator()), data, "none", 0, cpu
            ),
        },
        args.repeats,
    )
    print(
        f"{args.steps} steps of batch {args.batch_size}: CE {steps['ce']:.2f} s, "
        f"UM {steps['um']:.2f} s, UMAP {steps['umap']:.2f} s"
    )
    print(f"ratio UM / CE step: {steps['um'] / steps['ce']:.3f} (target <= 1.02)")
    print(f"ratio UMAP / dense step: {steps['umap'] / steps['ce']:.3f} (target <= 1.5)")
    print(
        f"training set ({len(data):,}): eval pass {passes['eval']:.2f} s, xi estimate "
        f"{passes['xi']:.2f} s; ratio {passes['xi'] / passes['eval']:.3f} (target <= 1.1)"
    )


if __name__ == "__main__":
    main()

"""Cost of each outlier-exposure method per training step, relative to plain CE fine-tuning
on the same ID batches, measured in one run.

    python benchmarks/outlier_overhead.py [--steps 30] [--repeats 3]

Every method forwards the ID batch and as many outliers (``--aux-ratio 1``) in one pass, so
about 2x is the floor; DOE adds the double-backward of its surrogate and a perturbed pass.
POEM's per-epoch selection (features of the whole auxiliary pool and of an ID sample, then a
posterior fit) is reported beside one epoch of OE steps.
"""

from __future__ import annotations

import argparse

import torch
from _common import benchmark_model, best_of, stepper

from unleash_ood.data import load_benchmark
from unleash_ood.data.auxiliary import load_aux
from unleash_ood.device import prepare_model, to_device
from unleash_ood.method.outliers import OUTLIER_METHODS, OutlierObjective, OutlierSpec
from unleash_ood.method.poem import PoemSelector
from unleash_ood.train import cross_entropy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    cpu = torch.device("cpu")
    bench = load_benchmark("fmnist")
    aux = load_aux("bundled", 28, 1)
    batches = [
        (to_device(x, cpu), y)
        for x, y in (
            bench.id_train.__getitems__(range(i, i + args.batch_size))
            for i in range(0, args.steps * args.batch_size, args.batch_size)
        )
    ]

    def fresh():
        return prepare_model(benchmark_model(bench, args.checkpoint), cpu)

    def objective(method: str, model):
        spec = OutlierSpec(method=method, **({"doe_warmup": 0.0} if method == "doe" else {}))
        obj = OutlierObjective(spec, aux, None, args.batch_size, 1, "flip", 0, bench.id_train)
        obj.start_epoch(0, model)  # POEM selects here: timed separately below
        return obj

    runs = {"ce": stepper(fresh(), cross_entropy, batches)}
    for method in OUTLIER_METHODS:
        model = fresh()
        runs[method] = stepper(model, objective(method, model), batches)
    steps = best_of(runs, args.repeats)
    model = fresh()
    selector = PoemSelector(OutlierSpec().poem_keep, 0)
    select = best_of({"select": lambda: selector.select(model, aux, bench.id_train, 0)}, 2)
    epoch_steps = len(bench.id_train) // args.batch_size
    oe_epoch = steps["oe"] / args.steps * epoch_steps
    print(
        f"{args.steps} steps of batch {args.batch_size} (+ as many outliers): "
        f"CE {steps['ce']:.2f} s"
    )
    for method in OUTLIER_METHODS:
        print(f"ratio {method} / CE step: {steps[method] / steps['ce']:.3f}")
    print(
        f"POEM selection over {len(aux):,} outliers: {select['select']:.2f} s per epoch, "
        f"{select['select'] / oe_epoch:.3f} of an epoch of OE steps ({oe_epoch:.1f} s)"
    )


if __name__ == "__main__":
    main()

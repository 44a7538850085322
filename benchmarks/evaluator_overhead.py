"""Evaluator cost relative to plain loops over the same data and model.

    python benchmarks/evaluator_overhead.py [--checkpoint CKPT] [--repeats 2] [--scores a,b]

Every side sees the same images in the same channels-last batches, so each ratio isolates what
the evaluator adds:
- evaluator with every output-only scorer (fitting on the ID training split included) / one
  plain forward pass over the ID training, ID test and OOD test images; target <= 1.1
  (gradient scorers, the feature-map scorers, which change the forward pass, and Forte, whose
  fit is quadratic in the training rows, apart);
- its forward pass alone (``forward_outputs``, which keeps features and logits) / the plain
  loop; target <= 1.02;
- ODIN over the ID and OOD test images / a plain forward, backward to the input and second
  forward on the same batches; target <= 1.1;
- k-NN's exact search over the evaluation rows against the training bank / the bare matrix
  product of the same shapes, and that product / the plain forward: the floor k-NN alone puts
  under the first ratio.

On a shared machine two passes of the same forward differ by 10-20 %, as much as the margin
being measured, so every side runs interleaved, best of ``--repeats``, and the script also
prints the decomposition ``forward_outputs / plain + beyond / plain``, where ``beyond`` is a
second run of an evaluator that keeps its outputs (fitting, scoring, metrics only).

Each side's user and kernel CPU time and minor page faults are printed beside its wall time,
and the ratios again in user CPU time. The two forward loops run the same operations on the
same tensors; with glibc's default allocator settings what separated their wall times was
kernel time on page faults, whose number depends on the C heap's state, not on the loop: when
the heap holds no free block as large as the model's first activation (51 MB for the CNN at
batch 512), glibc maps one afresh for every batch and the kernel zeroes its pages, in either
loop. The script therefore sets the allocator as the command line does
(``unleash_ood.heap.reuse_batch_buffers``: freed batch buffers are reused); ``--allocator
defaults`` measures with glibc's own settings instead.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from _common import benchmark_model, best_of, best_usage

from unleash_ood.data import load_benchmark
from unleash_ood.device import prepare_model, to_device
from unleash_ood.evaluate import Evaluator, evaluate, forward_outputs, model_scores
from unleash_ood.heap import reuse_batch_buffers
from unleash_ood.scores import SCORERS, make_scorer
from unleash_ood.scores.distance import kth_similarity


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--benchmark", default="fmnist")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument(
        "--scores",
        default=None,
        help="comma-separated output-only scorers for the evaluator side (default: all of them)",
    )
    p.add_argument(
        "--allocator",
        choices=("batch-buffers", "defaults"),
        default="batch-buffers",
        help="glibc's thresholds as the command line sets them, or glibc's defaults",
    )
    args = p.parse_args()
    if args.allocator == "batch-buffers" and not reuse_batch_buffers():
        print("the allocator could not be set (no glibc mallopt, or set by the environment)")

    cpu = torch.device("cpu")
    bench = load_benchmark(args.benchmark)
    model = prepare_model(benchmark_model(bench, args.checkpoint), cpu).eval()
    eval_sets = [bench.id_test, *bench.ood_test.values()]
    datasets = [bench.id_train, *eval_sets]
    # Output-only scorers. Apart (benchmarks/related_scores.py): the feature-map ones (MODE,
    # Gram, ...), which add work to the forward pass itself, and Forte, whose fit compares every
    # training feature with every other (minutes at 55,000 rows: fit it on --fit-samples).
    names = (
        args.scores.split(",")
        if args.scores
        else [
            n
            for n, cls in SCORERS.items()
            if not cls.needs_model and not cls.map_summaries and n != "forte"
        ]
    )
    if unknown := [n for n in names if n not in SCORERS or SCORERS[n].needs_model]:
        p.error(f"not output-only scorers: {', '.join(unknown)}")
    odin = make_scorer("odin")

    @torch.inference_mode()
    def plain_forward() -> None:
        for data in datasets:
            for x, _ in data.batches(args.batch_size):
                model(to_device(x, cpu))

    def evaluator_forward() -> None:
        for data in datasets:
            forward_outputs(model, data, cpu, args.batch_size)

    def plain_gradient() -> None:
        for data in eval_sets:
            for x, _ in data.batches(args.batch_size):
                x = to_device(x, cpu).requires_grad_(True)
                with torch.enable_grad():
                    (grad,) = torch.autograd.grad(model(x).sum(), x)
                with torch.no_grad():
                    model(x.detach() + grad)

    def evaluator_odin() -> None:
        for data in eval_sets:
            model_scores(odin, model, data, cpu, args.batch_size)

    def evaluator() -> None:
        scorers = [make_scorer(n) for n in names]
        evaluate(model, bench, scorers, device="cpu", batch_size=args.batch_size, progress=False)

    warm = Evaluator(
        model, bench, [make_scorer(n) for n in names], "cpu", args.batch_size, progress=False
    )
    warm.run()  # keeps every dataset's outputs: later runs only fit, score and tabulate
    u = best_usage(
        {
            "forward": plain_forward,
            "evaluate": evaluator,
            "beyond": warm.run,
            "forward_outputs": evaluator_forward,
            "plain_gradient": plain_gradient,
            "odin": evaluator_odin,
        },
        args.repeats,
    )
    t = {k: v.wall for k, v in u.items()}
    n_images = sum(map(len, datasets))
    print(f"allocator: {args.allocator}; images: {n_images:,}")
    print(f"non-gradient scorers: {', '.join(names)}")
    print(f"best of {args.repeats} interleaved repeats (wall s, user CPU s, kernel CPU s, faults):")
    for k, v in u.items():
        print(f"  {k:16s} {v.wall:7.2f} {v.user:7.2f} {v.sys:6.2f} {v.faults:10,}")
    fwd = t["forward_outputs"] / t["forward"]
    print(f"evaluator / plain forward: {t['evaluate'] / t['forward']:.3f} (target <= 1.1)")
    print(
        f"decomposition: forward_outputs / plain {fwd:.3f} + beyond / plain "
        f"{t['beyond'] / t['forward']:.3f} = {fwd + t['beyond'] / t['forward']:.3f}"
    )
    print(f"forward_outputs / plain forward: {fwd:.3f} (target <= 1.02)")
    print(
        f"ODIN / (forward + backward + forward), {sum(map(len, eval_sets)):,} images: "
        f"{t['odin'] / t['plain_gradient']:.3f} (target <= 1.1)"
    )
    print("the same ratios in user CPU time (the work each side does, without the kernel's")
    print("page faults, whose number depends on the C allocator's state, not on the code):")
    for num, den in (
        ("evaluate", "forward"),
        ("forward_outputs", "forward"),
        ("odin", "plain_gradient"),
    ):
        print(f"  {num} / {den}: {u[num].user / u[den].user:.3f}")
    dims = model.head.in_features
    knn_floor(len(bench.id_train), sum(map(len, eval_sets)), dims, t["forward"], args.repeats)


def knn_floor(bank_rows: int, queries: int, dims: int, forward_s: float, repeats: int) -> None:
    """k-NN's exact search against the bare matrix product it cannot avoid, on random unit
    features of the model's width (the product's cost does not depend on the values)."""
    g = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(bank_rows, dims, generator=g), dim=1)
    q = F.normalize(torch.randn(queries, dims, generator=g), dim=1)

    def product() -> None:
        for chunk in q.split(128):
            torch.mm(chunk, bank.T)

    t = best_of({"knn": lambda: kth_similarity(q, bank, 50), "product": product}, repeats)
    print(
        f"k-NN (k=50), {queries:,} queries x {bank_rows:,} bank rows x {dims} dims: "
        f"{t['knn']:.2f} s; the bare product {t['product']:.2f} s; "
        f"product / plain forward {t['product'] / forward_s:.3f}"
    )


if __name__ == "__main__":
    main()

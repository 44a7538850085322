"""MODE and Forte beside MSP, Energy and KNN on one model: metrics and the time each adds.

    python benchmarks/related_scores.py --checkpoint fmnist_cnn [--benchmark fmnist]
        [--scores msp,energy,knn,mode,forte,rankfeat] [--fit-rows 10000] [--forte-variants]
        [--out benchmarks/results/related_scores.json]

Times, on one process: the forward passes over every dataset the evaluation touches, plain
(features and logits) and with MODE's region vectors; then each scorer's fit and its scoring
of the ID and OOD test sets on those outputs. Every scorer is fitted on the same
``--fit-rows`` evenly spaced ID training images (MODE's bank and Forte's statistics grow with
the square of the training set: 55,000 images would take far longer than the rest); 0 takes
them all, which is what ``unleash evaluate --checkpoint CKPT --scores ... --out RUN`` does.
``--forte-variants`` adds Forte with the authors' transductive radii and with the GMM.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from unleash_ood.checkpoint import load_checkpoint
from unleash_ood.data import load_benchmark
from unleash_ood.evaluate import Evaluation
from unleash_ood.outputs import forward_outputs
from unleash_ood.scores import make_scorer, parse_scorer_list
from unleash_ood.scores.neighbours import bank_rows

VARIANTS = {
    "radii=batch": {"radii": "batch"},
    "density=gmm": {"density": "gmm"},
    "radii=batch density=gmm": {"radii": "batch", "density": "gmm"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="fmnist_cnn")
    parser.add_argument("--benchmark", default="fmnist")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--scores", default="msp,energy,knn,mode,forte,rankfeat")
    parser.add_argument("--fit-rows", type=int, default=10000)
    parser.add_argument("--forte-variants", action="store_true")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--out", default="benchmarks/results/related_scores.json")
    args = parser.parse_args()

    scorers = [(s.name, s) for s in parse_scorer_list(args.scores)]
    if args.forte_variants:
        scorers += [(f"forte {label}", make_scorer("forte", **p)) for label, p in VARIANTS.items()]
    bench = load_benchmark(args.benchmark, args.data_dir)
    model, _ = load_checkpoint(args.checkpoint, "cpu", bench.num_classes, bench.image_shape)
    train = bench.id_train
    if args.fit_rows:
        train = train.subset(bank_rows(len(train), args.fit_rows / len(train)))
    datasets = {"id_train": train, "id": bench.id_test, **bench.ood_test}
    summaries = sorted({n for _, s in scorers for n in s.map_summaries})

    timings: dict[str, float] = {}
    outputs = {}
    passes = {"forward_plain": []}
    if summaries:
        passes["forward_with_summaries"] = summaries
    for label, wanted in passes.items():
        start = time.perf_counter()
        outputs = {
            name: forward_outputs(model, data, "cpu", args.batch_size, summaries=wanted)
            for name, data in datasets.items()
        }
        timings[label] = time.perf_counter() - start

    result = Evaluation(bench.name, {})
    for label, scorer in scorers:
        start = time.perf_counter()
        if scorer.requires_fit:
            scorer.fit(outputs["id_train"], model.head)
        scores = {
            name: scorer.score(out, model.head).numpy()
            for name, out in outputs.items()
            if name != "id_train"
        }
        timings[label] = time.perf_counter() - start
        result.add_scores("test", label, scores, bench)

    rows = [r for r in result.rows if r["dataset"] == "mean"]
    report = {
        "checkpoint": args.checkpoint,
        "fit_rows": len(train),
        "images": {name: len(data) for name, data in datasets.items()},
        "seconds": timings,
        "mean": rows,
        "rows": result.rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print("| scorer | AUROC | FPR95 (ID+) | FPR95 (OOD+) | seconds (fit + score) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['scorer']} | {100 * r['auroc']:.2f} | {100 * r['fpr95_id']:.2f} | "
            f"{100 * r['fpr95_ood']:.2f} | {timings[r['scorer']]:.1f} |"
        )
    print(", ".join(f"{label} {timings[label]:.1f} s" for label in passes))


if __name__ == "__main__":
    main()

"""``unleash demo``: the whole method on the embedded benchmark, from the shipped model.

Evaluate the well-trained model, estimate xi, fine-tune it with UM, with UMAP and with the
plain cross-entropy control (same recipe, same seed), and compare all four with every scorer.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from importlib import resources
from pathlib import Path

import torch

from unleash_ood.checkpoint import atomic_write_bytes, atomic_write_json, load_checkpoint
from unleash_ood.data import load_benchmark
from unleash_ood.data.base import Benchmark
from unleash_ood.evaluate import Evaluation, evaluate
from unleash_ood.method.constraint import estimate_loss_constraint
from unleash_ood.method.finetune import FinetuneSpec, finetune_recipe, noop_error, run_finetune
from unleash_ood.metrics import METRIC_NAMES
from unleash_ood.report import LEGEND, markdown_table, plot_histograms, save_figure

SHIPPED = "fmnist_cnn"
TABLE_METRICS = ("auroc", "fpr95_id", "fpr95_ood", "aupr_in")


def shipped_checkpoint() -> Path:
    """The package's well-trained Fashion-MNIST CNN (default recipe, seed 0)."""
    return Path(str(resources.files("unleash_ood") / "weights" / SHIPPED))


@dataclass(frozen=True)
class DemoPlan:
    """What the demo runs; ``quick`` trades training data and scorers for time."""

    epochs: int = 3
    train_images: int | None = None
    n_masks: int = 5
    scorers: str = "all"

    @classmethod
    def quick(cls) -> DemoPlan:
        return cls(
            epochs=1,
            train_images=10_000,
            n_masks=2,
            scorers="msp,energy,maxlogit,gen,mahalanobis,knn,vim,react,ash_s,dice",
        )


def _with_subset(bench: Benchmark, n: int | None) -> Benchmark:
    if n is None or n >= len(bench.id_train):
        return bench
    index = torch.randperm(len(bench.id_train), generator=torch.Generator().manual_seed(0))[:n]
    return replace(bench, id_train=bench.id_train.subset(index))


def summary_rows(evals: dict[str, Evaluation], scorers: tuple[str, ...]) -> list[list]:
    """model, scorer, ID acc and the mean metrics x100; ``all`` averages every scorer not below
    chance on that model (a scorer below chance would otherwise hide in the average)."""
    rows = []
    for model, ev in evals.items():
        acc = 100 * ev.accuracy["id_test"]
        sound = ev.sound_scorers()
        for scorer in (*scorers, "all"):
            means = [ev.row(s) for s in sound] if scorer == "all" else [ev.row(scorer)]
            rows.append(
                [
                    model,
                    scorer,
                    acc,
                    *(100 * sum(r[m] for r in means) / len(means) for m in TABLE_METRICS),
                ]
            )
    return rows


def per_set_rows(evals: dict[str, Evaluation], scorer: str) -> list[list]:
    return [
        [model, r["dataset"], *(100 * r[m] for m in TABLE_METRICS)]
        for model, ev in evals.items()
        for r in ev.rows
        if r["split"] == "test" and r["scorer"] == scorer
    ]


def plot_comparison(evals: dict[str, Evaluation], path: Path) -> None:
    import matplotlib.pyplot as plt

    models = list(evals)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, metric in zip(axes, ("auroc", "fpr95_id", "fpr95_ood"), strict=True):
        for i, scorer in enumerate(("energy", "msp")):
            values = [100 * evals[m].row(scorer)[metric] for m in models]
            ax.bar([j + 0.38 * i for j in range(len(models))], values, width=0.38, label=scorer)
        ax.set_xticks([j + 0.19 for j in range(len(models))], models)
        ax.set_title(f"mean {metric} (x100)")
    axes[0].legend()
    fig.tight_layout()
    save_figure(fig, path)


def run_demo(
    out: Path,
    data_dir: str | None,
    device: torch.device,
    plan: DemoPlan,
    progress: bool = True,
    log=print,
) -> dict:
    t0 = time.perf_counter()
    bench = _with_subset(load_benchmark("fmnist", data_dir), plan.train_images)
    start = shipped_checkpoint()
    recipe = finetune_recipe("um", "quick", epochs=plan.epochs)
    base, _ = load_checkpoint(start, device, bench.num_classes, bench.image_shape)

    log("estimating the loss constraint xi ...")
    est = estimate_loss_constraint(
        base, bench.id_train, n_masks=plan.n_masks, augmentation=recipe.augment, device=device
    )
    log(
        f"xi = {est.xi:.4f} (masks: {', '.join(f'{v:.4f}' for v in est.per_mask)}; "
        f"spread {est.spread:.4f}); the model's own training loss {est.train_loss:.4f}"
    )
    if est.is_noop:
        raise noop_error(est.xi, est.train_loss)
    finals = {"base": start}
    for method in ("ce", "um", "umap"):
        log(f"fine-tuning with {method} for {plan.epochs} epoch(s) ...")
        xi = None if method == "ce" else est.xi
        finals[method] = run_finetune(
            bench,
            start,
            FinetuneSpec(method=method),
            finetune_recipe(method, "quick", epochs=plan.epochs),
            out / method,
            device,
            xi,
            progress=progress,
        )
    log("evaluating ...")
    evals = {}
    for name, ckpt in finals.items():
        model, _ = load_checkpoint(ckpt, device)
        evals[name] = evaluate(model, bench, plan.scorers, device=device, progress=progress)
    result = {
        "xi": est.to_dict(),
        "plan": asdict(plan),
        "recipe": asdict(recipe),
        "evaluations": {k: v.to_dict() for k, v in evals.items()},
        "seconds": time.perf_counter() - t0,
    }
    write_demo(out, evals, result)
    return result


def demo_markdown(evals: dict[str, Evaluation], result: dict) -> str:
    headers = ["model", "scorer", "ID acc", "AUROC", "FPR95 (ID+)", "FPR95 (OOD+)", "AUPR-In"]
    xi = result["xi"]
    return "\n".join(
        [
            "# unleash demo: fmnist, shipped CNN fine-tuned with CE / UM / UMAP",
            "",
            f"xi = {xi['xi']:.4f} (random-mask estimate, {len(xi['per_mask'])} masks, spread "
            f"{xi['spread']:.4f}); model's training loss {xi['train_loss']:.4f}. "
            f"{result['recipe']['epochs']} fine-tuning epoch(s), lr {result['recipe']['lr']} "
            f"(UMAP's mask scores: {finetune_recipe('umap', 'quick').lr}).",
            "",
            "## Mean over OOD test sets (noise excluded; `all` = mean over every scorer)",
            "",
            markdown_table(headers, summary_rows(evals, ("energy", "msp"))),
            "",
            "## Energy, per OOD test set",
            "",
            markdown_table(["model", "OOD set", *headers[3:]], per_set_rows(evals, "energy")),
            "",
            LEGEND + " One seed: differences of a point or two are within seed-to-seed noise "
            "(see benchmarks/RESULTS.md).",
            "",
        ]
    )


def write_demo(out: Path, evals: dict[str, Evaluation], result: dict) -> None:
    import csv
    import io

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "demo.json", result)
    atomic_write_bytes(out / "demo.md", demo_markdown(evals, result).encode())
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model", "split", "scorer", "dataset", *METRIC_NAMES, "id_test_acc"])
    for name, ev in evals.items():
        for r in ev.rows:
            w.writerow(
                [
                    name,
                    r["split"],
                    r["scorer"],
                    r["dataset"],
                    *(f"{100 * r[m]:.4f}" for m in METRIC_NAMES),
                    f"{100 * ev.accuracy['id_test']:.4f}",
                ]
            )
    atomic_write_bytes(out / "demo.csv", buf.getvalue().encode())
    plot_comparison(evals, out / "comparison.png")
    for name, ev in evals.items():
        plot_histograms(ev, out / f"histograms_{name}.png")

"""``unleash demo``: the method on the embedded benchmark, from the shipped models.

By default the demo evaluates the shipped well-trained CNN beside its CE-control, UM and UMAP
fine-tunes, which ship as weights (each row names the recipe its model was made with, read from
the model's sidecar; ``benchmarks/ship_finetunes.py`` puts a set of fine-tunes in place), then
runs one short live UM fine-tune on a subset to show the mechanics: the objective held at xi
while the plain cross-entropy under it rises.
``--train`` remakes the three fine-tunes instead (xi estimated afresh; hours on a CPU), and
``--quick`` does so with the 3-epoch ``quick`` recipe on 10,000 images: a demonstration of the
mechanics whose numbers are not the method's result.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from unleash_ood.checkpoint import (
    SHIPPED_DIR,
    atomic_write_bytes,
    atomic_write_json,
    load_checkpoint,
    read_sidecar,
)
from unleash_ood.context import RunContext
from unleash_ood.data import load_benchmark
from unleash_ood.data.base import Benchmark
from unleash_ood.errors import UserError
from unleash_ood.evaluate import Evaluation, evaluate
from unleash_ood.method.constraint import estimate_loss_constraint
from unleash_ood.method.finetune import noop_error, run_finetune
from unleash_ood.metrics import METRIC_NAMES
from unleash_ood.report import LEGEND, markdown_table, plot_histograms, save_figure
from unleash_ood.rng import torch_generator
from unleash_ood.specs import FinetuneSpec, finetune_recipe

SHIPPED = "fmnist_cnn"
METHODS = ("ce", "um", "umap")
NAMES = {"base": "base", "ce": "CE control", "um": "UM", "umap": "UMAP"}
TABLE_METRICS = ("auroc", "fpr95_id", "fpr95_ood", "aupr_in")


def shipped_checkpoint(method: str | None = None) -> Path:
    """The package's well-trained Fashion-MNIST CNN (default recipe, seed 0), or its shipped
    fine-tune with ``method`` (``ce``, ``um``, ``umap``)."""
    return SHIPPED_DIR / (SHIPPED if method is None else f"{SHIPPED}_{method}")


@dataclass(frozen=True)
class DemoPlan:
    """What the demo runs. ``train``: remake the fine-tunes with ``recipe`` (on
    ``train_images`` training images, all when None) instead of loading the shipped ones.
    ``live_epochs`` / ``live_images``: the live UM fine-tune shown after the table (0: none)."""

    train: bool = False
    recipe: str = "paper"
    train_images: int | None = None
    n_masks: int = 5
    scorers: str = "energy,msp,maxlogit,gen"
    live_epochs: int = 1
    live_images: int = 10_000

    @classmethod
    def quick(cls) -> DemoPlan:
        return cls(train=True, recipe="quick", train_images=10_000, n_masks=2, live_epochs=0)


def _with_subset(bench: Benchmark, n: int | None, seed: int = 0) -> Benchmark:
    if n is None or n >= len(bench.id_train):
        return bench
    index = torch.randperm(len(bench.id_train), generator=torch_generator(seed, "demo-subset"))[:n]
    return replace(bench, id_train=bench.id_train.subset(index))


def recipe_label(meta: dict) -> str:
    """How a model was made, in a few words, from its sidecar."""
    r = meta.get("recipe", {})
    what = f"{r.get('epochs')} epochs, lr {r.get('lr')} {r.get('schedule')}"
    tune = meta.get("finetune")
    if not tune:
        return f"pretrained: {what}"
    name = tune.get("recipe_name") or "custom"
    xi = f", xi {tune['xi']:.4g}" if tune.get("xi") is not None else ""
    return f"{name} recipe: {what}{xi}"


def summary_rows(
    evals: dict[str, Evaluation], labels: dict[str, str], scorers: tuple[str, ...]
) -> list[list]:
    """model, recipe, scorer, ID acc and the mean metrics x100."""
    return [
        [
            NAMES[model],
            labels[model],
            scorer,
            100 * ev.accuracy["id_test"],
            *(100 * ev.row(scorer)[m] for m in TABLE_METRICS),
        ]
        for model, ev in evals.items()
        for scorer in scorers
    ]


def per_set_rows(evals: dict[str, Evaluation], scorer: str) -> list[list]:
    return [
        [NAMES[model], r["dataset"], *(100 * r[m] for m in TABLE_METRICS)]
        for model, ev in evals.items()
        for r in ev.rows
        if r["split"] == "test" and r["scorer"] == scorer
    ]


def plot_comparison(evals: dict[str, Evaluation], path: Path) -> None:
    """Mean AUROC and both FPR95s per model, Energy beside MSP; the y-axis spans the data
    (not 0-100), the legend sits above the panels."""
    import matplotlib.pyplot as plt

    models = list(evals)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, metric in zip(axes, ("auroc", "fpr95_id", "fpr95_ood"), strict=True):
        values = []
        for i, scorer in enumerate(("energy", "msp")):
            v = [100 * evals[m].row(scorer)[metric] for m in models]
            values += v
            ax.bar([j + 0.38 * i for j in range(len(models))], v, width=0.38, label=scorer)
        pad = 0.15 * (max(values) - min(values)) + 1
        ax.set_ylim(max(0, min(values) - pad), min(100, max(values) + pad))
        ax.set_xticks([j + 0.19 for j in range(len(models))], [NAMES[m] for m in models])
        ax.set_title(f"mean {metric} (x100)", fontsize=9)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", ncol=2, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    save_figure(fig, path)


def trained_finetunes(
    bench: Benchmark, out: Path, device: torch.device, plan: DemoPlan, progress: bool, log
) -> tuple[dict[str, Path], dict]:
    """Estimate xi on the shipped model and fine-tune it with CE, UM and UMAP."""
    start = shipped_checkpoint()
    base, _ = load_checkpoint(start, device, bench.num_classes, bench.image_shape)
    recipe = finetune_recipe("um", plan.recipe)
    log(f"estimating the loss constraint xi on {len(bench.id_train):,} training images ...")
    est = estimate_loss_constraint(
        base,
        bench.id_train,
        n_masks=plan.n_masks,
        augmentation=recipe.augment,
        device=device,
        progress=progress,
    )
    log(
        f"xi = {est.xi:.4f} (masks: {', '.join(f'{v:.4f}' for v in est.per_mask)}); "
        f"the model's own training loss {est.train_loss:.4f}"
    )
    if est.is_noop:
        raise noop_error(est.xi, est.train_loss)
    finals = {}
    for method in METHODS:
        r = finetune_recipe(method, plan.recipe)
        log(f"fine-tuning with {method}: {plan.recipe} recipe, {r.epochs} epochs, lr {r.lr} ...")
        xi = None if method == "ce" else est.xi
        (out / method).mkdir(parents=True, exist_ok=True)
        atomic_write_json(
            out / method / "config.json",
            {
                "command": f"demo --train ({method})",
                "recipe_name": plan.recipe,
                "recipe": asdict(r),
                "xi": xi,
                "train_size": len(bench.id_train),
            },
        )
        ctx = RunContext(bench, out / method, device, progress=progress)
        extra = {"recipe_name": plan.recipe}
        finals[method] = run_finetune(ctx, start, FinetuneSpec(method=method), r, xi, extra=extra)
    return finals, est.to_dict()


def live_um(bench: Benchmark, out: Path, device: torch.device, plan: DemoPlan, progress: bool):
    """A short UM fine-tune of the shipped model at the shipped UM's xi: the mechanics only."""
    xi = read_sidecar(shipped_checkpoint("um"))["finetune"]["xi"]
    subset = _with_subset(bench, plan.live_images)
    recipe = finetune_recipe("um", "quick", epochs=plan.live_epochs)
    ctx = RunContext(subset, out / "live_um", device, progress=progress)
    spec = FinetuneSpec(method="um")
    run_finetune(ctx, shipped_checkpoint(), spec, recipe, xi, extra={"recipe_name": "quick"})
    return xi, (out / "live_um" / "log.txt").read_text().strip()


def run_demo(
    out: Path,
    data_dir: str | None,
    device: torch.device,
    plan: DemoPlan,
    progress: bool = True,
    log=print,
) -> dict:
    t0 = time.perf_counter()
    bench = load_benchmark("fmnist", data_dir)
    if plan.train:
        finals, xi = trained_finetunes(
            _with_subset(bench, plan.train_images), out, device, plan, progress, log
        )
    else:
        finals = {m: shipped_checkpoint(m) for m in METHODS}
        missing = [m for m, p in finals.items() if not p.with_suffix(".json").exists()]
        if missing:
            raise UserError(
                f"this installation lacks the shipped {', '.join(missing)} fine-tune(s); "
                f"run 'unleash demo --train' to make them"
            )
        xi = None
    models = {"base": shipped_checkpoint(), **finals}
    labels = {name: recipe_label(read_sidecar(path)) for name, path in models.items()}
    evals = {}
    for name, ckpt in models.items():
        log(f"evaluating {NAMES[name]} ({labels[name]}) with {plan.scorers} ...")
        model, _ = load_checkpoint(ckpt, device, bench.num_classes, bench.image_shape)
        evals[name] = evaluate(model, bench, plan.scorers, device=device, progress=progress)
    live = None
    if plan.live_epochs and not plan.train:
        log(f"a live UM fine-tune, {plan.live_epochs} epoch(s) on {plan.live_images:,} images ...")
        live = live_um(bench, out, device, plan, progress)
    result = {
        "plan": asdict(plan),
        "models": {k: str(v) for k, v in models.items()},
        "recipes": labels,
        "xi": xi,
        "train_images": len(bench.id_train) if plan.train_images is None else plan.train_images,
        "evaluations": {k: v.to_dict() for k, v in evals.items()},
        "live": None if live is None else {"xi": live[0], "log": live[1]},
        "seconds": time.perf_counter() - t0,
    }
    write_demo(out, evals, result)
    return result


def demo_markdown(evals: dict[str, Evaluation], result: dict) -> str:
    headers = ["model", "made with", "scorer", "ID acc", "AUROC", "FPR95 (ID+)", "FPR95 (OOD+)"]
    headers.append("AUPR-In")
    plan = result["plan"]
    if plan["train"]:
        size = f"{result['train_images']:,} training images"
        source = f"fine-tunes made in this run ({plan['recipe']} recipe, {size})"
    else:
        source = "the shipped fine-tunes (weights made as each row says; remake with --train)"
    caveat = (
        "**The `quick` recipe demonstrates the mechanics; its numbers are not the method's "
        "result** (see benchmarks/RESULTS.md for the paper-recipe study)."
        if any(label.startswith("quick recipe") for label in result["recipes"].values())
        else "One seed: see benchmarks/RESULTS.md for the study over seeds."
    )
    lines = [
        "# unleash demo: fmnist, the shipped CNN and its CE / UM / UMAP fine-tunes",
        "",
        f"Models: {source}. {caveat}",
        "",
        "## Mean over OOD test sets (noise excluded)",
        "",
        markdown_table(headers, summary_rows(evals, result["recipes"], ("energy", "msp"))),
        "",
        "## Energy, per OOD test set",
        "",
        markdown_table(["model", "OOD set", *headers[4:]], per_set_rows(evals, "energy")),
        "",
        LEGEND,
        "",
    ]
    if result["live"]:
        lines += [
            f"## Live: UM on {plan['live_images']:,} training images at xi = "
            f"{result['live']['xi']:.4g}",
            "",
            "The mechanics, not a result: the objective |CE - xi| + xi never falls below xi, "
            "and where the model's cross-entropy starts below xi the gradient ascends it.",
            "",
            "```",
            result["live"]["log"],
            "```",
            "",
        ]
    return "\n".join(lines)


def write_demo(out: Path, evals: dict[str, Evaluation], result: dict) -> None:
    import csv
    import io

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "demo.json", result)
    atomic_write_bytes(out / "demo.md", demo_markdown(evals, result).encode())
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model", "recipe", "split", "scorer", "dataset", *METRIC_NAMES, "id_test_acc"])
    for name, ev in evals.items():
        for r in ev.rows:
            w.writerow(
                [
                    name,
                    result["recipes"][name],
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
        plot_histograms(ev, out / f"histograms_{name}.png", model=f"{NAMES[name]} model")

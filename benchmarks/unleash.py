"""UM and UMAP against the final model, the validation-selected epoch and the CE control.

    python benchmarks/unleash.py [--runs runs/phenomenon/seed0 ...] [--epochs 10]

For each pretraining run (default: the three seeds of benchmarks/phenomenon.py) it fine-tunes
the final model with the plain cross-entropy control, UM and UMAP (same recipe, fine-tune seed
= the run's pretraining seed, xi from the random-mask estimate over 5 masks), evaluates all
five models with every scorer on the fmnist OOD test sets, and prints mean ± std over runs
(per-run figures in the ``--out`` JSON). Nothing is tuned on
the OOD test sets: xi comes from training data, the intermediate epoch from validation data.
Runs pretrained without --track have no selected epoch; that row is then left out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from _common import mean_std_table, per_run_summaries, run_seed

from unleash_ood.checkpoint import atomic_write_json, load_checkpoint
from unleash_ood.data import load_benchmark
from unleash_ood.evaluate import evaluate
from unleash_ood.method.finetune import FINETUNE_RECIPE, FinetuneSpec, finetune, finetune_recipe
from unleash_ood.report import markdown_table

MODELS = ("final", "selected", "ce", "um", "umap")


def model_paths(bench, run: Path, seed: int, epochs: int, device) -> tuple[dict[str, Path], dict]:
    paths = {"final": run / "checkpoints" / "last"}
    selection = run / "track_selection.json"
    if selection.exists():  # runs pretrained with --track; others have no selected epoch
        epoch = json.loads(selection.read_text())["selected_epoch"]
        paths["selected"] = run / "checkpoints" / f"epoch_{epoch:03d}"
    xi = {}
    for method in ("ce", "um", "umap"):
        out = run / "unleash" / method
        final = out / "checkpoints" / "final"
        if not final.with_suffix(".json").exists():
            finetune(
                bench,
                paths["final"],
                FinetuneSpec(method=method),
                finetune_recipe(method, epochs=epochs, seed=seed),
                out,
                device,
                progress=False,
            )
        paths[method] = final
        xi[method] = json.loads((out / "xi.json").read_text())
    return paths, xi


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="*", default=[f"runs/phenomenon/seed{s}" for s in range(3)])
    p.add_argument("--epochs", type=int, default=FINETUNE_RECIPE.epochs)
    p.add_argument("--out", default="benchmarks/results/unleash")
    args = p.parse_args()
    device = torch.device("cpu")
    bench = load_benchmark("fmnist")
    results = {}
    for run in map(Path, args.runs):
        cache = run / "unleash" / "evaluations.json"
        paths, xi = model_paths(bench, run, run_seed(run), args.epochs, device)
        if cache.exists():
            results[run.name] = json.loads(cache.read_text())
            continue
        evals = {}
        for name, path in paths.items():
            model, _ = load_checkpoint(path, device)
            evals[name] = evaluate(model, bench, "all", device=device, progress=False).to_dict()
        results[run.name] = {"evaluations": evals, "xi": xi["um"]}
        atomic_write_json(cache, results[run.name])

    lines = []
    for scorer in ("energy", "msp", "all"):
        models = {
            m: [r["evaluations"][m] for r in results.values()]
            for m in MODELS
            if all(m in r["evaluations"] for r in results.values())
        }
        lines += [
            f"### {scorer} (mean ± std over {len(results)} runs)",
            "",
            mean_std_table(models, scorer),
            "",
        ]
    xi_rows = [
        [
            name,
            f"{r['xi']['xi']:.4f}",
            f"{r['xi']['train_loss']:.4f}",
            ", ".join(f"{v:.4f}" for v in r["xi"]["estimate"]["per_mask"]),
        ]
        for name, r in results.items()
    ]
    lines += [
        "### xi per run",
        "",
        markdown_table(["run", "xi", "train loss", "per mask"], xi_rows),
        "",
    ]
    Path(f"{args.out}.md").parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.md").write_text("\n".join(lines))
    evaluations = {name: r["evaluations"] for name, r in results.items()}
    atomic_write_json(
        Path(f"{args.out}.json"), per_run_summaries(evaluations, ["energy", "msp", "all"])
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Copy the CE-control, UM and UMAP fine-tunes of the shipped model into the package, as the
weights ``unleash demo`` shows (``fmnist_cnn_ce``, ``fmnist_cnn_um``, ``fmnist_cnn_umap``).

    python benchmarks/ship_finetunes.py RUNS/ce RUNS/um RUNS/umap [--commit REV]

Each argument is the run directory of ``unleash finetune --from fmnist_cnn --method M`` (its
``checkpoints/final``). The sidecar keeps the recipe, xi and metrics; the machine-specific
start path is replaced by the shipped model's name, and ``made_with`` records the command
that remakes the model, with the commit of the code that trained it when ``--commit`` names
one (the same seed draws other random numbers at other commits).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from unleash_ood.checkpoint import SHIPPED_DIR, atomic_write_json, read_sidecar

METHODS = ("ce", "um", "umap")


def ship(run: Path, commit: str | None) -> str:
    meta = read_sidecar(run / "checkpoints" / "final")
    tune = meta["finetune"]
    method, recipe = tune["method"], meta["recipe"]
    if Path(tune["from"]).name != "fmnist_cnn":
        raise SystemExit(f"{run} was not fine-tuned from the shipped fmnist_cnn")
    config = json.loads((run / "config.json").read_text())
    name = tune.get("recipe_name") or config.get("recipe_name")
    tune = {**tune, "from": "fmnist_cnn", "recipe_name": name}
    xi = "" if tune["xi"] is None else f" --xi {tune['xi']:.6g}"
    made_with = (
        f"unleash finetune --from fmnist_cnn --method {method} --recipe {name} "
        f"--epochs {recipe['epochs']} --seed {recipe['seed']}{xi} --out RUN"
    )
    if commit:
        made_with += f" (the code of commit {commit})"
    target = SHIPPED_DIR / f"fmnist_cnn_{method}"
    shutil.copyfile(run / "checkpoints" / "final.safetensors", f"{target}.safetensors")
    atomic_write_json(
        target.with_suffix(".json"), {**meta, "finetune": tune, "made_with": made_with}
    )
    return f"{target.name}: {made_with}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs=3, type=Path, help="the ce, um and umap run directories")
    p.add_argument("--commit", help="the commit of the code that trained the three runs")
    args = p.parse_args()
    methods = [read_sidecar(r / "checkpoints" / "final")["finetune"]["method"] for r in args.runs]
    if sorted(methods) != sorted(METHODS):
        raise SystemExit(f"need one run each of {', '.join(METHODS)}, got {', '.join(methods)}")
    for run in args.runs:
        print(ship(run, args.commit))


if __name__ == "__main__":
    main()

"""Generative OOD detectors on fmnist over three seeds, beside the shipped classifier's scores.

    python benchmarks/generative.py [--kinds vae,vae-plain,ama,diffusion,mim] [--seeds 0,1,2]
        [--epochs N] [--width 32] [--model-arg KEY=VALUE] [--device auto]
        [--runs-dir runs/generative]
        [--out benchmarks/results/generative]
    python benchmarks/generative.py --measure-steps 5     # time a few steps of each kind, then stop
    python benchmarks/generative.py --kinds vae-plain --scores elbo,score_test   # fewer scores

Each detector kind and seed is one ``unleash detector train --kind KIND`` run with the kind's
default recipe (the authors': VAE 200 epochs, AMA 100, the diffusion model 100, MOOD's
masked-image stage 100 then its fine-tuning; ``--epochs`` shortens every kind and MOOD's
fine-tuning, ``--width`` sets the VAE's, ``--model-arg`` any model option of the one kind
in ``--kinds``, named in its table rows) and one ``unleash detector evaluate --splits val,test``
of it (AMA with the critic of the authors' OOD command, from ``checkpoints/best``, the epoch it
selects on the OOD validation sets; MOOD
with the classifier scores in ``KIND_SCORES``), each a child process, so the study runs
exactly what a user runs. A finished run is skipped, and so is one that ``<out>.json`` records
(with the same ``--epochs``) when its folder is gone; an interrupted one continues with
``--resume`` (bit-exact on a CPU). The diffusion model trains on Fashion-MNIST itself: no
28x28 grey base set unrelated to it ships offline (see ``generative/diffpath.py``). The
shipped CNN is evaluated once with the classifier scores of the comparison rows. After every
step the tables are rebuilt from whatever has finished into ``<out>.md`` and ``<out>.json``:
AUROC and both FPR95 conventions per OOD test set and their mean (mean ± std over seeds),
training time (sum of the logged epochs) and scoring time (wall time of the evaluate command).
Kind ``vae`` is the VAE restoring lossy inputs, scored by Error Reduction; ``vae-plain`` the
same VAE with ``--model-arg lossy=none``, scored by its likelihood and the score test (the
paper's block-diagonal Fisher and the EKFAC one of the authors' released code), which need a
plain VAE. ``elbo`` is that plain likelihood: an AUROC below 50 on a set means it
rates those OOD images as more likely than ID images, the failure Error Reduction and the score
test were made for.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from unleash_ood.checkpoint import atomic_write_bytes, atomic_write_json
from unleash_ood.cli.args import count, model_kwargs
from unleash_ood.data import Benchmark, load_benchmark
from unleash_ood.demo import shipped_checkpoint
from unleash_ood.device import resolve_device, to_device
from unleash_ood.errors import UserError
from unleash_ood.generative import create_detector
from unleash_ood.generative.trainer import DetectorTrainer, detector_recipe
from unleash_ood.metrics import METRIC_NAMES
from unleash_ood.report import markdown_table
from unleash_ood.train import resume_point

SRC = Path(__file__).resolve().parent.parent / "src"
METRICS = ("auroc", "fpr95_id", "fpr95_ood")
CLASSIFIER_SCORES = ("energy", "knn", "vim", "msp")
KINDS = ("vae", "vae-plain", "ama", "diffusion", "mim")
# The detector kind and model options each run kind trains with.
# AMA's critic is the one of the authors' OOD command (gradient penalty 10, spectral norm).
DETECTOR: dict[str, tuple[str, dict]] = {
    "vae-plain": ("vae", {"lossy": "none"}),
    "ama": ("ama", {"gradient_penalty": 10, "spectral_norm": True}),
}
# What each kind's evaluation scores: its own scores, or for MOOD's fine-tuned ViT the
# classifier scores (SSD's single Gaussian is the paper's).
KIND_SCORES = {
    "vae": "error_reduction",
    "vae-plain": "elbo,score_test,score_test_ekfac",
    "ama": "all",
    "diffusion": "all",
    "mim": "ssd,mahalanobis,knn,energy,msp",
}


def unleash(*args: str) -> float:
    """Run an ``unleash`` command in a child process; returns its wall time in seconds."""
    env = dict(os.environ, PYTHONPATH=f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "unleash_ood", *args], check=True, env=env)
    return time.perf_counter() - t0


def detector_options(kind: str, a: argparse.Namespace) -> tuple[str, dict]:
    """The detector kind a run kind trains and the model options it trains it with."""
    detector, options = DETECTOR.get(kind, (kind, {}))
    if detector == "vae" and a.width is not None:
        options = {**options, "width": a.width}
    return detector, {**options, **a.model_options}


def train_args(run: Path, kind: str, seed: int, a: argparse.Namespace) -> list[str]:
    detector, options = detector_options(kind, a)
    args = ["detector", "train", "--kind", detector, "--benchmark", "fmnist"]
    for key, value in options.items():
        args += ["--model-arg", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    args += ["--out", str(run), "--seed", str(seed), "--device", a.device, "--no-progress"]
    if a.epochs is not None:
        args += ["--epochs", str(a.epochs)]
        args += ["--finetune-epochs", str(a.epochs)] if kind == "mim" else []
    return args


def train_seconds(run: Path) -> float:
    """Sum of the logged epoch times, MOOD's fine-tuning included (an interrupted epoch's
    lost work is not counted)."""
    logs = [run / "log.txt", run / "finetune" / "log.txt"]
    pattern = re.compile(r"(\d+\.\d)s$", re.M)
    return sum(float(m) for log in logs if log.exists() for m in pattern.findall(log.read_text()))


def train(run: Path, kind: str, seed: int, a: argparse.Namespace) -> None:
    """Train ``run`` unless it has finished (``trained.json``); continue it from its newest
    saved epoch, or start it afresh when it was stopped before its first save."""
    done = run / "trained.json"
    wanted = {"epochs": a.epochs, "model_args": a.model_options}
    if done.exists():
        trained = {"model_args": {}, **json.loads(done.read_text())}
        if trained != wanted:
            raise SystemExit(
                f"{run} was trained with {trained}, not {wanted}; give another --runs-dir"
            )
        return
    resume = ["--resume"] if resume_point(run) is not None else []
    unleash(*train_args(run, kind, seed, a), *resume)
    atomic_write_json(done, wanted)


def timed_evaluation(out: Path, *args: str) -> None:
    """Run an evaluate command into ``out`` unless it has finished; keep its wall time."""
    if (out / "metrics.json").exists():
        return
    seconds = unleash(*args, "--out", str(out), "--splits", "val,test", "--no-progress")
    atomic_write_json(out / "timing.json", {"seconds": seconds})


def rows_of(out: Path) -> dict[tuple[str, str], dict[str, float]]:
    rows = json.loads((out / "metrics.json").read_text())["rows"]
    return {(r["scorer"], r["dataset"]): r for r in rows if r["split"] == "test"}


def recorded_runs(out: Path, epochs: int | None) -> dict[str, dict]:
    """The runs an earlier invocation recorded in ``<out>.json`` with the same ``--epochs``:
    their rows stay in the tables, and they are not trained again, when their folders are
    gone."""
    path = out.with_suffix(".json")
    if not path.exists():
        return {}
    summary = json.loads(path.read_text())
    return summary["runs"] if summary["epochs"] == epochs else {}


def run_record(run: Path) -> dict:
    """A finished run's times, ID test accuracy (MOOD's fine-tuned classifier; None for the
    detectors) and test rows, as ``<out>.json`` keeps them."""
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    trained = run / "trained.json"
    return {
        "model_args": json.loads(trained.read_text()).get("model_args", {})
        if trained.exists()
        else {},
        "train_seconds": train_seconds(run),
        "id_test_accuracy": metrics.get("accuracy", {}).get("id_test"),
        "score_seconds": json.loads((run / "eval" / "timing.json").read_text())["seconds"],
        "rows": {
            f"{s}/{d}": {m: v[m] for m in METRIC_NAMES}
            for (s, d), v in rows_of(run / "eval").items()
        },
    }


def options_label(model_args: list[dict]) -> str:
    """``--model-arg`` options of a kind's runs as its table rows name them: "" for none,
    "; gen_width=32" for one set, every distinct set joined by " / " if seeds differ."""
    distinct = dict.fromkeys(
        ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(args.items()))
        for args in model_args
        if args
    )
    return f"; {' / '.join(distinct)}" if distinct else ""


def tables(runs: list[Path], classifier: Path, out: Path, epochs: int | None) -> None:
    """Mean ± std over the finished seeds, per score and OOD test set: the runs finished in
    ``runs`` and those ``<out>.json`` records."""
    records = recorded_runs(out, epochs)
    records.update({r.name: run_record(r) for r in runs if (r / "eval" / "metrics.json").exists()})
    per_seed = {
        name: {tuple(key.split("/", 1)): v for key, v in record["rows"].items()}
        for name, record in records.items()
    }
    reference = rows_of(classifier) if (classifier / "metrics.json").exists() else {}
    # In the evaluation's order (the recorded rows come back sorted by name).
    sets = list(dict.fromkeys(d for rows in (reference, *per_seed.values()) for _, d in rows))
    recipe = "each kind's own recipe" if epochs is None else f"every kind cut to {epochs} epochs"
    finished = count(len(records), "run")
    lines = [f"# Generative detectors on fmnist, {recipe} ({finished} finished)", ""]
    for name in sets:
        table = []
        for kind in KINDS:
            runs_of_kind = [run for run in per_seed if re.fullmatch(rf"{kind}-seed\d+", run)]
            seeds = [per_seed[run] for run in runs_of_kind]
            options = options_label([records[run].get("model_args", {}) for run in runs_of_kind])
            # In KIND_SCORES's order, then by name: the same order whether the rows come
            # from this evaluation or from the record (which keeps them sorted by name).
            listed = KIND_SCORES[kind].split(",")
            scorers = sorted(
                {s for rows in seeds for s, d in rows if d == name},
                key=lambda s: (listed.index(s) if s in listed else len(listed), s),
            )
            for s in scorers:
                vals = {m: [100 * rows[(s, name)][m] for rows in seeds] for m in METRICS}
                cells = [f"{np.mean(v):.2f} ± {np.std(v):.2f}" for v in vals.values()]
                table.append([f"{kind} {s} ({count(len(seeds), 'seed')}{options})", *cells])
        for s in CLASSIFIER_SCORES:
            if (s, name) in reference:
                table.append(
                    [f"cnn {s}", *(f"{100 * reference[(s, name)][m]:.2f}" for m in METRICS)]
                )
        lines += [
            f"## {name}",
            "",
            markdown_table(["detector", "AUROC", "FPR95 (ID+)", "FPR95 (OOD+)"], table),
            "",
        ]
    timing = [
        [
            name,
            f"{r['train_seconds'] / 60:.1f}",
            f"{r['score_seconds'] / 60:.1f}",
            "-" if r.get("id_test_accuracy") is None else f"{100 * r['id_test_accuracy']:.2f}",
        ]
        for name, r in sorted(records.items())
    ]
    lines += [
        "## Time and ID accuracy",
        "",
        markdown_table(["run", "train (min)", "score val+test (min)", "ID test accuracy"], timing),
        "",
    ]
    summary = {
        "epochs": epochs,
        "runs": records,
        "classifier": {f"{s}/{d}": v["auroc"] for (s, d), v in reference.items()},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out.with_suffix(".md"), "\n".join(lines).encode())
    atomic_write_json(out.with_suffix(".json"), summary)


def measure_kind(kind: str, a: argparse.Namespace, bench: Benchmark) -> None:
    """Print the seconds per training step of ``kind``'s recipe on this machine (the
    trainer's own ``train_step``, with the options the study trains it with) and what its
    epochs and seeds cost. MOOD's fine-tuning stage is not timed."""
    detector, options = detector_options(kind, a)
    recipe = detector_recipe(detector, model_kwargs=options)
    epochs = a.epochs or recipe.epochs
    device = resolve_device(a.device)
    torch.manual_seed(0)
    model = create_detector(detector, 1, 28, **options)
    # The trainer's own model placement and optimiser; it writes nothing until it trains.
    trainer = DetectorTrainer(
        model, recipe, bench.id_train, bench.id_val, Path(a.runs_dir), device, bench.name
    )
    x, _ = bench.id_train.__getitems__(range(recipe.batch_size))
    x = to_device(x, device)
    times = []
    for _ in range(a.measure_steps + 1):  # the first step warms up
        t0 = time.perf_counter()
        trainer.model.train_step(x, trainer.opt, recipe.grad_clip)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    step = float(np.median(times[1:]))
    steps = len(bench.id_train) // recipe.batch_size
    seeds = len(a.seeds.split(","))
    name = f"{kind} {options}" if options else kind
    print(
        f"{name} on {device}: {step:.3f} s per step of {recipe.batch_size} "
        f"(median of {a.measure_steps}); {steps} steps = {step * steps / 60:.1f} min per epoch; "
        f"{epochs} epochs x {seeds} seeds = {step * steps * epochs * seeds / 3600:.1f} h",
        flush=True,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs-dir", default="runs/generative")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=None, help="every kind's (default: its own)")
    p.add_argument("--width", type=int, default=None, help="VAE width (default the authors' 32)")
    p.add_argument(
        "--model-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model option of the one kind of --kinds, over its own (e.g. critic_width=32)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="benchmarks/results/generative")
    p.add_argument(
        "--scores",
        default=None,
        help="score the one kind of --kinds with these instead of its own (KIND_SCORES)",
    )
    p.add_argument(
        "--measure-steps", type=int, default=0, help="only time this many steps of each kind"
    )
    a = p.parse_args()
    kinds = a.kinds.split(",")
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        p.error(f"unknown kinds {', '.join(unknown)}; choose from {', '.join(KINDS)}")
    if a.scores and len(kinds) != 1:
        p.error("--scores replaces one kind's scores: give one kind in --kinds")
    if a.model_arg and len(kinds) != 1:
        p.error("--model-arg sets one kind's options: give one kind in --kinds")
    try:
        a.model_options = model_kwargs(a.model_arg)
    except UserError as e:
        p.error(str(e))
    if a.measure_steps:
        bench = load_benchmark("fmnist")
        for kind in kinds:
            measure_kind(kind, a, bench)
        return
    root = Path(a.runs_dir)
    runs = [
        (kind, seed, root / f"{kind}-seed{seed}") for kind in kinds for seed in a.seeds.split(",")
    ]
    classifier = root / "classifier"
    timed_evaluation(
        classifier,
        "evaluate",
        "--checkpoint",
        str(shipped_checkpoint()),
        "--scores",
        ",".join(CLASSIFIER_SCORES),
        "--device",
        a.device,
    )
    folders = [run for _, _, run in runs]
    recorded = recorded_runs(Path(a.out), a.epochs)
    tables(folders, classifier, Path(a.out), a.epochs)
    for kind, seed, run in runs:
        kept = recorded.get(run.name, {}).get("model_args", {}) == a.model_options
        if run.name in recorded and kept and not (run / "eval" / "metrics.json").exists():
            continue  # recorded, with these options, by an earlier invocation; folder gone
        train(run, kind, int(seed), a)
        source = run / "checkpoints" / "best" if kind == "ama" else run
        timed_evaluation(
            run / "eval",
            "detector",
            "evaluate",
            "--from",
            str(source),
            "--scores",
            a.scores or KIND_SCORES[kind],
            "--device",
            a.device,
        )
        tables(folders, classifier, Path(a.out), a.epochs)
    print(Path(a.out).with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
